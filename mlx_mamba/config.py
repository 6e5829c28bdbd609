"""One model configuration, parsed from every checkpoint flavour a user meets.

Sources: transformers `MambaConfig` / `Mamba2Config` / `FalconMambaConfig` JSON (`model_type`
mamba, mamba2, falcon_mamba), the original state-spaces `config.json` (`d_model` + `ssm_cfg`),
Mistral's `params.json` (Mamba-Codestral), and the hybrids' transformers configs, read by their
family modules in `mlx_mamba/families/`. `to_dict` writes the transformers form, which is what
convert.py saves and what mlx-lm reads.

A model is one stack of residual layers. `layer_types` names each layer's mixer ("mamba1",
"mamba2", "attention", "mlp", "moe", "parallel": Mamba2 and attention side by side, or
"hybrid": a Mamba2 layer whose input also gets a shared transformer block's output);
`ffn_types` names the feed-forward that follows it in the
same layer ("mlp", "moe", or "" for none). Pure Mamba models leave both empty.
"""

import dataclasses
import json
import math
from pathlib import Path


class ConfigError(ValueError):
    """A configuration this package cannot use; the message names the field."""


@dataclasses.dataclass
class ModelConfig:
    arch: str  # "mamba1", "mamba2" or "mamba3"
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # Mamba1 only
    head_dim: int = 64  # Mamba2 and Mamba-3
    n_groups: int = 1  # Mamba2 and Mamba-3
    chunk_size: int = 256  # Mamba2 and Mamba-3
    dt_limit: tuple = (0.0, math.inf)  # Mamba2 only
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    mixer_rms_eps: float | None = None  # Falcon-Mamba: weightless RMSNorm on dt, B and C
    mixer_rms_weights: bool = False  # Jamba: that RMSNorm has weights
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 0
    pad_token_id: int | None = 0
    quantization: dict | None = None
    # Hybrids (see the module docstring); the defaults describe a pure Mamba model.
    family: str = ""  # the transformers model_type of a hybrid, e.g. "nemotron_h"
    source_config: dict | None = None  # a hybrid's config.json, written back by to_dict
    layer_types: tuple = ()
    ffn_types: tuple = ()
    inner_size: int = 0  # Mamba2 width H * P when it is not expand * d_model (Nemotron-H)
    attn_heads: int = 0
    attn_kv_heads: int = 0
    attn_head_dim: int = 0
    attn_bias: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5
    rope_theta: float | None = None  # None: no positional encoding (NoPE)
    rope_dims: int = 0  # leading head dims rotated (partial rotary); 0: all
    mlp_size: int = 0
    mlp_activation: str = "silu"  # "silu": gated (gate, up, down); "relu2": squared ReLU, no gate
    mlp_bias: bool = False
    n_experts: int = 0
    top_k: int = 0
    expert_size: int = 0
    shared_expert_size: int = 0
    router: str = "softmax"  # expert scores: "softmax" over all experts, or "sigmoid" (grouped,
    # with a bias); the top-k scores are the weights, renormalised if router_normalize
    router_groups: int = 1
    router_topk_groups: int = 1
    router_normalize: bool = True
    router_scale: float = 1.0
    expert_latent_size: int = 0
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_multiplier: float = 1.0
    # Falcon-H1's µP: Mamba2 in_proj row factors (z, x, B, C, dt) and its gated-norm variant,
    # the parallel layer's input/output factors, attention's key factor, the MLP's (gate, down).
    ssm_multipliers: tuple = ()
    mamba_gate_norm: str = "after_gate"
    parallel_multipliers: tuple = (1.0, 1.0, 1.0, 1.0)  # (ssm in, ssm out, attention in, out)
    key_multiplier: float = 1.0
    mlp_multipliers: tuple = (1.0, 1.0)
    # Zamba2: "hybrid" layers invoke one of `shared_blocks` shared transformer blocks, in turn,
    # each invocation with adapters of rank `adapter_rank` (on q, k, v too with attention_adapters).
    shared_blocks: int = 0
    adapter_rank: int = 0
    attention_adapters: bool = False
    gate_norm_eps: float | None = None  # the Mamba2 gated norm's eps when not norm_eps
    # Mamba-3 (the official constructor's names; d_state, expand, head_dim, n_groups above).
    rope_fraction: float = 0.5
    A_floor: float = 1e-4
    is_outproj_norm: bool = False
    is_mimo: bool = False
    mimo_rank: int = 4
    A_activation: str = "heavy_tail"  # ours: "softplus" for the March 2026 release's checkpoints

    def shared_block(self, i):
        """Which shared block hybrid layer i invokes, and which invocation it is."""
        invocation = sum(self.layer_type(j) == "hybrid" for j in range(i))
        return invocation % self.shared_blocks, invocation

    @property
    def d_inner(self):
        return self.inner_size or self.expand * self.d_model

    def layer_type(self, i):
        return self.layer_types[i] if self.layer_types else self.arch

    def ffn_type(self, i):
        return self.ffn_types[i] if self.ffn_types else ""

    @property
    def kinds(self):
        """Every layer kind the model uses, mixers and feed-forwards."""
        kinds = {self.layer_type(i) for i in range(self.n_layer)}
        return kinds | {self.ffn_type(i) for i in range(self.n_layer)} - {""}

    @property
    def n_heads(self):
        return self.d_inner // self.head_dim

    @property
    def model_type(self):
        if self.family:
            return self.family
        if self.arch in ("mamba2", "mamba3"):
            return self.arch
        return "falcon_mamba" if self.mixer_rms_eps is not None else "mamba"

    def __post_init__(self):
        self.dt_limit = tuple(_as_float(v) for v in self.dt_limit)
        self._validate()

    def _validate(self):
        """Sizes that agree with each other and a model that fits in memory. Field types and
        ranges are checked where the config file is read (`get`), naming the file's field."""
        if self.arch not in ("mamba1", "mamba2", "mamba3"):
            raise ConfigError(f"arch {self.arch!r}: expected 'mamba1', 'mamba2' or 'mamba3'")
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                     "head_dim", "n_groups", "chunk_size"):
            value = getattr(self, name)
            if not is_integer(value) or value <= 0:
                raise ConfigError(f"field {name!r} is {value!r}: expected a positive integer")
        if self.n_layer > MAX_LAYERS:
            raise ConfigError(f"field 'n_layer' is {self.n_layer}: more than {MAX_LAYERS} layers "
                              "is not a real checkpoint")
        layers = [self.layer_type(i) for i in range(self.n_layer)]
        if self.layer_types and len(self.layer_types) != self.n_layer:
            raise ConfigError(f"the layer pattern has {len(self.layer_types)} layers, "
                              f"'num_hidden_layers' says {self.n_layer}")
        if "mamba1" in layers and self.dt_rank <= 0:
            raise ConfigError(f"field 'time_step_rank' is {self.dt_rank!r}: expected a positive "
                              "integer")
        if {"mamba2", "parallel", "hybrid", "mamba3"} & set(layers):
            if self.d_inner % self.head_dim:
                raise ConfigError(
                    f"field 'head_dim' is {self.head_dim}: it must divide the Mamba width "
                    f"{self.d_inner}")
            if self.n_heads % self.n_groups:
                raise ConfigError(
                    f"field 'n_groups' is {self.n_groups}: it must divide the number of heads "
                    f"({self.n_heads})")
            lo, hi = self.dt_limit
            if not 0.0 <= lo < hi:
                raise ConfigError(f"field 'time_step_limit' is {list(self.dt_limit)}: expected "
                                  "0 <= low < high")
        if "mamba3" in layers:
            _validate_mamba3(self)
        if {"attention", "parallel"} & set(layers) and self.attn_heads % max(self.attn_kv_heads, 1):
            raise ConfigError(f"field 'num_key_value_heads' is {self.attn_kv_heads}: it must divide "
                              f"'num_attention_heads' ({self.attn_heads})")
        if "moe" in self.kinds and not 0 < self.top_k <= self.n_experts:
            raise ConfigError(f"field 'num_experts_per_tok' is {self.top_k}: expected 1 to the "
                              f"number of experts ({self.n_experts})")
        if "moe" in self.kinds and (self.n_experts % self.router_groups
                                    or not 0 < self.router_topk_groups <= self.router_groups):
            raise ConfigError(f"fields 'n_group'/'topk_group' ({self.router_groups}, "
                              f"{self.router_topk_groups}): the groups must split the "
                              f"{self.n_experts} experts and 1 <= topk_group <= n_group")
        _check_memory(self)

    @classmethod
    def from_dict(cls, config):
        """Parse any supported flavour; unknown or contradictory fields raise ConfigError."""
        parse = {"transformers": _from_transformers, "state-spaces": _from_state_spaces,
                 "mistral": _from_mistral}[config_format(config)]
        return parse(config)

    def to_dict(self):
        """The transformers form of this config: a hybrid's own config.json, or the mamba, mamba2
        or falcon_mamba form."""
        if self.family:
            config = {k: v for k, v in self.source_config.items() if k != "quantization"}
            if self.quantization is not None:
                config["quantization"] = self.quantization
            return config
        if self.arch == "mamba3":
            return _to_state_spaces(self)
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


MAX_LAYERS = 10_000
# A config may describe a model larger than this machine's memory (`mlx_mamba.info` describes
# it, convert streams the weights), never one that no machine could hold: that is a damaged or
# hostile config. The largest published checkpoints hold about 2 TB of weights.
MAX_WEIGHT_BYTES = 2 ** 42


def parameter_estimate(config):
    """{config field most responsible: parameters}, an estimate from the config's largest shapes
    (the exact counts are `mlx_mamba.sizes.parameter_count`'s); for the size guard only."""
    D, E, N, K = config.d_model, config.d_inner, config.d_state, config.d_conv
    H, G = E // config.head_dim, config.n_groups
    R = config.mimo_rank if config.is_mimo else 1
    attention = config.attn_heads * config.attn_head_dim * 2 * D \
        + config.attn_kv_heads * config.attn_head_dim * 2 * D
    per_kind = {
        "mamba1": 2 * E * D + E * K + (config.dt_rank + 2 * N) * E + config.dt_rank * E
                  + E * N + 3 * E + E * D,
        "mamba2": D * (2 * E + 2 * G * N + H) + (E + 2 * G * N) * K + E * D + 3 * H + E,
        "mamba3": D * (2 * E + 2 * G * N * R + 3 * H + N // 2) + E * D + 2 * H * R * N
                  + (3 * E * R if config.is_mimo else 0) + 2 * N + 2 * H + E,
        "attention": attention,
        "mlp": 3 * D * config.mlp_size,
        "moe": config.n_experts * (3 * D * config.expert_size + D)
               + 3 * D * config.shared_expert_size,
        "parallel": 0,
        "hybrid": 0,
        "": 0,
    }
    per_kind["parallel"] = per_kind["mamba2"] + per_kind["attention"]
    per_kind["hybrid"] = per_kind["mamba2"] + D * D + 2 * config.adapter_rank * 8 * D
    layers = sum(per_kind[config.layer_type(i)] + per_kind[config.ffn_type(i)] + 2 * D
                 for i in range(config.n_layer))
    layers += config.shared_blocks * (per_kind["attention"] * 2 + per_kind["mlp"])
    embedding = config.vocab_size * D * (1 if config.tie_embeddings else 2)
    return {"vocab_size": embedding, "n_layer": layers}


def _check_memory(config):
    counts = parameter_estimate(config)
    bits = (config.quantization or {}).get("bits", 16)
    need = sum(counts.values()) * bits / 8
    if need > MAX_WEIGHT_BYTES:
        field = max(counts, key=counts.get)
        raise ConfigError(
            f"field {field!r} is {getattr(config, field)}: the model would take at least "
            f"{need / 1e9:,.0f} GB ({sum(counts.values()):,} parameters at {bits} bits), more "
            f"than any machine holds ({MAX_WEIGHT_BYTES / 1e12:.1f} TB)")


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


def _as_float(value, name="time_step_limit"):
    # transformers writes infinity as {"__float__": "Infinity"}; plain JSON writers as Infinity.
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    if isinstance(value, bool):
        raise ConfigError(f"field {name!r} holds {value!r}: expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"field {name!r} holds {value!r}: expected a number") from None


def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


REQUIRED = object()


def get(config, name, default=REQUIRED, kind="positive", where=""):
    """config[name] (or `default` when absent), checked to be of `kind`: "positive" or "count"
    (an int > 0 or >= 0), "number" (finite or infinite float), "positive_number", "bool", "text",
    "ids" (token ids: an int, a list of ints or null). The error names the field."""
    label = where + name
    if name not in config:
        if default is REQUIRED:
            raise ConfigError(f"missing field {label!r}")
        return default
    value = config[name]
    if value is None and kind != "ids" and default is not REQUIRED:
        return default  # configs spell some unset fields as null
    if kind in ("positive", "count"):
        if not is_integer(value) or value < (1 if kind == "positive" else 0):
            raise ConfigError(f"field {label!r} is {value!r}: expected "
                              f"{'a positive' if kind == 'positive' else 'a non-negative'} integer")
    elif kind in ("number", "positive_number"):
        value = _as_float(value, label)
        if value != value or (kind == "positive_number" and not value > 0):
            raise ConfigError(f"field {label!r} is {config[name]!r}: expected a "
                              f"{'positive ' if kind == 'positive_number' else ''}number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"field {label!r} is {value!r}: expected true or false")
    elif kind == "text":
        if not isinstance(value, str):
            raise ConfigError(f"field {label!r} is {value!r}: expected a string")
    elif kind == "ids":
        items = value if isinstance(value, list) else [value]
        if not all(v is None or (is_integer(v) and v >= 0) for v in items):
            raise ConfigError(f"field {label!r} is {value!r}: expected token ids")
    return value


def dt_limit(config, name="time_step_limit", where=""):
    """A (low, high) pair of Δ bounds, infinity spelled either way."""
    value = config.get(name, (0.0, math.inf))
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"field {where + name!r} is {value!r}: expected [low, high]")
    return tuple(_as_float(v, where + name) for v in value)


def quantization(config):
    """The checked `quantization` block of a converted model's config, or None."""
    block = config.get("quantization")
    if block is None:
        return None
    from .quantize import QuantizationError, quantization_params

    if not isinstance(block, dict) or not {"group_size", "bits"} <= set(block):
        raise ConfigError(f"field 'quantization' is {block!r}: expected {{\"group_size\", "
                          "\"bits\", \"mode\"}")
    try:
        return quantization_params(block["bits"], block["group_size"], block.get("mode", "affine"))
    except QuantizationError as e:
        raise ConfigError(f"field 'quantization': {e}") from None


def common_fields(config):
    """Token ids and quantization, shared by every transformers flavour."""
    tokens = {k: get(config, k, None, "ids") for k in ("bos_token_id", "eos_token_id",
                                                        "pad_token_id") if k in config}
    return dict(quantization=quantization(config), **tokens)


def _from_transformers(config):
    model_type = config["model_type"]
    if model_type in FAMILIES:
        return FAMILIES[model_type](config)
    if model_type not in ("mamba", "mamba2", "falcon_mamba"):
        raise ConfigError(
            f"field 'model_type' is {model_type!r}: expected one of mamba, mamba2, falcon_mamba, "
            f"{', '.join(FAMILIES)}")
    d_model = get(config, "hidden_size")
    expand = get(config, "expand", 2)
    common = dict(
        d_model=d_model,
        n_layer=get(config, "num_hidden_layers"),
        vocab_size=get(config, "vocab_size"),
        d_conv=get(config, "conv_kernel", 4),
        expand=expand,
        conv_bias=get(config, "use_conv_bias", True, "bool"),
        bias=get(config, "use_bias", False, "bool"),
        norm_eps=get(config, "layer_norm_epsilon", 1e-5, "positive_number"),
        residual_in_fp32=get(config, "residual_in_fp32", True, "bool"),
        **common_fields(config),
    )
    if model_type == "mamba2":
        head_dim = get(config, "head_dim", 64)
        heads = get(config, "num_heads", max(expand * d_model // head_dim, 1))
        if heads * head_dim != expand * d_model:
            raise ConfigError(
                f"fields 'num_heads' * 'head_dim' ({heads} * {head_dim}) must equal "
                f"'expand' * 'hidden_size' ({expand} * {d_model})")
        return ModelConfig(
            arch="mamba2", d_state=get(config, "state_size", 128), head_dim=head_dim,
            n_groups=get(config, "n_groups", 8), chunk_size=get(config, "chunk_size", 256),
            dt_limit=dt_limit(config),
            tie_embeddings=get(config, "tie_word_embeddings", False, "bool"), **common)
    # The width is intermediate_size when the config has one, as in transformers: the published
    # tiiuae/falcon-mamba-7b config.json says expand 16 beside intermediate_size 8192 (2 * 4096).
    inner = get(config, "intermediate_size", expand * d_model)
    if inner % d_model:
        raise ConfigError(
            f"field 'intermediate_size' ({inner}) must be a multiple of 'hidden_size' ({d_model})")
    common["expand"] = inner // d_model
    rank = config.get("time_step_rank", "auto")
    return ModelConfig(
        arch="mamba1", d_state=get(config, "state_size", 16),
        dt_rank=math.ceil(d_model / 16) if rank == "auto" else get(config, "time_step_rank"),
        mixer_rms_eps=get(config, "mixer_rms_eps", 1e-6, "positive_number")
        if model_type == "falcon_mamba" else None,
        tie_embeddings=get(config, "tie_word_embeddings", True, "bool"), **common)


def _padded_vocab(vocab_size, multiple):
    return -(-vocab_size // multiple) * multiple if multiple and multiple > 1 else vocab_size


def _from_state_spaces(config):
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
        vocab_size=_padded_vocab(get(config, "vocab_size"),
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
        result = _mamba3_from_ssm_cfg(ssm, common)
    elif layer == "Mamba1":
        rank = ssm.pop("dt_rank", "auto")
        result = ModelConfig(arch="mamba1", d_state=get(ssm, "d_state", 16, where=where),
                             dt_rank=math.ceil(d_model / 16) if rank == "auto"
                             else get({"dt_rank": rank}, "dt_rank", where=where), **common)
    else:
        if ssm.pop("d_ssm", None) not in (None, expand * d_model):
            raise ConfigError("field 'ssm_cfg.d_ssm': a partial SSM width is not supported")
        if not ssm.pop("rmsnorm", True) or ssm.pop("norm_before_gate", False):
            raise ConfigError(
                "fields 'ssm_cfg.rmsnorm'/'ssm_cfg.norm_before_gate': only the gated RMSNorm "
                "after the gate is supported")
        result = ModelConfig(
            arch="mamba2", d_state=get(ssm, "d_state", 128, where=where),
            head_dim=get(ssm, "headdim", 64, where=where),
            n_groups=get(ssm, "ngroups", 1, where=where),
            chunk_size=get(ssm, "chunk_size", 256, where=where),
            dt_limit=dt_limit(ssm, "dt_limit", where), **common)
    _check_ssm_leftovers(ssm)
    return result


def _mamba3_from_ssm_cfg(ssm, common):
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
    return ModelConfig(arch="mamba3", **fields, **common)


def _validate_mamba3(config):
    if config.rope_fraction not in (0.5, 1.0):
        raise ConfigError(f"field 'ssm_cfg.rope_fraction' is {config.rope_fraction!r}: expected "
                          "0.5 or 1.0")
    if config.d_state % 2 or config.d_state * config.rope_fraction < 2:
        raise ConfigError(f"field 'ssm_cfg.d_state' is {config.d_state}: Mamba-3 rotates its "
                          f"state in pairs, so it must be even, with at least one pair rotated "
                          f"(rope_fraction {config.rope_fraction})")
    rank = config.mimo_rank if config.is_mimo else 1
    rows = 2 * config.d_inner + 2 * config.d_state * config.n_groups * rank + 3 * config.n_heads
    if (rows + config.d_state) * config.d_model >= 2 ** 31:
        raise ConfigError(f"fields 'ssm_cfg.d_state', 'ngroups', 'mimo_rank', 'expand' "
                          f"({config.d_state}, {config.n_groups}, {rank}, {config.expand}): "
                          "Mamba-3's in_proj would exceed MLX's 2**31 elements per array")
    if not 0 <= config.A_floor < math.inf:
        raise ConfigError(f"field 'ssm_cfg.A_floor' is {config.A_floor!r}: expected a "
                          "non-negative number")
    if config.A_activation not in ("heavy_tail", "softplus"):
        raise ConfigError(f"field 'ssm_cfg.A_activation' is {config.A_activation!r}: expected "
                          "'heavy_tail' or 'softplus'")


def _to_state_spaces(config):
    """A Mamba-3 model's config in the state-spaces form, the only one it has."""
    ssm_cfg = {"layer": "Mamba3", "d_state": config.d_state, "expand": config.expand,
               "headdim": config.head_dim, "ngroups": config.n_groups,
               "rope_fraction": config.rope_fraction, "A_floor": config.A_floor,
               "is_outproj_norm": config.is_outproj_norm, "is_mimo": config.is_mimo,
               "mimo_rank": config.mimo_rank, "chunk_size": config.chunk_size,
               "A_activation": config.A_activation}
    result = {"d_model": config.d_model, "n_layer": config.n_layer,
              "vocab_size": config.vocab_size, "ssm_cfg": ssm_cfg, "rms_norm": True,
              "residual_in_fp32": config.residual_in_fp32, "norm_epsilon": config.norm_eps,
              "pad_vocab_size_multiple": 1, "tie_embeddings": config.tie_embeddings,
              "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
              "pad_token_id": config.pad_token_id}
    if config.quantization is not None:
        result["quantization"] = config.quantization
    return result


# Fields of ssm_cfg that only matter for initialisation or for the CUDA implementation, or that
# were read above.
_IGNORED_SSM_FIELDS = {
    "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "use_fast_path",
    "layer_idx", "D_has_hdim", "activation", "sequence_parallel", "use_mem_eff_path",
    "process_group", "dt_limit", "d_state", "headdim", "ngroups", "chunk_size",
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
    if not get(config, "rms_norm", True, "bool"):
        raise ConfigError("field 'rms_norm' is false: LayerNorm models are not supported")
    return ModelConfig(
        arch="mamba2",
        d_model=get(config, "dim"),
        n_layer=get(config, "n_layers"),
        vocab_size=_padded_vocab(get(config, "vocab_size"),
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


from .families import FAMILIES  # noqa: E402  (the families build ModelConfigs with the helpers above)
