"""Cross-entropy from the final hidden states, a chunk of tokens at a time: the (tokens, vocabulary)
logits, their softmax and their gradient are never held whole, in the forward or the backward pass.

As in "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024), at chunk
granularity, with the gradients taken in the forward pass: a custom vjp computes each chunk's
logits, its loss and that loss's gradients (for the hidden states and the head's trainable
parameters) in one go and drops the chunk before the next. What it keeps for the backward pass is
the (tokens, D) gradient of the hidden states and the parameter gradients, which the backward pass
only scales by the incoming cotangent. So a training step multiplies by the head three times with
a trainable head, twice with a frozen one, as autograd on whole logits does, where recomputing the
logits in the backward pass would take one more. The head is any layer (dense, quantized,
adapted, tied to the embeddings); only its trainable parameters receive gradients.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..ops.recompute import after

# Logits per chunk: 2^21 float32 values are 8 MB (41 tokens of a 50,280-token vocabulary). A
# chunk holds about eight arrays of that size at once (logits, softmax, their gradients).
CHUNK_LOGITS = 2**21


def weighted_cross_entropy(head, layer, hidden, targets, weights, vocab_size, differentiable=True):
    """Σ weights · cross-entropy(head(hidden), targets) over all tokens.

    head: hidden (n, D) -> logits (n, V), computed with `layer`'s parameters; hidden (..., D);
    targets, weights (...). Equal to the plain computation on the whole logits, and so are its
    gradients (for hidden and for `layer`'s trainable parameters). differentiable=False (validation,
    evaluation) computes the loss alone, one pass over the head: its gradients are then wrong.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, weights = targets.reshape(-1), weights.reshape(-1)
    tokens = hidden.shape[0]
    rows = max(1, CHUNK_LOGITS // vocab_size)
    if tokens <= rows:
        return _chunk_loss(head, hidden, targets, weights)
    chunks = [slice(start, start + rows) for start in range(0, tokens, rows)]
    if not differentiable:
        total = mx.array(0.0)
        for part in chunks:  # one after the other: one chunk's logits at a time
            total = total + _chunk_loss(head, after(hidden[part], total), targets[part],
                                        weights[part])
        return total
    names = [name for name, _ in tree_flatten(layer.trainable_parameters())]

    def chunk_loss(hidden, *parameters, part):
        # The head computes with `parameters`: the vjp differentiates with respect to them.
        layer.update(tree_unflatten(list(zip(names, parameters))))
        return _chunk_loss(head, hidden, targets[part], weights[part])

    @mx.custom_function
    def loss(hidden, targets, weights, *parameters):
        total, d_hidden, d_parameters, previous = mx.array(0.0), [], None, mx.array(0.0)
        for part in chunks:
            (own,), (d_chunk, *d_own) = mx.vjp(
                lambda *primals, part=part: chunk_loss(*primals, part=part),
                [after(hidden[part], previous), *parameters], [mx.array(1.0)])
            total = total + own
            if d_own:
                d_parameters = d_own if d_parameters is None else \
                    [a + b for a, b in zip(d_parameters, d_own)]
                # The next chunk waits for this one's parameter gradients, which consume its
                # softmax, and for their running sum, which frees them.
                d_chunk = mx.depends([d_chunk], d_parameters)[0]
            d_hidden.append(d_chunk)
            # The next chunk also waits for this one's loss: its logits are then freed too.
            previous = mx.depends([d_chunk], [total])[0]
        layer.update(tree_unflatten(list(zip(names, parameters))))
        # The gradients are the backward pass's saved values, not results to differentiate.
        return total, mx.concatenate(d_hidden), *(d_parameters or ())

    @loss.vjp
    def loss_vjp(primals, cotangents, outputs):
        _, targets, weights, *_ = primals
        scale = cotangents[0]
        return (outputs[1] * scale.astype(outputs[1].dtype), mx.zeros_like(targets),
                mx.zeros_like(weights), *(d * scale.astype(d.dtype) for d in outputs[2:]))

    parameters = [value for _, value in tree_flatten(layer.trainable_parameters())]
    return loss(hidden, targets, weights, *parameters)[0]


def _chunk_loss(head, hidden, targets, weights):
    losses = nn.losses.cross_entropy(head(hidden).astype(mx.float32), targets)
    return (losses * weights).sum()
