"""Cross-entropy from the final hidden states, a chunk of tokens at a time: the (tokens, vocabulary)
logits, their softmax and their gradient are never held whole, in the forward or the backward pass.

As in "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024), at chunk
granularity: a custom vjp keeps only the hidden states, and its backward pass recomputes each
chunk's logits from them and the head's weight, differentiates that chunk's loss by autograd and
drops the chunk before the next. The head is any layer (dense, quantized, adapted, tied to the
embeddings); only its trainable parameters receive gradients.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..ops.recompute import after

# Logits per chunk: 2^21 float32 values are 8 MB (41 tokens of a 50,280-token vocabulary). A
# chunk's backward pass holds about eight arrays of that size (logits, softmax, their gradients).
CHUNK_LOGITS = 2**21


def weighted_cross_entropy(head, layer, hidden, targets, weights, vocab_size):
    """Σ weights · cross-entropy(head(hidden), targets) over all tokens.

    head: hidden (n, D) -> logits (n, V), computed with `layer`'s parameters; hidden (..., D);
    targets, weights (...). Equal to the plain computation on the whole logits, and so are its
    gradients (for hidden and for `layer`'s trainable parameters).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, weights = targets.reshape(-1), weights.reshape(-1)
    tokens = hidden.shape[0]
    rows = max(1, CHUNK_LOGITS // vocab_size)
    if tokens <= rows:
        return _chunk_loss(head, hidden, targets, weights)
    chunks = [slice(start, start + rows) for start in range(0, tokens, rows)]
    names = [name for name, _ in tree_flatten(layer.trainable_parameters())]

    def chunk_loss(hidden, targets, weights, *parameters):
        # The head computes with `parameters`: the vjp differentiates with respect to them.
        layer.update(tree_unflatten(list(zip(names, parameters))))
        return _chunk_loss(head, hidden, targets, weights)

    @mx.custom_function
    def loss(hidden, targets, weights, *parameters):
        total = mx.array(0.0)
        for part in chunks:  # one after the other: one chunk's logits at a time
            own = chunk_loss(after(hidden[part], total), targets[part], weights[part], *parameters)
            total = total + own
        return total

    @loss.vjp
    def loss_vjp(primals, cotangent, output):
        hidden, targets, weights, *parameters = primals
        d_hidden, d_parameters, previous = [], None, cotangent
        for part in chunks:
            def own_loss(hidden, *parameters, part=part):
                return chunk_loss(hidden, targets[part], weights[part], *parameters)

            _, (d_chunk, *d_own) = mx.vjp(own_loss, [after(hidden[part], previous), *parameters],
                                          [cotangent])
            if d_own:
                d_parameters = d_own if d_parameters is None else \
                    [a + b for a, b in zip(d_parameters, d_own)]
                # The next chunk waits for this one's parameter gradients, which consume its
                # softmax, and for their running sum, which frees them.
                d_chunk = mx.depends([d_chunk], d_parameters)[0]
            d_hidden.append(d_chunk)
            previous = d_chunk
        layer.update(tree_unflatten(list(zip(names, parameters))))
        return (mx.concatenate(d_hidden), mx.zeros_like(targets), mx.zeros_like(weights),
                *(d_parameters or ()))

    parameters = [value for _, value in tree_flatten(layer.trainable_parameters())]
    return loss(hidden, targets, weights, *parameters)


def _chunk_loss(head, hidden, targets, weights):
    losses = nn.losses.cross_entropy(head(hidden).astype(mx.float32), targets)
    return (losses * weights).sum()
