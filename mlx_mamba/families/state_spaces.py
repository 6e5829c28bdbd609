"""The original state-spaces layout (mamba_ssm's `MambaLMHeadModel`): config.json with `d_model`
and an `ssm_cfg` naming the layer (Mamba1, Mamba2 or Mamba3), weights in pytorch_model.bin with
the embedding as `backbone.embedding`. Mamba-3 has no transformers form, so its converted config
is written in this one."""

import math

from ..config_fields import ConfigError, common_fields, dt_limit, get
from ._names import rename

NAMES = [("backbone.embedding.", "backbone.embeddings.")]

# Fields of ssm_cfg that only matter for initialisation or for the CUDA implementation, or that
# were read already.
IGNORED_SSM_FIELDS = {
    "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "use_fast_path",
    "layer_idx", "D_has_hdim", "activation", "sequence_parallel", "use_mem_eff_path",
    "process_group", "dt_limit", "d_state", "headdim", "ngroups", "chunk_size",
}


def padded_vocab(vocab_size, multiple):
    return -(-vocab_size // multiple) * multiple if multiple and multiple > 1 else vocab_size


def read_config(config):
    ssm = config.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise ConfigError(f"field 'ssm_cfg' is {ssm!r}: expected an object")
    ssm, where = dict(ssm), "ssm_cfg."
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2", "Mamba3"):
        raise ConfigError(f"field 'ssm_cfg.layer' is {layer!r}: expected Mamba1, Mamba2 or "
                          "Mamba3")
    if config.get("d_intermediate", 0):
        raise ConfigError(
            f"field 'd_intermediate' is {config['d_intermediate']}: MLP layers between mixers "
            "are not supported (expected 0)")
    if config.get("attn_layer_idx"):
        raise ConfigError("field 'attn_layer_idx': hybrid attention layers are not supported")
    if not get(config, "rms_norm", True, "bool"):
        raise ConfigError("field 'rms_norm' is false: LayerNorm models are not supported")
    d_model = get(config, "d_model")
    expand = get(ssm, "expand", 2, where=where)
    ssm.pop("expand", None)
    common = dict(
        d_model=d_model,
        n_layer=get(config, "n_layer"),
        vocab_size=padded_vocab(get(config, "vocab_size"),
                                get(config, "pad_vocab_size_multiple", 8, "count")),
        d_conv=get(ssm, "d_conv", 4, where=where),
        expand=expand,
        conv_bias=get(ssm, "conv_bias", True, "bool", where),
        bias=get(ssm, "bias", False, "bool", where),
        norm_eps=get(config, "norm_epsilon", 1e-5, "positive_number"),
        residual_in_fp32=get(config, "residual_in_fp32", True, "bool"),
        tie_embeddings=get(config, "tie_embeddings", True, "bool"),
        **common_fields(config),
    )
    for name in ("d_conv", "conv_bias", "bias"):
        ssm.pop(name, None)
    if layer == "Mamba3":
        fields = _mamba3_fields(ssm, common)
    elif layer == "Mamba1":
        rank = ssm.pop("dt_rank", "auto")
        fields = dict(arch="mamba1", d_state=get(ssm, "d_state", 16, where=where),
                      dt_rank=math.ceil(d_model / 16) if rank == "auto"
                      else get({"dt_rank": rank}, "dt_rank", where=where), **common)
    else:
        if ssm.pop("d_ssm", None) not in (None, expand * d_model):
            raise ConfigError("field 'ssm_cfg.d_ssm': a partial SSM width is not supported")
        if not ssm.pop("rmsnorm", True) or ssm.pop("norm_before_gate", False):
            raise ConfigError(
                "fields 'ssm_cfg.rmsnorm'/'ssm_cfg.norm_before_gate': only the gated RMSNorm "
                "after the gate is supported")
        fields = dict(
            arch="mamba2", d_state=get(ssm, "d_state", 128, where=where),
            head_dim=get(ssm, "headdim", 64, where=where),
            n_groups=get(ssm, "ngroups", 1, where=where),
            chunk_size=get(ssm, "chunk_size", 256, where=where),
            dt_limit=dt_limit(ssm, "dt_limit", where), **common)
    _check_leftovers(ssm)
    return fields


def _mamba3_fields(ssm, common):
    # Mamba-3 has no conv (d_conv, conv_bias do not apply) and no bias on its projections.
    where = "ssm_cfg."
    if common.pop("bias"):
        raise ConfigError("field 'ssm_cfg.bias' is true: Mamba-3's projections have no bias")
    common.pop("conv_bias")
    is_mimo = get(ssm, "is_mimo", False, "bool", where)
    fields = dict(
        d_state=get(ssm, "d_state", 128, where=where),
        head_dim=get(ssm, "headdim", 64, where=where),
        n_groups=get(ssm, "ngroups", 1, where=where),
        chunk_size=get(ssm, "chunk_size", 64, where=where),
        rope_fraction=get(ssm, "rope_fraction", 0.5, "positive_number", where),
        A_floor=get(ssm, "A_floor", 1e-4, "number", where),
        is_outproj_norm=get(ssm, "is_outproj_norm", False, "bool", where), is_mimo=is_mimo,
        mimo_rank=get(ssm, "mimo_rank", 4, where=where) if is_mimo else 1,
        A_activation=get(ssm, "A_activation", "heavy_tail", "text", where))
    get(ssm, "fuse_pregate_headwise_norm", True, "bool", where)  # a kernel choice: same result
    for name in ("rope_fraction", "A_floor", "is_outproj_norm", "is_mimo", "mimo_rank",
                 "A_activation", "fuse_pregate_headwise_norm", "dropout", "n_layer"):
        ssm.pop(name, None)
    return dict(arch="mamba3", **fields, **common)


def _check_leftovers(ssm):
    unknown = sorted(set(ssm) - IGNORED_SSM_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field 'ssm_cfg.{unknown[0]}'")
    if ssm.get("D_has_hdim"):
        raise ConfigError("field 'ssm_cfg.D_has_hdim' is true: a per-channel D is not supported")


def write_config(config):
    """A Mamba-3 model's config in the state-spaces form, the only one it has."""
    ssm_cfg = {"layer": "Mamba3", "d_state": config.d_state, "expand": config.expand,
               "headdim": config.head_dim, "ngroups": config.n_groups,
               "rope_fraction": config.rope_fraction, "A_floor": config.A_floor,
               "is_outproj_norm": config.is_outproj_norm, "is_mimo": config.is_mimo,
               "mimo_rank": config.mimo_rank, "chunk_size": config.chunk_size,
               "A_activation": config.A_activation}
    return {"d_model": config.d_model, "n_layer": config.n_layer,
            "vocab_size": config.vocab_size, "ssm_cfg": ssm_cfg, "rms_norm": True,
            "residual_in_fp32": config.residual_in_fp32, "norm_epsilon": config.norm_eps,
            "pad_vocab_size_multiple": 1, "tie_embeddings": config.tie_embeddings,
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id}


def to_model_names(weights, config):
    return rename(weights, NAMES)
