"""transformers Mamba (`model_type` mamba, `MambaConfig`) and Falcon-Mamba (falcon_mamba: the same
layers with a weightless RMSNorm on Δ, B and C). Their tensor names are this package's own; the
fields that Mamba2's config shares with them are read and written here too."""

import math

from ..config_fields import ConfigError, common_fields, get


def read_shared(config):
    """The fields every transformers Mamba config spells alike."""
    return dict(
        d_model=get(config, "hidden_size"),
        expand=get(config, "expand", 2),
        n_layer=get(config, "num_hidden_layers"),
        vocab_size=get(config, "vocab_size"),
        d_conv=get(config, "conv_kernel", 4),
        conv_bias=get(config, "use_conv_bias", True, "bool"),
        bias=get(config, "use_bias", False, "bool"),
        norm_eps=get(config, "layer_norm_epsilon", 1e-5, "positive_number"),
        residual_in_fp32=get(config, "residual_in_fp32", True, "bool"),
        **common_fields(config),
    )


def read_config(config):
    fields = read_shared(config)
    d_model, expand = fields["d_model"], fields["expand"]
    # The width is intermediate_size when the config has one, as in transformers: the published
    # tiiuae/falcon-mamba-7b config.json says expand 16 beside intermediate_size 8192 (2 * 4096).
    inner = get(config, "intermediate_size", expand * d_model)
    if inner % d_model:
        raise ConfigError(
            f"field 'intermediate_size' ({inner}) must be a multiple of 'hidden_size' ({d_model})")
    fields["expand"] = inner // d_model
    rank = config.get("time_step_rank", "auto")
    return dict(
        arch="mamba1", d_state=get(config, "state_size", 16),
        dt_rank=math.ceil(d_model / 16) if rank == "auto" else get(config, "time_step_rank"),
        mixer_rms_eps=get(config, "mixer_rms_eps", 1e-6, "positive_number")
        if config["model_type"] == "falcon_mamba" else None,
        tie_embeddings=get(config, "tie_word_embeddings", True, "bool"), **fields)


def write_shared(config):
    """The transformers config of a pure Mamba or Mamba2 model, as far as they agree."""
    return {
        "model_type": config.model_type,
        "architectures": [{"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
                           "falcon_mamba": "FalconMambaForCausalLM"}[config.model_type]],
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.vocab_size,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def write_config(config):
    written = dict(write_shared(config), time_step_rank=config.dt_rank)
    if config.mixer_rms_eps is not None:
        written["mixer_rms_eps"] = config.mixer_rms_eps
    return written
