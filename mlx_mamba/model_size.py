"""How large a configured model is, counted from its shapes alone, and the check that this
machine could hold it."""

import os

from .config_fields import ConfigError

# A config may describe a model a few times larger than memory (convert streams the weights),
# never one that could not be held at all: that is a damaged or hostile config.
MEMORY_FACTOR = 16


def parameter_count(config):
    """{config field most responsible: parameters} of the model `config` describes; shapes only."""
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


def check_memory(config):
    """Refuse a config whose model could not be held in this machine's memory at all."""
    counts = parameter_count(config)
    bits = (config.quantization or {}).get("bits", 16)
    need = sum(counts.values()) * bits / 8
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > MEMORY_FACTOR * memory:
        field = max(counts, key=counts.get)
        raise ConfigError(
            f"field {field!r} is {getattr(config, field)}: the model would take at least "
            f"{need / 1e9:,.0f} GB ({sum(counts.values()):,} parameters at {bits} bits), "
            f"{MEMORY_FACTOR}x more than this machine's {memory / 1e9:.0f} GB of memory")
