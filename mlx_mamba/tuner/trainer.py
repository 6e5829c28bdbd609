"""The training loop: next-token cross-entropy over the weighted positions of each batch, gradient
accumulation, data parallelism over `mx.distributed`, periodic validation and checkpoints.

The loss of a step is the mean over every weighted token of all its micro-batches on all ranks.
Each rank differentiates the sum over its own tokens; the sums are added across micro-batches
and ranks and divided by the step's token count, so the update equals the one that a single
process would make on the whole batch, however the batch is split.
"""

import contextlib
import functools
import math
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .losses import weighted_cross_entropy


class TrainingError(ValueError):
    """Training that cannot go on (its loss is no longer finite, memory ran out); the message says
    when."""


# How MLX reports a failed allocation: Metal ("[metal::malloc] Attempting to allocate",
# "Insufficient Memory"), CUDA ("out of memory"), CPU ("Unable to allocate"); MemoryError for a
# failed allocation on the host. (On Linux the kernel may end the process first.)
OUT_OF_MEMORY = ("attempting to allocate", "unable to allocate", "out of memory",
                 "outofmemory", "insufficient memory")


@contextlib.contextmanager
def out_of_memory_advice(what):
    """Turns running out of memory during `what` into one TrainingError that says what to do."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not (isinstance(error, MemoryError)
                or any(text in str(error).lower() for text in OUT_OF_MEMORY)):
            raise
        raise TrainingError(
            f"out of memory {what} ({str(error).strip() or type(error).__name__}): use "
            "--grad-checkpoint, a shorter --max-seq-length or a smaller --batch-size") from None


def loss_terms(model, batch, differentiable=True):
    """(sum of the weighted token losses, number of weighted tokens) of one batch.

    The logits are computed from the hidden states a chunk of tokens at a time (`losses`): the
    (B, T, V) logits are never held whole. differentiable=False: the loss alone (evaluation)."""
    hidden = model.hidden_states(mx.array(batch.inputs))  # (B, T, D)
    weights = mx.array(batch.weights)
    total = weighted_cross_entropy(model.head, model.head_layer(), hidden,
                                   mx.array(batch.targets), weights, model.config.vocab_size,
                                   differentiable)
    return total, weights.sum()


def _size(batch):
    rows, length = batch.inputs.shape
    return f"{rows} x {length}"


def shard(batch, world):
    """This rank's rows of `batch`: rank r of n takes the r-th of n equal, contiguous slices."""
    size, rank = world.size(), world.rank()
    rows = len(batch.inputs)
    if rows % size:
        raise ValueError(f"batch size {rows} does not split over {size} processes: use a "
                         "multiple of the process count")
    return batch.rows(rank * rows // size, (rank + 1) * rows // size)


def _sum_over_ranks(x, world):
    return mx.distributed.all_sum(x, group=world) if world.size() > 1 else x


def evaluate(model, batches, world=None):
    """The mean token loss over `batches` (each split over the ranks)."""
    world = world or mx.distributed.init()
    was_training = model.training
    model.eval()
    total, tokens = mx.array(0.0), 0.0
    for batch in batches:
        tokens += float(batch.weights.sum())
        with out_of_memory_advice(f"evaluating a batch of {_size(batch)} tokens"):
            total = total + loss_terms(model, shard(batch, world), differentiable=False)[0]
            mx.eval(total)
    model.train(was_training)
    return (_sum_over_ranks(total, world) / tokens).item()


@functools.cache
def _checkpointed(cls):
    # A subclass of a layer class whose training forward keeps only its input for the backward
    # pass and recomputes the rest: memory per layer no longer grows with the activations.
    if getattr(cls, "recomputed_in_backward", False):
        return cls

    # Modules passed along (a shared block's adapters) are recomputed and differentiated too.
    def __call__(self, x, *modules, cache=None, mask=None):
        if cache is not None:  # decoding: nothing to differentiate
            return cls.__call__(self, x, *modules, cache=cache, mask=mask)

        def forward(parameters, x):
            for module, own in zip((self, *modules), parameters):
                module.update(own)
            return cls.__call__(self, x, *modules, mask=mask)

        parameters = [module.trainable_parameters() for module in (self, *modules)]
        return mx.checkpoint(forward)(parameters, x)

    return type(f"Checkpointed{cls.__name__}", (cls,),
                {"__call__": __call__, "recomputed_in_backward": True})


def checkpoint_layers(model):
    """Gradient checkpointing: recompute each residual block's mixer and feed-forward, and each
    invocation of a shared block, in the backward pass.

    Not with dropout: the recomputation draws new dropout masks, so the gradients would not be
    those of the forward pass."""
    for layer in model.backbone.layers:
        for part in ("mixer", "ffn"):
            if part in layer:
                layer[part].__class__ = _checkpointed(type(layer[part]))
    for block in model.backbone.blocks:
        block.__class__ = _checkpointed(type(block))
    return model


def train(model, optimizer, train_batches, *, iters, val_batches=(), steps_per_eval=200,
          steps_per_report=10, grad_accumulation_steps=1, save_every=0, save=None,
          grad_checkpoint=False, world=None, log=print):
    """Train the trainable parameters of `model` for `iters` optimizer steps.

    train_batches: an iterator of `Batch`es (the whole batch; each rank takes its rows), of which
    each step uses `grad_accumulation_steps`. val_batches: a sequence of batches, evaluated
    before training, every `steps_per_eval` steps and at the end. save(iteration): called every
    `save_every` steps on rank 0. Progress goes to `log` on rank 0. Raises TrainingError when the
    loss stops being finite: the weights are then useless and no later save happens.
    """
    world = world or mx.distributed.init()
    log = log if world.rank() == 0 else (lambda *args, **kwargs: None)
    if grad_checkpoint:
        checkpoint_layers(model)
    loss_and_grad = nn.value_and_grad(model, loss_terms)
    train_batches = iter(train_batches)

    def step():
        batches = [next(train_batches) for _ in range(grad_accumulation_steps)]
        weighted = sum(float(b.weights.sum()) for b in batches)  # every rank sees whole batches
        total, grads = mx.array(0.0), None
        for batch in batches:
            with out_of_memory_advice(f"training on a batch of {_size(batch)} tokens"):
                (loss, _), g = loss_and_grad(model, shard(batch, world))
                grads = g if grads is None else tree_map(mx.add, grads, g)
                total = total + loss
                mx.eval(total, grads)
        scale = world.size() / weighted  # average_gradients divides by the rank count
        grads = tree_map(lambda g: (g * scale).astype(g.dtype),
                         nn.average_gradients(grads, group=world))
        optimizer.update(model, grads)
        total = _sum_over_ranks(total, world)
        mx.eval(model.parameters(), optimizer.state, total)
        return total.item(), weighted, sum(int(b.lengths.sum()) for b in batches)

    def validate(iteration):
        start = time.perf_counter()
        loss = evaluate(model, val_batches, world)
        log(f"Iter {iteration}: Val loss {loss:.3f}, Val took {time.perf_counter() - start:.3f}s",
            flush=True)

    if val_batches:
        validate(0)
    model.train()
    window = dict(loss=0.0, weighted=0.0, tokens=0, steps=0, seconds=0.0)
    trained_tokens = 0
    for iteration in range(1, iters + 1):
        start = time.perf_counter()
        loss, weighted, tokens = step()
        if not math.isfinite(loss):
            raise TrainingError(f"the training loss is {loss} at iteration {iteration}: training "
                                "diverged (is the learning rate too high?); nothing from this "
                                "iteration on is saved")
        window["seconds"] += time.perf_counter() - start
        window["loss"] += loss
        window["weighted"] += weighted
        window["tokens"] += tokens
        window["steps"] += 1
        trained_tokens += tokens
        if iteration % steps_per_report == 0 or iteration == iters:
            log(f"Iter {iteration}: Train loss {window['loss'] / window['weighted']:.3f}, "
                f"Learning Rate {optimizer.learning_rate.item():.3e}, "
                f"It/sec {window['steps'] / window['seconds']:.3f}, "
                f"Tokens/sec {window['tokens'] / window['seconds']:.3f}, "
                f"Trained Tokens {trained_tokens}, "
                f"Peak mem {mx.get_peak_memory() / 1e9:.3f} GB", flush=True)
            window = dict.fromkeys(window, 0)
        if val_batches and (iteration % steps_per_eval == 0 or iteration == iters):
            validate(iteration)
        if save is not None and save_every and iteration % save_every == 0 and world.rank() == 0:
            save(iteration)
