"""Falcon-H1's layer: a Mamba2 mixer and attention side by side on the same normed input, their
outputs summed, each with µP multipliers on its input and output."""

import mlx.nn as nn

from ..cache import LayerCaches
from .sharding import prefixed


class ParallelMixer(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model): mamba(x · m_in) · m_out + attention(x · a_in) · a_out."""

    def __init__(self, mamba, attention, multipliers=(1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        self.mamba, self.attention = mamba, attention
        self.ssm_in, self.ssm_out, self.attention_in, self.attention_out = multipliers

    def shard(self, group):
        """Tensor parallel, in place: both halves split (each sums its own output). The plan."""
        return {**prefixed("mamba", self.mamba.shard(group)),
                **prefixed("attention", self.attention.shard(group))}

    def make_cache(self, batch_size=1):
        return LayerCaches(mamba=self.mamba.make_cache(batch_size),
                           attention=self.attention.make_cache(batch_size))

    def __call__(self, x, cache=None, mask=None):
        mamba = self.mamba(x * self.ssm_in, cache and cache.mamba, mask)
        attention = self.attention(x * self.attention_in, cache and cache.attention, mask)
        return mamba * self.ssm_out + attention * self.attention_out

    def step(self, x, cache):
        return (self.mamba.step(x * self.ssm_in, cache.mamba) * self.ssm_out
                + self.attention.step(x * self.attention_in, cache.attention) * self.attention_out)
