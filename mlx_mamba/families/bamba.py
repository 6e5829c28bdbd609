"""IBM's Bamba (transformers `bamba`): Mamba2 layers with a few attention layers
(`attn_layer_indices`), each followed by a gated SiLU MLP; attention rotates half of each head
(partial RoPE)."""

from ..config_fields import (ConfigError, attention_fields, common_fields, dt_limit, get,
                             layer_kinds, rope_theta)
from ._names import mixer_names, rename, swapped

NAMES = [("model.embed_tokens.", "backbone.embeddings."),
         ("model.layers.{i}.input_layernorm.", "backbone.layers.{i}.norm."),
         ("model.layers.{i}.mamba.", "backbone.layers.{i}.mixer."),
         ("model.layers.{i}.self_attn.", "backbone.layers.{i}.mixer."),
         ("model.layers.{i}.pre_ff_layernorm.", "backbone.layers.{i}.ffn_norm."),
         ("model.layers.{i}.feed_forward.", "backbone.layers.{i}.ffn."),
         ("model.final_layernorm.", "backbone.norm_f.")]
MIXERS = {"mamba2": "model.layers.{i}.mamba.", "attention": "model.layers.{i}.self_attn."}
KINDS = {"linear_attention": "mamba2", "mamba": "mamba2", "full_attention": "attention",
         "attention": "attention"}


def mamba2_fields(config):
    """The Mamba2 sizes of Bamba and Granite 4.0-H, which spell them alike."""
    hidden, expand = get(config, "hidden_size"), get(config, "mamba_expand", 2)
    heads = get(config, "mamba_n_heads", 128)
    head_dim = config.get("mamba_d_head", "auto")
    if head_dim == "auto":
        head_dim = max(expand * hidden // heads, 1)
    else:
        head_dim = get(config, "mamba_d_head")
    if heads * head_dim != expand * hidden:
        raise ConfigError(f"fields 'mamba_n_heads' * 'mamba_d_head' ({heads} * {head_dim}) must "
                          f"equal 'mamba_expand' * 'hidden_size' ({expand} * {hidden})")
    return dict(d_model=hidden, expand=expand, inner_size=heads * head_dim, head_dim=head_dim,
                d_state=get(config, "mamba_d_state", 256), d_conv=get(config, "mamba_d_conv", 4),
                n_groups=get(config, "mamba_n_groups", 1),
                chunk_size=get(config, "mamba_chunk_size", 256),
                conv_bias=get(config, "mamba_conv_bias", True, "bool"),
                bias=get(config, "mamba_proj_bias", False, "bool"), dt_limit=dt_limit(config),
                norm_eps=get(config, "rms_norm_eps", 1e-5, "positive_number"),
                n_layer=get(config, "num_hidden_layers", kind="layers"), vocab_size=get(config, "vocab_size"),
                tie_embeddings=get(config, "tie_word_embeddings", False, "bool"),
                arch="mamba2", residual_in_fp32=False, source_config=config,
                **attention_fields(config), **common_fields(config))


def read_config(config):
    n_layer = get(config, "num_hidden_layers", kind="layers")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"field 'hidden_act' is {config['hidden_act']!r}: expected 'silu'")
    if "layer_types" in config or "layers_block_type" in config:
        field = "layer_types" if "layer_types" in config else "layers_block_type"
        kinds = layer_kinds(config[field], KINDS, field)
    else:
        attention = config.get("attn_layer_indices") or []
        if not isinstance(attention, list) or not all(
                isinstance(i, int) and 0 <= i < n_layer for i in attention):
            raise ConfigError(f"field 'attn_layer_indices' is {attention!r}: expected layer "
                              f"indices below {n_layer}")
        kinds = tuple("attention" if i in attention else "mamba2" for i in range(n_layer))
    head_dim = mamba2_fields(config)["attn_head_dim"]
    return dict(
        family="bamba", layer_types=kinds, ffn_types=("mlp",) * n_layer,
        rope_theta=rope_theta(config), rope_dims=head_dim // 2,
        mlp_size=get(config, "intermediate_size"),
        mlp_bias=get(config, "mlp_bias", False, "bool"), **mamba2_fields(config))


def to_model_names(weights, config):
    return rename(weights, NAMES)


def to_checkpoint_names(weights, config):
    return rename(mixer_names(weights, config, MIXERS), swapped(NAMES))

