"""Causal self-attention with grouped-query heads, optional (partial) RoPE, and a KV cache that
keeps left padding out of every row's keys."""

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from ..ops import causal_attention
from .sharding import readers_share, shard_input, shard_output, share


class Attention(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model). q/k/v/o_proj as in the transformers checkpoints.

    rope_theta None: no positional encoding (Granite 4.0-H, Nemotron-H); rope_dims: how many
    leading dims of each head rotate (half the head in Bamba), rotate-half style;
    key_multiplier scales the keys (Falcon-H1's µP).
    """

    def __init__(self, d_model, n_heads, n_kv_heads, head_dim, bias=False, scale=None,
                 rope_theta=None, rope_dims=0, key_multiplier=1.0, output_dims=None):
        """output_dims: o_proj's output size when it differs from the input's (Zamba2)."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.key_multiplier = key_multiplier
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.rope_theta, self.rope_dims = rope_theta, rope_dims or head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, output_dims or d_model, bias=bias)

    def head_shares(self, group):
        """((q0, q1), (k0, k1)): this rank's query heads and the KV heads they read."""
        return (share(self.n_heads, group, "attention heads (num_attention_heads)"),
                readers_share(self.n_heads, self.n_kv_heads, group,
                              "attention KV heads (num_key_value_heads)"))

    def shard(self, group):
        """Tensor parallel, in place: this rank keeps its share of the query heads and the KV
        heads they read (its KV cache then holds those alone); o_proj sums over the group."""
        (q0, q1), (k0, k1) = self.head_shares(group)
        D = self.head_dim
        plan = shard_input(self, "q_proj", [(q0 * D, q1 * D)])
        for name in ("k_proj", "v_proj"):
            plan.update(shard_input(self, name, [(k0 * D, k1 * D)]))
        plan.update(shard_output(self, "o_proj", [(q0 * D, q1 * D)], group, "attention o_proj"))
        self.n_heads, self.n_kv_heads = q1 - q0, k1 - k0
        return plan

    def make_cache(self, batch_size=1):
        return KVCache(batch_size, self.n_kv_heads, self.head_dim)

    def _heads(self, projection, x, count, extra=None):
        batch, length, _ = x.shape
        y = projection(x) if extra is None else projection(x) + extra
        return y.reshape(batch, length, count, self.head_dim).transpose(0, 2, 1, 3)

    def _rope(self, x, offset):
        if self.rope_theta is None:
            return x
        return mx.fast.rope(x, self.rope_dims, traditional=False, base=self.rope_theta,
                            scale=1.0, offset=offset)

    def __call__(self, x, cache=None, mask=None, extra=None):
        """mask (B, T): 0 marks left padding; padded positions are never attended to, and each
        row's positions start at its first real token. extra: (q, k, v) terms added to the
        projections (Zamba2's per-invocation adapters), or None."""
        batch, length, _ = x.shape
        extra_q, extra_k, extra_v = extra if extra is not None else (None, None, None)
        pads = 0 if mask is None else length - mask.astype(mx.int32).sum(axis=1)  # (B,)
        start = (cache.positions if cache is not None else 0) - pads
        q = self._rope(self._heads(self.q_proj, x, self.n_heads, extra_q), start)
        k = self._rope(self._heads(self.k_proj, x, self.n_kv_heads, extra_k), start)
        if self.key_multiplier != 1.0:
            k = k * self.key_multiplier
        v = self._heads(self.v_proj, x, self.n_kv_heads, extra_v)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v, valid = cache.update(k, v, mask)
        else:
            valid = None if mask is None else mask.astype(mx.bool_)
        if cache is None and length > causal_attention.BLOCK:
            # A whole sequence (training, scoring): blockwise, never (heads, T, T) scores, in the
            # forward or the backward pass. With a cache (prefill in steps, decoding) the scores
            # are (heads, step, cached keys): MLX's fused attention.
            y = causal_attention.causal_attention(q, k, v, self.scale, valid)
        else:
            y = mx.fast.scaled_dot_product_attention(
                q, k, v, scale=self.scale, mask=_attention_mask(length, past, valid))
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    def step(self, x, cache, extra=None):
        """One token: x (B, d_model) -> (B, d_model); appends to `cache`."""
        extra = None if extra is None else tuple(e[:, None] for e in extra)
        return self(x[:, None], cache, None, extra)[:, 0]


def _attention_mask(length, past, valid):
    """The mask of `length` queries after `past` cached keys: causal, no padded key, and every
    query at least sees itself (a padded query then stays finite instead of NaN)."""
    if valid is None:
        return "causal" if length > 1 else None  # MLX aligns it to the last key
    keys = past + length
    query = mx.arange(past, keys)[:, None]
    key = mx.arange(keys)[None]
    allowed = (key <= query) & valid[:, None, None, :]  # (B, 1, T, S)
    return allowed | (key == query)
