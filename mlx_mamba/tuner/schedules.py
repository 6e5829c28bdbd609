"""Learning-rate schedules: step (the optimizer's update count, from 0) -> learning rate."""

import math

import mlx.core as mx

SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(name, learning_rate, steps, warmup=0, min_learning_rate=0.0):
    """A linear warmup over `warmup` steps to `learning_rate` (the first step already uses
    lr / warmup), then constant, or a cosine or linear decay that reaches `min_learning_rate` at
    the last of `steps` updates."""
    if name not in SCHEDULES:
        raise ValueError(f"learning-rate schedule {name!r}: expected one of {', '.join(SCHEDULES)}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning rate {learning_rate!r}: expected a finite number > 0")
    if not (math.isfinite(min_learning_rate) and 0 <= min_learning_rate <= learning_rate):
        raise ValueError(f"minimum learning rate {min_learning_rate!r}: expected a number from 0 "
                         f"to the learning rate ({learning_rate})")
    if not 0 <= warmup < max(steps, 1):
        raise ValueError(f"warmup of {warmup} steps: expected 0 <= warmup < iterations ({steps})")
    decay_steps = max(steps - warmup - 1, 1)

    def schedule(step):
        step = mx.array(step, mx.float32)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if name == "cosine":
            factor = 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif name == "linear":
            factor = 1.0 - progress
        else:
            factor = mx.array(1.0)
        decayed = min_learning_rate + (learning_rate - min_learning_rate) * factor
        if warmup:
            return mx.where(step < warmup, learning_rate * (step + 1) / warmup, decayed)
        return decayed

    return schedule
