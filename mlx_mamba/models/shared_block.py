"""Zamba2's shared transformer block: one set of attention and MLP weights invoked at several
depths, each invocation with its own low-rank adapters on the projections. Its input is the
residual stream concatenated with the original embeddings, (B, T, 2·d_model); its output
(B, T, d_model) joins the input of that depth's Mamba layer through a per-layer linear map."""

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention
from .mlp import MLP
from .sharding import prefixed, shard_input, share


class LowRank(nn.Module):
    """x -> up(down(x)): an adapter of rank r, in -> out."""

    def __init__(self, in_dims, rank, out_dims):
        super().__init__()
        self.down = nn.Linear(in_dims, rank, bias=False)
        self.up = nn.Linear(rank, out_dims, bias=False)
        self.up.weight = mx.zeros_like(self.up.weight)  # a fresh adapter changes nothing

    def __call__(self, x):
        return self.up(self.down(x))


class InvocationAdapters(nn.Module):
    """One invocation's adapters: on q, k, v (optional) and on the MLP's packed gate-and-up."""

    def __init__(self, d_model, attention_dims, kv_dims, mlp_size, rank, attention=True):
        super().__init__()
        if attention:
            self.q = LowRank(2 * d_model, rank, attention_dims)
            self.k = LowRank(2 * d_model, rank, kv_dims)
            self.v = LowRank(2 * d_model, rank, kv_dims)
        self.gate_up = LowRank(d_model, rank, 2 * mlp_size)

    def shard(self, rows):
        """Tensor parallel, in place: each adapter's up projection keeps the output rows of the
        projection it adds to (`rows`, from `SharedBlock.adapter_rows`). Returns the plan."""
        plan = {}
        for name, part_rows in rows.items():
            if name in self:
                plan.update(prefixed(name, shard_input(self[name], "up", part_rows)))
        return plan

    def attention_terms(self, x):
        return (self.q(x), self.k(x), self.v(x)) if "q" in self else None

    def mlp_terms(self, x):
        return mx.split(self.gate_up(x), 2, axis=-1)


class SharedBlock(nn.Module):
    """x (B, T, 2·d_model) -> (B, T, d_model): attention over the normed input, then the MLP
    over the normed attention output (no residual inside: the caller adds it)."""

    def __init__(self, d_model, n_heads, n_kv_heads, head_dim, mlp_size, activation, eps,
                 rope_theta=None, bias=False):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(2 * d_model, eps=eps)
        # Scores are scaled by (head_dim / 2) ** -0.5: the heads see a doubled input width.
        self.self_attn = Attention(2 * d_model, n_heads, n_kv_heads, head_dim,
                                   scale=(head_dim / 2) ** -0.5, rope_theta=rope_theta,
                                   output_dims=d_model)
        self.pre_ff_layernorm = nn.RMSNorm(d_model, eps=eps)
        self.feed_forward = MLP(d_model, mlp_size, activation, bias)

    def adapter_rows(self, group):
        """{adapter: output rows} this rank keeps of every invocation's adapters once the block
        is sharded: those of its query and KV heads, and of the MLP's gate and up."""
        (q0, q1), (k0, k1) = self.self_attn.head_shares(group)
        D, hidden = self.self_attn.head_dim, self.feed_forward.up_proj.weight.shape[0]
        f0, f1 = share(hidden, group, "MLP intermediate size")
        kv = [(k0 * D, k1 * D)]
        return {"q": [(q0 * D, q1 * D)], "k": kv, "v": kv,
                "gate_up": [(f0, f1), (hidden + f0, hidden + f1)]}

    def shard(self, group):
        """Tensor parallel, in place: attention and MLP split as in any layer. The plan."""
        return {**prefixed("self_attn", self.self_attn.shard(group)),
                **prefixed("feed_forward", self.feed_forward.shard(group))}

    def __call__(self, x, adapters, cache=None, mask=None):
        h = self.input_layernorm(x)
        h = self.self_attn(h, cache, mask, adapters.attention_terms(h))
        return self._feed_forward(h, adapters)

    def step(self, x, adapters, cache):
        """x (B, 2·d_model): one token per sequence."""
        h = self.input_layernorm(x)
        h = self.self_attn.step(h, cache, adapters.attention_terms(h))
        return self._feed_forward(h, adapters)

    def _feed_forward(self, h, adapters):
        h = self.pre_ff_layernorm(h)
        return self.feed_forward(h, extra=adapters.mlp_terms(h))
