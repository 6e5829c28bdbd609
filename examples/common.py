"""What every example shares: the command-line defaults, a small training loop, the loss-curve PNG.

Each example is one concept; this module holds the plumbing so that the examples show only
their task and their model.
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def parser(description, *, steps, batch_size, lr, arch=None, archs=("mamba1", "mamba2")):
    """The flags every example has; the defaults are sized to finish in minutes on a laptop CPU."""
    try:  # fail now rather than after minutes of training, when the loss curve is drawn
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("the examples need matplotlib: pip install -e '.[examples]'") from None
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if arch is not None:
        p.add_argument("--arch", choices=archs, default=arch)
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the loss curve goes")
    p.add_argument("--no-compile", action="store_true", help="run the train step uncompiled")
    return p


def small_model(args, vocab_size, d_state):
    """A small language model of `args.arch`, `args.d_model` wide and `args.layers` deep."""
    from mlx_mamba import Model, ModelConfig

    return Model(ModelConfig(arch=args.arch, d_model=args.d_model, n_layer=args.layers,
                             vocab_size=vocab_size, d_state=d_state,
                             dt_rank=max(1, args.d_model // 16), head_dim=16, chunk_size=32))


def answers_loss(count):
    """The loss on the last `count` positions only: the answers; what comes before them is
    random, so scoring it would only add noise."""
    def loss_fn(model, inputs, targets):
        return nn.losses.cross_entropy(model(inputs)[:, -count:], targets).mean()
    return loss_fn


def train(model, loss_fn, next_batch, args, log_every=25):
    """AdamW with warmup and cosine decay; returns the loss of every step.

    loss_fn(model, *batch) -> scalar; next_batch() -> a tuple of arrays. The step is compiled
    with the model and optimizer state as implicit inputs and outputs, so that MLX builds the
    graph once and reuses it while the batch shapes stay fixed.
    """
    warmup = max(1, args.steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, args.lr, warmup),
         optim.cosine_decay(args.lr, max(1, args.steps - warmup), args.lr / 10)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(*batch):
        loss, grads = loss_and_grad(model, *batch)
        # Clipping keeps one large gradient, common in the first steps, from undoing progress.
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    if not args.no_compile:
        state = [model.state, optimizer.state]
        step = mx.compile(step, inputs=state, outputs=state)

    model.train()
    losses, start = [], time.perf_counter()
    for i in range(1, args.steps + 1):
        loss = step(*next_batch())
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
        if i % log_every == 0 or i == args.steps:
            recent = losses[-log_every:]
            print(f"step {i:5d}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)
    model.eval()
    return losses


def count_parameters(model):
    return sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))


def save_loss_curve(losses, path, title, extra=None):
    """A PNG of the per-step loss and its running mean; `extra` adds {label: [(step, value)]}."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the examples run headless too
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, alpha=0.3, color="tab:blue", label="train loss")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"running mean ({window} steps)")
    for label, points in (extra or {}).items():
        ax.plot(*zip(*points), "o-", label=label)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=title)
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")  # the synthetic tasks fall by orders of magnitude once solved
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"loss curve: {path}")


class CharTokenizer:
    """One id per distinct character, with the interface `generate` expects."""

    eos_token_id = None  # plain text has no end-of-sequence character

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)
