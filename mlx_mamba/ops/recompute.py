"""Scan gradients in bounded memory: keep the state entering each segment, recompute in the backward.

Autograd through a scan keeps the intermediates of the whole sequence: for Mamba1 several
(batch, length, channels, states) tensors per layer. `segmented` runs a scan's core segment by
segment behind a custom vjp that keeps only the state entering each segment. The backward pass
walks the segments from last to first, recomputes one segment's forward from its entering state
and differentiates it by autograd, so it holds one segment's intermediates at a time, as the
kernels' backward does with its chunk checkpoints (KERNELS.md).
"""

import mlx.core as mx


def after(arrays, previous):
    """`arrays`, evaluated only once `previous` is. MLX evaluates up to 20 independent branches of
    a graph side by side; segments that wait for each other hold one segment's memory at a time."""
    return mx.depends(arrays, [previous])


def segmented(core, segment, sequences, shared, state):
    """core(*sequences, *shared, state) -> (y, last state), run over segments of `segment`
    positions along axis 1 of `sequences` and y, each segment starting from the last state of the
    one before. state: an array (zeros for a sequence's start).

    Returns (y, last state), the same as one call of `core` on the whole sequence, and
    differentiable in every input.
    """
    length = sequences[0].shape[1]
    if length <= segment:
        return core(*sequences, *shared, state)
    starts = range(0, length, segment)
    count = len(sequences)

    def pieces(arrays, start):
        return [a[:, start:start + segment] for a in arrays]

    @mx.custom_function
    def scan(*arrays):
        h = arrays[-1]
        ys, entering = [], []
        for start in starts:
            entering.append(h)
            y, h = core(*after(pieces(arrays[:count], start), h), *arrays[count:-1], h)
            ys.append(y)
            # A copy: the last state is often a view of all the segment's states, which would
            # stay alive as long as their view, until the end of the scan.
            h = h * 1.0
        # The entering states are the backward pass's checkpoints, not a result to differentiate.
        return mx.concatenate(ys, axis=1), h, mx.stack(entering, axis=1)

    @scan.vjp
    def scan_vjp(arrays, cotangents, outputs):
        d_y, d_state = cotangents[0], cotangents[1]
        entering = outputs[2]
        d_sequences, d_shared = [], None
        for index in reversed(range(len(starts))):
            start = starts[index]
            primals = [*after(pieces(arrays[:count], start), d_state), *arrays[count:-1],
                       entering[:, index]]
            _, grads = mx.vjp(core, primals, [d_y[:, start:start + segment], d_state])
            d_sequences.append(grads[:count])
            shared = grads[count:-1]
            d_shared = shared if d_shared is None else [a + b for a, b in zip(d_shared, shared)]
            # The segment before waits for all of this segment's gradients and their running sums
            # (through d_state), so this segment's recomputed intermediates are freed first.
            d_state = mx.depends([grads[-1]], [*grads[:count], *d_shared])[0]
        d_sequences = [mx.concatenate(parts[::-1], axis=1) for parts in zip(*d_sequences)]
        return (*d_sequences, *d_shared, d_state)

    y, last, _ = scan(*sequences, *shared, state)
    return y, last
