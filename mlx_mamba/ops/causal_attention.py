"""Causal attention in memory linear in the sequence, for training: blockwise, with an online softmax.

Plain attention holds (heads, length, length) scores, and so does its gradient. Here the sequence
is cut into blocks of BLOCK positions, and query block i meets key block i - d for one offset d
at a time (d = 0 is the diagonal, causal within the block; every later offset is wholly in the
past), all query blocks of an offset at once: an offset's scores are (heads, length, BLOCK). The
softmax is accumulated online over the offsets (a running maximum, sum and weighted values).
A custom vjp keeps only the output and each query's logsumexp, and the backward pass recomputes
each offset's probabilities from them (the algorithm of FlashAttention, Dao et al. 2022).
"""

import math

import mlx.core as mx

# Positions per block: an offset holds heads x length x BLOCK scores (and the backward pass a few
# arrays of that size), a few activations of width d_model per token for 64.
BLOCK = 64


def causal_attention(q, k, v, scale, valid=None):
    """softmax(scale · q kᵀ, causal) v, as mx.fast.scaled_dot_product_attention with mask "causal".

    q (B, H, T, D); k, v (B, H_kv, T, D), H a multiple of H_kv (grouped-query heads); valid (B, T)
    bool or None: False marks padded keys, which no query sees but itself (a padded query then
    stays finite). Returns (B, H, T, D) in q's dtype; differentiable in q, k and v.
    """
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    blocks = math.ceil(length / BLOCK)
    padded = blocks * BLOCK

    def split(x, count):  # (B, count·H', T, D) -> (B, H', count, blocks, BLOCK, D), zero-padded
        x = mx.pad(x, [(0, 0), (0, 0), (0, padded - length), (0, 0)])
        return x.reshape(batch, x.shape[1] // count, count, blocks, BLOCK, dim)

    if valid is None:
        valid = mx.ones((batch, length), mx.bool_)
    # Padded positions at the end are keys no real query reaches (they come after it).
    keys_valid = mx.pad(valid, [(0, 0), (0, padded - length)]).reshape(
        batch, 1, 1, blocks, 1, BLOCK)
    diagonal = mx.tril(mx.ones((BLOCK, BLOCK), mx.bool_))
    itself = mx.eye(BLOCK, dtype=mx.bool_)

    def scores(q, k, offset):
        """Query blocks offset.. against key blocks ..blocks - offset: float32, masked."""
        s = (q[:, :, :, offset:] @ k[:, :, :, :blocks - offset].swapaxes(-1, -2))
        allowed = keys_valid[:, :, :, :blocks - offset]
        if offset == 0:
            allowed = diagonal & (allowed | itself)
        return mx.where(allowed, s.astype(mx.float32), -mx.inf)

    def at(x, offset, front):
        """An offset's blocks (axis 3) back in place among all blocks, zeros elsewhere."""
        pad = [(0, 0)] * x.ndim
        pad[3] = (offset, 0) if front else (0, offset)
        return mx.pad(x, pad)

    @mx.custom_function
    def attention(q, k, v, valid):
        q, k, v = split(q * scale, groups), split(k, 1), split(v, 1)
        s = scores(q, k, 0)
        high = s.max(axis=-1)  # every query sees itself at offset 0: finite
        p = mx.exp(s - high[..., None])
        total = p.sum(axis=-1)
        out = p.astype(v.dtype) @ v
        for offset in range(1, blocks):
            # After the offset before: one offset's scores at a time, not several side by side.
            s = scores(mx.depends([q], [out, total, high])[0], k, offset)
            new_high = mx.maximum(high[:, :, :, offset:], s.max(axis=-1))
            p = mx.exp(s - new_high[..., None])
            decay = mx.exp(high[:, :, :, offset:] - new_high)
            out = mx.concatenate([out[:, :, :, :offset], out[:, :, :, offset:] * decay[..., None]
                                  + p.astype(v.dtype) @ v[:, :, :, :blocks - offset]], axis=3)
            total = mx.concatenate([total[:, :, :, :offset],
                                    total[:, :, :, offset:] * decay + p.sum(axis=-1)], axis=3)
            high = mx.concatenate([high[:, :, :, :offset], new_high], axis=3)
        out = (out / total[..., None]).astype(q.dtype)
        logsumexp = high + mx.log(total)  # (B, H_kv, G, blocks, BLOCK)
        return unsplit(out), logsumexp

    def unsplit(x):  # (B, H', G', blocks, BLOCK, D) -> (B, H'·G', T, D)
        return x.reshape(batch, x.shape[1] * x.shape[2], padded, dim)[:, :, :length]

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v, valid = primals
        d_out, (out, logsumexp) = cotangents[0], outputs
        q, k, v = split(q * scale, groups), split(k, 1), split(v, 1)
        d_out, out = split(d_out, groups), split(out, groups)
        delta = (d_out.astype(mx.float32) * out.astype(mx.float32)).sum(axis=-1)
        d_q = d_k = d_v = None
        for offset in range(blocks):
            s = scores(q if d_q is None else mx.depends([q], [d_q])[0], k, offset)
            p = mx.exp(s - logsumexp[:, :, :, offset:, :, None])
            d_o = d_out[:, :, :, offset:]
            dv = (p.astype(d_o.dtype).swapaxes(-1, -2) @ d_o).sum(axis=2, keepdims=True)
            dp = (d_o @ v[:, :, :, :blocks - offset].swapaxes(-1, -2)).astype(mx.float32)
            ds = (p * (dp - delta[:, :, :, offset:, :, None])).astype(q.dtype)
            dq = ds @ k[:, :, :, :blocks - offset]
            dk = (ds.swapaxes(-1, -2) @ q[:, :, :, offset:]).sum(axis=2, keepdims=True)
            dq, dk, dv = at(dq, offset, True), at(dk, offset, False), at(dv, offset, False)
            if d_q is not None:
                dq, dk, dv = d_q + dq, d_k + dk, d_v + dv
            # One chain, not three: evaluating d_q's chain alone would keep every offset's
            # probabilities alive for the d_k and d_v chains after it.
            d_q, d_k, d_v = mx.depends([dq], [dk, dv])[0], dk, dv
        return (unsplit(d_q * scale), unsplit(d_k), unsplit(d_v), mx.zeros_like(valid))

    return attention(q, k, v, valid)[0]
