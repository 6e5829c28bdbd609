"""One model configuration, parsed from every checkpoint flavour a user meets.

Sources: transformers `MambaConfig` / `Mamba2Config` / `FalconMambaConfig` JSON (`model_type`
mamba, mamba2, falcon_mamba), the original state-spaces `config.json` (`d_model` + `ssm_cfg`),
and Mistral's `params.json` (Mamba-Codestral). `to_dict` writes the transformers form, which is
what convert.py saves and what mlx-lm reads.
"""

import dataclasses
import json
import math
from pathlib import Path


class ConfigError(ValueError):
    """A configuration this package cannot use; the message names the field."""


@dataclasses.dataclass
class ModelConfig:
    arch: str  # "mamba1" or "mamba2"
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # Mamba1 only
    head_dim: int = 64  # Mamba2 only
    n_groups: int = 1  # Mamba2 only
    chunk_size: int = 256  # Mamba2 only
    dt_limit: tuple = (0.0, math.inf)  # Mamba2 only
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    mixer_rms_eps: float | None = None  # Falcon-Mamba: weightless RMSNorm on dt, B and C
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 0
    pad_token_id: int | None = 0
    quantization: dict | None = None

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def n_heads(self):
        return self.d_inner // self.head_dim

    @property
    def model_type(self):
        if self.arch == "mamba2":
            return "mamba2"
        return "falcon_mamba" if self.mixer_rms_eps is not None else "mamba"

    def __post_init__(self):
        self.dt_limit = tuple(_as_float(v) for v in self.dt_limit)
        self._validate()

    def _validate(self):
        if self.arch not in ("mamba1", "mamba2"):
            raise ConfigError(f"arch {self.arch!r}: expected 'mamba1' or 'mamba2'")
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"field {name!r} is {value!r}: expected a positive integer")
        if self.arch == "mamba1" and self.dt_rank <= 0:
            raise ConfigError(f"field 'time_step_rank' is {self.dt_rank!r}: expected a positive integer")
        if self.arch == "mamba2":
            if self.d_inner % self.head_dim:
                raise ConfigError(
                    f"field 'head_dim' is {self.head_dim}: it must divide expand * hidden_size "
                    f"= {self.d_inner}")
            if self.n_heads % self.n_groups:
                raise ConfigError(
                    f"field 'n_groups' is {self.n_groups}: it must divide the number of heads "
                    f"({self.n_heads})")
            if self.chunk_size <= 0:
                raise ConfigError(f"field 'chunk_size' is {self.chunk_size}: expected a positive integer")
            lo, hi = self.dt_limit
            if not 0.0 <= lo < hi:
                raise ConfigError(f"field 'time_step_limit' is {list(self.dt_limit)}: expected 0 <= low < high")

    @classmethod
    def from_dict(cls, config):
        """Parse any supported flavour; unknown or contradictory fields raise ConfigError."""
        parse = {"transformers": _from_transformers, "state-spaces": _from_state_spaces,
                 "mistral": _from_mistral}[config_format(config)]
        return parse(config)

    def to_dict(self):
        """The transformers form of this config (model_type mamba, mamba2 or falcon_mamba)."""
        config = {
            "model_type": self.model_type,
            "architectures": [{"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
                               "falcon_mamba": "FalconMambaForCausalLM"}[self.model_type]],
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.arch == "mamba1":
            config["time_step_rank"] = self.dt_rank
        else:
            # time_step_rank is unused by Mamba2, but transformers writes it and mlx-lm needs it.
            config.update(num_heads=self.n_heads, head_dim=self.head_dim, n_groups=self.n_groups,
                          chunk_size=self.chunk_size, time_step_limit=list(self.dt_limit),
                          time_step_rank=math.ceil(self.d_model / 16))
        if self.mixer_rms_eps is not None:
            config["mixer_rms_eps"] = self.mixer_rms_eps
        if self.quantization is not None:
            config["quantization"] = self.quantization
        return config


def config_format(config):
    """Which flavour a raw config dict is: "transformers", "state-spaces" or "mistral"."""
    if "model_type" in config and "dim" not in config:
        return "transformers"
    if "d_model" in config or "ssm_cfg" in config:
        return "state-spaces"
    if "dim" in config and "n_layers" in config:
        return "mistral"
    raise ConfigError(
        "unrecognised config: expected a transformers config ('model_type'), a state-spaces "
        "config ('d_model', 'ssm_cfg') or a Mistral params.json ('dim', 'n_layers')")


def read_config(path):
    """(file, raw dict) of a checkpoint directory's config.json, or else Mistral's params.json."""
    path = Path(path)
    for name in ("config.json", "params.json"):
        file = path / name
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ConfigError(f"{file}: expected a JSON object")
            return file, config
    raise ConfigError(f"{path}: no config.json or params.json")


def load_config(path):
    """The ModelConfig of a checkpoint directory (config.json, or Mistral's params.json)."""
    file, config = read_config(path)
    try:
        return ModelConfig.from_dict(config)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def _as_float(value):
    # transformers writes infinity as {"__float__": "Infinity"}; plain JSON writers as Infinity.
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"field 'time_step_limit' holds {value!r}: expected a number") from None


def _require(config, name, where=""):
    if name not in config:
        raise ConfigError(f"missing field {where + name!r}")
    return config[name]


def _common_tokens(config):
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}


def _from_transformers(config):
    model_type = config["model_type"]
    if model_type not in ("mamba", "mamba2", "falcon_mamba"):
        raise ConfigError(
            f"field 'model_type' is {model_type!r}: expected mamba, mamba2 or falcon_mamba")
    d_model = _require(config, "hidden_size")
    expand = config.get("expand", 2)
    common = dict(
        d_model=d_model,
        n_layer=_require(config, "num_hidden_layers"),
        vocab_size=_require(config, "vocab_size"),
        d_conv=config.get("conv_kernel", 4),
        expand=expand,
        conv_bias=config.get("use_conv_bias", True),
        bias=config.get("use_bias", False),
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=config.get("residual_in_fp32", True),
        quantization=config.get("quantization"),
        **_common_tokens(config),
    )
    if model_type == "mamba2":
        head_dim = config.get("head_dim", 64)
        heads = config.get("num_heads", expand * d_model // head_dim)
        if heads * head_dim != expand * d_model:
            raise ConfigError(
                f"fields 'num_heads' * 'head_dim' ({heads} * {head_dim}) must equal "
                f"'expand' * 'hidden_size' ({expand} * {d_model})")
        return ModelConfig(
            arch="mamba2", d_state=config.get("state_size", 128), head_dim=head_dim,
            n_groups=config.get("n_groups", 8), chunk_size=config.get("chunk_size", 256),
            dt_limit=tuple(config.get("time_step_limit", (0.0, math.inf))),
            tie_embeddings=config.get("tie_word_embeddings", False), **common)
    inner = config.get("intermediate_size", expand * d_model)
    if inner != expand * d_model:
        raise ConfigError(
            f"field 'intermediate_size' ({inner}) must equal 'expand' * 'hidden_size' "
            f"({expand} * {d_model})")
    rank = config.get("time_step_rank", "auto")
    return ModelConfig(
        arch="mamba1", d_state=config.get("state_size", 16),
        dt_rank=math.ceil(d_model / 16) if rank == "auto" else rank,
        mixer_rms_eps=config.get("mixer_rms_eps", 1e-6) if model_type == "falcon_mamba" else None,
        tie_embeddings=config.get("tie_word_embeddings", True), **common)


def _padded_vocab(vocab_size, multiple):
    return -(-vocab_size // multiple) * multiple if multiple and multiple > 1 else vocab_size


def _from_state_spaces(config):
    ssm = dict(config.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ConfigError(f"field 'ssm_cfg.layer' is {layer!r}: expected Mamba1 or Mamba2")
    if config.get("d_intermediate", 0):
        raise ConfigError(
            f"field 'd_intermediate' is {config['d_intermediate']}: MLP layers between mixers "
            "are not supported (expected 0)")
    if config.get("attn_layer_idx"):
        raise ConfigError("field 'attn_layer_idx': hybrid attention layers are not supported")
    if not config.get("rms_norm", True):
        raise ConfigError("field 'rms_norm' is false: LayerNorm models are not supported")
    d_model = _require(config, "d_model")
    expand = ssm.pop("expand", 2)
    common = dict(
        d_model=d_model,
        n_layer=_require(config, "n_layer"),
        vocab_size=_padded_vocab(_require(config, "vocab_size"),
                                 config.get("pad_vocab_size_multiple", 8)),
        d_conv=ssm.pop("d_conv", 4),
        expand=expand,
        conv_bias=ssm.pop("conv_bias", True),
        bias=ssm.pop("bias", False),
        norm_eps=config.get("norm_epsilon", 1e-5),
        residual_in_fp32=config.get("residual_in_fp32", True),
        tie_embeddings=config.get("tie_embeddings", True),
        **_common_tokens(config),
    )
    if layer == "Mamba1":
        rank = ssm.pop("dt_rank", "auto")
        result = ModelConfig(arch="mamba1", d_state=ssm.pop("d_state", 16),
                             dt_rank=math.ceil(d_model / 16) if rank == "auto" else rank, **common)
    else:
        if ssm.pop("d_ssm", None) not in (None, expand * d_model):
            raise ConfigError("field 'ssm_cfg.d_ssm': a partial SSM width is not supported")
        if not ssm.pop("rmsnorm", True) or ssm.pop("norm_before_gate", False):
            raise ConfigError(
                "fields 'ssm_cfg.rmsnorm'/'ssm_cfg.norm_before_gate': only the gated RMSNorm "
                "after the gate is supported")
        result = ModelConfig(
            arch="mamba2", d_state=ssm.pop("d_state", 128), head_dim=ssm.pop("headdim", 64),
            n_groups=ssm.pop("ngroups", 1), chunk_size=ssm.pop("chunk_size", 256),
            dt_limit=tuple(ssm.pop("dt_limit", (0.0, math.inf))), **common)
    _check_ssm_leftovers(ssm)
    return result


# Fields of ssm_cfg that only matter for initialisation or for the CUDA implementation.
_IGNORED_SSM_FIELDS = {
    "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "use_fast_path",
    "layer_idx", "D_has_hdim", "activation", "sequence_parallel", "use_mem_eff_path",
    "process_group", "dt_limit",
}


def _check_ssm_leftovers(ssm):
    unknown = sorted(set(ssm) - _IGNORED_SSM_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field 'ssm_cfg.{unknown[0]}'")
    if ssm.get("D_has_hdim"):
        raise ConfigError("field 'ssm_cfg.D_has_hdim' is true: a per-channel D is not supported")


def _from_mistral(config):
    # Mamba-Codestral's params.json (mistral_inference's MambaArgs): dim, n_layers, vocab_size,
    # n_groups, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple,
    # tie_embeddings, model_type "mamba"; every other size is a mamba_ssm Mamba2 default.
    if config.get("model_type", "mamba") != "mamba":
        raise ConfigError(f"field 'model_type' is {config['model_type']!r}: only Mistral's Mamba "
                          "params.json ('mamba') is supported")
    if not config.get("rms_norm", True):
        raise ConfigError("field 'rms_norm' is false: LayerNorm models are not supported")
    return ModelConfig(
        arch="mamba2",
        d_model=_require(config, "dim"),
        n_layer=_require(config, "n_layers"),
        vocab_size=_padded_vocab(_require(config, "vocab_size"),
                                 config.get("pad_vocab_size_multiple", 1)),
        d_state=config.get("d_state", 128),
        head_dim=config.get("head_dim", 64),
        n_groups=config.get("n_groups", 1),
        chunk_size=config.get("chunk_size", 256),
        norm_eps=config.get("norm_eps", 1e-5),
        residual_in_fp32=config.get("residual_in_fp32", True),
        tie_embeddings=config.get("tie_embeddings", False),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
