"""TII's Falcon-H1 (transformers `falcon_h1`): every layer runs a Mamba2 mixer and attention (RoPE)
in parallel on the same normed input and sums them, then a SiLU-gated MLP; µP multipliers on the
embedding, the Mamba2 in_proj rows, both branches' inputs and outputs, the keys, the MLP and the
logits."""

from ..config_fields import (ConfigError, attention_fields, common_fields, dt_limit, get,
                             rope_theta)
from ._names import rename, swapped

NAMES = [("model.embed_tokens.", "backbone.embeddings."),
         ("model.layers.{i}.input_layernorm.", "backbone.layers.{i}.norm."),
         ("model.layers.{i}.mamba.", "backbone.layers.{i}.mixer.mamba."),
         ("model.layers.{i}.self_attn.", "backbone.layers.{i}.mixer.attention."),
         ("model.layers.{i}.pre_ff_layernorm.", "backbone.layers.{i}.ffn_norm."),
         ("model.layers.{i}.feed_forward.", "backbone.layers.{i}.ffn."),
         ("model.final_layernorm.", "backbone.norm_f.")]


def _numbers(config, name, count):
    values = config.get(name) or [1.0] * count
    if not isinstance(values, list) or len(values) != count:
        raise ConfigError(f"field {name!r} is {values!r}: expected {count} numbers")
    return tuple(get({name: v}, name, kind="number") for v in values)


def read_config(config):
    n_layer = get(config, "num_hidden_layers", kind="layers")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"field 'hidden_act' is {config['hidden_act']!r}: expected 'silu'")
    hidden, expand = get(config, "hidden_size"), get(config, "mamba_expand", 2)
    inner = get(config, "mamba_d_ssm", None) or expand * hidden
    heads = get(config, "mamba_n_heads", 128)
    head_dim = config.get("mamba_d_head", "auto")
    head_dim = max(inner // heads, 1) if head_dim == "auto" else get(config, "mamba_d_head")
    if heads * head_dim != inner:
        raise ConfigError(f"fields 'mamba_n_heads' * 'mamba_d_head' ({heads} * {head_dim}) must "
                          f"equal the Mamba width ('mamba_d_ssm' or 'mamba_expand' * "
                          f"'hidden_size': {inner})")
    norm = "none" if not get(config, "mamba_rms_norm", False, "bool") else \
        "before_gate" if get(config, "mamba_norm_before_gate", True, "bool") else "after_gate"
    number = lambda name: get(config, name, 1.0, "number")  # noqa: E731
    return dict(
        family="falcon_h1", arch="mamba2", layer_types=("parallel",) * n_layer,
        ffn_types=("mlp",) * n_layer, d_model=hidden, n_layer=n_layer,
        vocab_size=get(config, "vocab_size"), expand=expand, inner_size=inner,
        head_dim=head_dim, d_state=get(config, "mamba_d_state", 256),
        d_conv=get(config, "mamba_d_conv", 4), n_groups=get(config, "mamba_n_groups", 1),
        chunk_size=get(config, "mamba_chunk_size", 256),
        conv_bias=get(config, "mamba_conv_bias", True, "bool"),
        bias=get(config, "mamba_proj_bias", False, "bool"), dt_limit=dt_limit(config),
        norm_eps=get(config, "rms_norm_eps", 1e-5, "positive_number"), residual_in_fp32=False,
        tie_embeddings=get(config, "tie_word_embeddings", False, "bool"),
        **attention_fields(config), rope_theta=rope_theta(config),
        mlp_size=get(config, "intermediate_size"), mlp_bias=get(config, "mlp_bias", False, "bool"),
        mamba_gate_norm=norm, ssm_multipliers=_numbers(config, "ssm_multipliers", 5),
        parallel_multipliers=tuple(number(n) for n in (
            "ssm_in_multiplier", "ssm_out_multiplier", "attention_in_multiplier",
            "attention_out_multiplier")),
        key_multiplier=number("key_multiplier"),
        mlp_multipliers=_numbers(config, "mlp_multipliers", 2),
        embedding_multiplier=number("embedding_multiplier"),
        logits_multiplier=number("lm_head_multiplier"),
        source_config=config, **common_fields(config))


def to_model_names(weights, config):
    return rename(weights, NAMES)


def to_checkpoint_names(weights, config):
    return rename(weights, swapped(NAMES))
