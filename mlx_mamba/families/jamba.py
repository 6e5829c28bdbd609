"""AI21's Jamba (transformers `jamba`): Mamba1 layers with RMSNorms (with weights) on Δ, B and C,
an attention layer (no positional encoding) every `attn_layer_period` layers from
`attn_layer_offset`, and after every mixer a gated SiLU feed-forward: a mixture of experts every
`expert_layer_period` layers from `expert_layer_offset`, an MLP elsewhere. The router keeps the
top-k of a softmax over all experts, not renormalised."""

import math

from ..config_fields import ConfigError, attention_fields, common_fields, get
from ._names import mixer_names, rename, stack_experts, swapped, unstack_experts
from .bamba import MIXERS as BAMBA_MIXERS
from .bamba import NAMES

MIXERS = dict(BAMBA_MIXERS, mamba1=BAMBA_MIXERS["mamba2"])


def _every(config, period_field, offset_field, period, offset, n_layer):
    """Which layers i have i % period == offset, as the two fields say."""
    period = get(config, period_field, period)
    offset = get(config, offset_field, offset, "count")
    if offset >= period:
        raise ConfigError(f"field {offset_field!r} is {offset}: it must be below "
                          f"{period_field!r} ({period})")
    return [i % period == offset for i in range(n_layer)]


def read_config(config):
    n_layer, hidden = get(config, "num_hidden_layers", kind="layers"), get(config, "hidden_size")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"field 'hidden_act' is {config['hidden_act']!r}: expected 'silu'")
    attention = _every(config, "attn_layer_period", "attn_layer_offset", 8, 4, n_layer)
    experts = get(config, "num_experts", 16, "count")
    # A layer with a single expert is an MLP (transformers' JambaMLP).
    moe = _every(config, "expert_layer_period", "expert_layer_offset", 2, 1, n_layer) \
        if experts > 1 else [False] * n_layer
    rank = config.get("mamba_dt_rank", "auto")
    eps = get(config, "rms_norm_eps", 1e-6, "positive_number")
    size = get(config, "intermediate_size")
    return dict(
        family="jamba", arch="mamba1",
        layer_types=tuple("attention" if a else "mamba1" for a in attention),
        ffn_types=tuple("moe" if m else "mlp" for m in moe),
        d_model=hidden, n_layer=n_layer, vocab_size=get(config, "vocab_size"),
        d_state=get(config, "mamba_d_state", 16), d_conv=get(config, "mamba_d_conv", 4),
        expand=get(config, "mamba_expand", 2),
        dt_rank=math.ceil(hidden / 16) if rank == "auto" else get(config, "mamba_dt_rank"),
        conv_bias=get(config, "mamba_conv_bias", True, "bool"),
        bias=get(config, "mamba_proj_bias", False, "bool"),
        norm_eps=eps, mixer_rms_eps=eps, mixer_rms_weights=True, residual_in_fp32=False,
        tie_embeddings=get(config, "tie_word_embeddings", False, "bool"),
        **dict(attention_fields(config), attn_bias=False),  # JambaAttention has no biases
        mlp_size=size, n_experts=experts if any(moe) else 0,
        top_k=get(config, "num_experts_per_tok", 2) if any(moe) else 0,
        expert_size=size if any(moe) else 0, router="softmax", router_normalize=False,
        source_config=config, **common_fields(config))


def to_model_names(weights, config):
    return rename(stack_experts(weights, config.n_experts), NAMES)


def to_checkpoint_names(weights, config):
    return rename(mixer_names(unstack_experts(weights), config, MIXERS), swapped(NAMES))
