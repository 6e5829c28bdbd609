"""The language model around the mixers: embeddings, pre-norm residual blocks, final norm, head."""

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .mamba1 import Mamba1
from .mamba2 import Mamba2


def make_mixer(config: ModelConfig):
    if config.arch == "mamba1":
        return Mamba1(config.d_model, config.d_state, config.d_conv, config.expand,
                      config.dt_rank, config.conv_bias, config.bias, config.mixer_rms_eps)
    return Mamba2(config.d_model, config.d_state, config.d_conv, config.expand, config.head_dim,
                  config.n_groups, config.chunk_size, config.dt_limit, config.conv_bias,
                  config.bias, config.norm_eps)


class ResidualBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = make_mixer(config)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [ResidualBlock(config) for _ in range(config.n_layer)]
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)


class Model(nn.Module):
    """input_ids (B, T) -> logits (B, T, V); `step` decodes one token per sequence in O(1)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def make_cache(self, batch_size=1):
        return [layer.mixer.make_cache(batch_size) for layer in self.backbone.layers]

    def _run(self, input_ids, mix):
        # The residual stream stays in float32 (residual_in_fp32); mixers run in the weights' dtype.
        # The conv is never quantized: its dtype is the model's, whereas a quantized embedding
        # dequantizes to bfloat16 in the fp4/fp8 modes.
        dtype = self.backbone.layers[0].mixer.conv1d.weight.dtype
        hidden = self.backbone.embeddings(input_ids).astype(dtype)
        residual = hidden.astype(mx.float32) if self.config.residual_in_fp32 else hidden
        for i, layer in enumerate(self.backbone.layers):
            residual = residual + mix(layer.mixer, layer.norm(residual).astype(dtype), i)
        hidden = self.backbone.norm_f(residual).astype(dtype)
        if self.config.tie_embeddings:
            return self.backbone.embeddings.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(self, input_ids, cache=None, mask=None):
        """Parallel over T; with a cache, continues from it and updates it in place.

        mask (B, T): 1 for tokens, 0 for left padding; a left-padded row then gives exactly the
        logits and final state of the unpadded row (padding reaches neither conv nor state).
        """
        return self._run(input_ids, lambda mixer, h, i: mixer(
            h, cache[i] if cache is not None else None, mask))

    def step(self, token_ids, cache):
        """token_ids (B,) -> logits (B, V), advancing `cache` by one token."""
        return self._run(token_ids, lambda mixer, h, i: mixer.step(h, cache[i]))
