"""NVIDIA's Nemotron-H and Nemotron 3 (transformers `nemotron_h`): one mixer per layer, Mamba2,
attention (no positional encoding), squared-ReLU MLP or mixture of experts, in the order of
`layers_block_type` or the hub's `hybrid_override_pattern` ("M" Mamba2, "*" attention, "-" MLP,
"E" MoE). The experts are squared-ReLU MLPs routed by sigmoid scores plus a correction bias,
top-k within the best groups, with a shared expert and an optional latent projection."""

from ..config_fields import (ConfigError, attention_fields, common_fields, dt_limit, get,
                             layer_kinds)
from ._names import rename, stack_experts, swapped, unstack_experts

NAMES = [("backbone.layers.{i}.mixer.gate.e_score_correction_bias",
          "backbone.layers.{i}.mixer.score_bias"),
         ("backbone.layers.{i}.mixer.gate.", "backbone.layers.{i}.mixer.router."),
         ("backbone.layers.{i}.mixer.fc1_latent_proj.", "backbone.layers.{i}.mixer.latent_in."),
         ("backbone.layers.{i}.mixer.fc2_latent_proj.", "backbone.layers.{i}.mixer.latent_out.")]
KINDS = {"linear_attention": "mamba2", "mamba": "mamba2", "full_attention": "attention",
         "attention": "attention", "mlp": "mlp", "moe": "moe"}
PATTERN = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe"}
# Older hub configs spell some fields with a mamba_ prefix.
ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
           "mamba_dt_limit": "time_step_limit", "mamba_conv_bias": "use_conv_bias",
           "mamba_chunk_size": "chunk_size", "attention_head_dim": "head_dim"}
HEAD_DIM = 128  # transformers' default when a config names none (not hidden / heads)


def _kinds(config):
    if config.get("layers_block_type") or config.get("layer_types"):
        field = "layers_block_type" if config.get("layers_block_type") else "layer_types"
        return layer_kinds(config[field], KINDS, field)
    pattern = config.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("missing field 'layers_block_type' (or 'hybrid_override_pattern')")
    return layer_kinds(list(pattern), PATTERN, "hybrid_override_pattern")


def read_config(config):
    original, config = config, {"head_dim": HEAD_DIM,
                                **{ALIASES.get(k, k): v for k, v in config.items()}}
    kinds = _kinds(config)
    if config.get("mlp_hidden_act", "relu2") != "relu2":
        raise ConfigError(f"field 'mlp_hidden_act' is {config['mlp_hidden_act']!r}: expected 'relu2'")
    moe = "moe" in kinds
    heads, head_dim = get(config, "mamba_num_heads", 128), get(config, "mamba_head_dim", 64)
    shared = get(config, "n_shared_experts", 1, "count") if moe else 0
    return dict(
        family="nemotron_h", arch="mamba2", layer_types=kinds,
        d_model=get(config, "hidden_size"), n_layer=len(kinds),
        vocab_size=get(config, "vocab_size"),
        d_state=get(config, "ssm_state_size", 128), d_conv=get(config, "conv_kernel", 4),
        expand=get(config, "expand", 2), inner_size=heads * head_dim, head_dim=head_dim,
        n_groups=get(config, "n_groups", 8), chunk_size=get(config, "chunk_size", 128),
        # NVIDIA's own modeling code (and mamba_ssm's kernels) bound Δ by time_step_limit;
        # transformers' port clamps at time_step_min instead. Real checkpoints were trained and
        # are served with the former, so that is what is used here.
        dt_limit=dt_limit(config),
        conv_bias=get(config, "use_conv_bias", True, "bool"),
        bias=get(config, "use_bias", False, "bool"),
        norm_eps=get(config, "layer_norm_epsilon", 1e-5, "positive_number"),
        residual_in_fp32=get(config, "residual_in_fp32", False, "bool"),
        tie_embeddings=get(config, "tie_word_embeddings", False, "bool"),
        **dict(attention_fields(config), attn_bias=False),  # NemotronHAttention has no biases
        mlp_size=get(config, "intermediate_size") if "mlp" in kinds else 0,
        mlp_activation="relu2", mlp_bias=get(config, "mlp_bias", False, "bool"),
        n_experts=get(config, "n_routed_experts") if moe else 0,
        top_k=get(config, "num_experts_per_tok") if moe else 0,
        expert_size=get(config, "moe_intermediate_size") if moe else 0,
        shared_expert_size=shared * get(config, "moe_shared_expert_intermediate_size")
        if shared else 0,
        router="sigmoid", router_groups=get(config, "n_group", 1),
        router_topk_groups=get(config, "topk_group", 1),
        router_normalize=get(config, "norm_topk_prob", True, "bool"),
        router_scale=get(config, "routed_scaling_factor", 1.0, "number"),
        expert_latent_size=get(config, "moe_latent_size", 0, "count") if moe else 0,
        source_config=original, **common_fields(config))


def to_model_names(weights, config):
    return rename(stack_experts(weights, config.n_experts), NAMES)


def to_checkpoint_names(weights, config):
    return rename(unstack_experts(weights), swapped(NAMES))
