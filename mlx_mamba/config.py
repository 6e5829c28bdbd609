"""One model configuration, parsed from every checkpoint flavour a user meets.

Each flavour (transformers Mamba, Mamba2 and Falcon-Mamba, the state-spaces originals, Mistral's
params.json, the hybrids) is read by its module in `mlx_mamba/families/`; `to_dict` writes the
form that convert.py saves: a hybrid's own config.json, or the transformers form that mlx-lm
reads (the state-spaces one for Mamba-3).

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

from . import families
from .config_fields import MAX_LAYERS, ConfigError, as_float, is_integer
from .model_size import check_memory


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
        self.dt_limit = tuple(as_float(v) for v in self.dt_limit)
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
        check_memory(self)

    @classmethod
    def from_dict(cls, config):
        """Parse any supported flavour; unknown or contradictory fields raise ConfigError."""
        parsed = cls(**families.read_fields(config))
        if parsed.quantization and families.names_modules(parsed):  # to this package's paths
            parsed.quantization = families.quantization_paths(
                parsed.quantization, families.to_model_names, parsed)
        return parsed

    def to_dict(self):
        """The config.json of this model as convert.py writes it (see `families.write_config`)."""
        return families.write_config(self)


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
