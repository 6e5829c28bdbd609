"""Mistral's layout (Mamba-Codestral): params.json (mistral_inference's `MambaArgs`: dim, n_layers,
vocab_size, n_groups, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple,
tie_embeddings, model_type "mamba"; every other size is a mamba_ssm Mamba2 default) and
consolidated.safetensors, whose names are mamba_ssm's under `model.` (mistral_inference wraps
mamba_ssm's model as `self.model`)."""

from ..config_fields import ConfigError, get
from ._names import rename
from .state_spaces import padded_vocab

NAMES = [("model.backbone.embedding.", "backbone.embeddings."),
         ("model.backbone.", "backbone."),
         ("model.lm_head.", "lm_head.")]


def read_config(config):
    if config.get("model_type", "mamba") != "mamba":
        raise ConfigError(f"field 'model_type' is {config['model_type']!r}: only Mistral's Mamba "
                          "params.json ('mamba') is supported")
    if not get(config, "rms_norm", True, "bool"):
        raise ConfigError("field 'rms_norm' is false: LayerNorm models are not supported")
    return dict(
        arch="mamba2",
        d_model=get(config, "dim"),
        n_layer=get(config, "n_layers"),
        vocab_size=padded_vocab(get(config, "vocab_size"),
                                get(config, "pad_vocab_size_multiple", 1, "count")),
        d_state=get(config, "d_state", 128),
        head_dim=get(config, "head_dim", 64),
        n_groups=get(config, "n_groups", 1),
        chunk_size=get(config, "chunk_size", 256),
        norm_eps=get(config, "norm_eps", 1e-5, "positive_number"),
        residual_in_fp32=get(config, "residual_in_fp32", True, "bool"),
        tie_embeddings=get(config, "tie_embeddings", False, "bool"),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def to_model_names(weights, config):
    return rename(weights, NAMES)
