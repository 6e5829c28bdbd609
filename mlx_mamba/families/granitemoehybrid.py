"""IBM's Granite 4.0-H (transformers `granitemoehybrid`): Mamba2 and attention layers
(`layer_types`), each followed by a gated SiLU MLP (`shared_mlp`) and, in the MoE variants, a
mixture of experts (`block_sparse_moe`) added to it; attention without positions (NoPE) unless
`position_embedding_type` is "rope"; µP-style multipliers on the embedding, the residual
branches, the attention scores and the logits."""

import mlx.core as mx

from ..config_fields import ConfigError, get, layer_kinds, rope_theta
from ._names import join_rows, mixer_names, rename, split_rows, swapped
from .bamba import KINDS, mamba2_fields

COMMON = [("model.embed_tokens.", "backbone.embeddings."),
          ("model.layers.{i}.input_layernorm.", "backbone.layers.{i}.norm."),
          ("model.layers.{i}.mamba.", "backbone.layers.{i}.mixer."),
          ("model.layers.{i}.self_attn.", "backbone.layers.{i}.mixer."),
          ("model.layers.{i}.post_attention_layernorm.", "backbone.layers.{i}.ffn_norm."),
          ("model.norm.", "backbone.norm_f.")]
# A dense model's shared MLP is the whole feed-forward; an MoE model's is its shared expert.
DENSE = COMMON + [("model.layers.{i}.shared_mlp.", "backbone.layers.{i}.ffn.")]
MOE = COMMON + [("model.layers.{i}.shared_mlp.", "backbone.layers.{i}.ffn.shared_experts."),
                ("model.layers.{i}.block_sparse_moe.router.layer.",
                 "backbone.layers.{i}.ffn.router.")]
EXPERTS = [("model.layers.{i}.block_sparse_moe.", "backbone.layers.{i}.ffn.experts.")]
# mlx-lm's layout (its model's names, which its quantized files and mlx-community's hold): a
# dense model's MLP split into `mlp.{gate,up,down}_proj`, the experts `switch_mlp.*_proj`; the
# MoE shared expert stays packed, as in transformers.
MLX_LM_DENSE = COMMON + [("model.layers.{i}.mlp.", "backbone.layers.{i}.ffn.")]
MLX_LM_EXPERTS = [("model.layers.{i}.block_sparse_moe.switch_mlp.",
                   "backbone.layers.{i}.ffn.experts.")]
MLX_LM_LAYOUT = True  # for quantized checkpoints (see `to_checkpoint_names`)
MIXERS = {"mamba2": "model.layers.{i}.mamba.", "attention": "model.layers.{i}.self_attn."}
# The packed projections: rows [gate; up] in `input_linear`, `output_linear` is down.
PACKED, PARTS = "input_linear", ("gate_proj", "up_proj")


def read_config(config):
    n_layer = get(config, "num_hidden_layers", kind="layers")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"field 'hidden_act' is {config['hidden_act']!r}: expected 'silu'")
    kinds = layer_kinds(config.get("layer_types") or config.get("layers_block_type")
                        or ["mamba"] * n_layer, KINDS, "layer_types")
    position = config.get("position_embedding_type")
    if position not in (None, "nope", "rope"):
        raise ConfigError(f"field 'position_embedding_type' is {position!r}: expected 'rope' "
                          "or null")
    experts = get(config, "num_local_experts", 0, "count")
    fields = mamba2_fields(config)
    return dict(
        family="granitemoehybrid", layer_types=kinds,
        ffn_types=("moe" if experts else "mlp",) * n_layer,
        rope_theta=rope_theta(config) if position == "rope" else None,
        attn_scale=get(config, "attention_multiplier", 1.0, "positive_number"),
        mlp_size=get(config, "shared_intermediate_size"),
        n_experts=experts, top_k=get(config, "num_experts_per_tok", 0, "count") if experts else 0,
        expert_size=get(config, "intermediate_size") if experts else 0,
        shared_expert_size=get(config, "shared_intermediate_size") if experts else 0,
        router="softmax",
        embedding_multiplier=get(config, "embedding_multiplier", 1.0, "number"),
        residual_multiplier=get(config, "residual_multiplier", 1.0, "number"),
        logits_multiplier=1 / get(config, "logits_scaling", 1.0, "positive_number"), **fields)


def _names(config, mlx_lm):
    if not config.n_experts:
        return MLX_LM_DENSE if mlx_lm else DENSE
    return MOE + (MLX_LM_EXPERTS if mlx_lm else EXPERTS)


def to_model_names(weights, config):
    """Either layout, transformers' or mlx-lm's, float or quantized."""
    # mlx-lm's prefixes first: the first that matches wins, and `switch_mlp.` is inside
    # transformers' `block_sparse_moe.`.
    weights = rename(weights, _names(config, mlx_lm=True) + _names(config, mlx_lm=False))
    weights = split_rows(weights, PACKED, PARTS)
    weights = {name.replace(".output_linear.", ".down_proj."): v for name, v in weights.items()}
    return dequantize_router(weights, config)


def dequantize_router(weights, config):
    """The router of an mlx-lm quantization (8 bits) in full precision, as this package keeps it
    (see quantize.py) and routes with it; mlx-lm too computes with the dequantized weights."""
    if not config.quantization:  # then scales are unexpected tensors, and named so
        return weights
    for name in [n for n in weights if n.endswith(".router.scales")]:
        path = name[: -len(".scales")]
        settings = config.quantization.get(path, config.quantization)
        weights[f"{path}.weight"] = mx.dequantize(
            weights[f"{path}.weight"], weights.pop(name), weights.pop(f"{path}.biases", None),
            settings["group_size"], settings["bits"], mode=settings.get("mode", "affine"))
    return weights


def to_checkpoint_names(weights, config):
    """transformers' layout for a float model; mlx-lm's for a quantized one, which transformers
    cannot read anyway and which mlx-lm's sanitize reads only in its own layout (it splits the
    packed MLP weight, not its scales and biases)."""
    mlx_lm = bool(config.quantization)

    def packs(name):  # whether the layout packs this tensor's MLP
        return not mlx_lm or ".shared_experts." in name

    kept = {n: v for n, v in weights.items() if not packs(n)}
    packed = {n.replace(".down_proj.", ".output_linear."): v for n, v in weights.items()
              if packs(n)}
    weights = mixer_names({**kept, **join_rows(packed, PARTS, PACKED)}, config, MIXERS)
    return rename(weights, swapped(_names(config, mlx_lm)))
