"""How large a configured model is, estimated from its shapes alone, and the check that some
machine could hold it. (The exact counts and memory figures are `mlx_mamba.sizes`'s.)"""

from .config_fields import ConfigError

# A config may describe a model larger than this machine's memory (`mlx_mamba.info` describes
# it, convert streams the weights), never one that no machine could hold: that is a damaged or
# hostile config. The largest published checkpoints hold about 2 TB of weights.
MAX_WEIGHT_BYTES = 2 ** 42


def parameter_count(config):
    """{config field most responsible: parameters} of the model `config` describes, estimated
    from its largest shapes; for the size check."""
    D, E, N, K = config.d_model, config.d_inner, config.d_state, config.d_conv
    H, G = E // config.head_dim, config.n_groups
    R = config.mimo_rank if config.is_mimo else 1
    matrices = 2 if config.mlp_activation == "relu2" else 3  # squared ReLU has no gate
    attention = config.attn_heads * config.attn_head_dim * 2 * D \
        + config.attn_kv_heads * config.attn_head_dim * 2 * D
    per_kind = {
        "mamba1": 2 * E * D + E * K + (config.dt_rank + 2 * N) * E + config.dt_rank * E
                  + E * N + 3 * E + E * D,
        "mamba2": D * (2 * E + 2 * G * N + H) + (E + 2 * G * N) * K + E * D + 3 * H + E,
        "mamba3": D * (2 * E + 2 * G * N * R + 3 * H + N // 2) + E * D + 2 * H * R * N
                  + (3 * E * R if config.is_mimo else 0) + 2 * N + 2 * H + E,
        "attention": attention,
        "mlp": matrices * D * config.mlp_size,
        "moe": config.n_experts * (matrices * D * config.expert_size + D)
               + matrices * D * config.shared_expert_size,
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


def widest_bits(quantization):
    """The most bits any layer of a model quantized as `quantization` says has (16 unquantized):
    a mixed-precision model's per-module entries may exceed its default."""
    if not quantization:
        return 16
    return max([quantization["bits"]] + [entry["bits"] for entry in quantization.values()
                                          if isinstance(entry, dict)])


def check_memory(config):
    """Refuse a config whose model no machine could hold."""
    counts = parameter_count(config)
    bits = widest_bits(config.quantization)
    need = sum(counts.values()) * bits / 8
    if need > MAX_WEIGHT_BYTES:
        field = max(counts, key=counts.get)
        raise ConfigError(
            f"field {field!r} is {getattr(config, field)}: the model would take at least "
            f"{need / 1e9:,.0f} GB ({sum(counts.values()):,} parameters at {bits} bits), more "
            f"than any machine holds ({MAX_WEIGHT_BYTES / 1e12:.1f} TB)")
