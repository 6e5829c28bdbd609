"""Zyphra's Zamba2 (transformers `zamba2`): Mamba2 layers, some of which ("hybrid" in
`layers_block_type`) first add the output of a shared transformer block, fed with the residual
stream concatenated with the original embeddings. `num_mem_blocks` blocks take turns; each
invocation has its own low-rank adapters on the block's MLP (and on q, k, v with
`use_shared_attention_adapter`) and its own linear map into the Mamba input.

Checkpoints store each shared block once, under the first hybrid layer that invokes it
(`model.layers.{i}.shared_transformer.`), together with the adapters of every invocation of that
block (`..._adapter_list.{invocation}`); here the block is `backbone.blocks.{b}` and an
invocation's adapters belong to its layer, `backbone.layers.{i}.adapters`.
"""

import re

import mlx.core as mx

from ..checkpoint import CheckpointError
from ..config_fields import ConfigError, common_fields, get, layer_kinds, rope_theta
from ._names import join_rows, rename, split_rows, swapped

NAMES = [("model.embed_tokens.", "backbone.embeddings."),
         ("model.final_layernorm.", "backbone.norm_f."),
         ("model.layers.{i}.mamba_decoder.input_layernorm.", "backbone.layers.{i}.norm."),
         ("model.layers.{i}.mamba_decoder.mamba.", "backbone.layers.{i}.mixer."),
         ("model.layers.{i}.input_layernorm.", "backbone.layers.{i}.norm."),
         ("model.layers.{i}.mamba.", "backbone.layers.{i}.mixer."),
         ("model.layers.{i}.linear.", "backbone.layers.{i}.linear.")]
KINDS = {"mamba": "mamba2", "linear_attention": "mamba2", "hybrid": "hybrid"}
ADAPTER = re.compile(r"model\.layers\.\d+\.shared_transformer\."
                     r"(?:self_attn\.linear_(q|k|v)_adapter_list|feed_forward\.(gate_up)_proj_adapter_list)"
                     r"\.(\d+)\.([01])\.(\w+)$")
SHARED = re.compile(r"model\.layers\.(\d+)\.shared_transformer\.(.*)$")
ACTIVATIONS = ("gelu", "silu")
# Zyphra's configs written before transformers' port (their fork, transformers_version
# 4.43.0.dev0; Zyphra/Zamba2-7B's as vendored in public benchmarks) spell these fields so, and
# give the Mamba head size (`mamba_headdim`) instead of the head count.
FORK_NAMES = {"state_size": "mamba_d_state", "conv_dimension": "mamba_d_conv",
              "expansion_factor": "mamba_expand", "ffn_hidden_size": "intermediate_size",
              "lora_rank": "adapter_rank", "use_shared_attention_lora": "use_shared_attention_adapter"}


def _transformers_names(config):
    renamed = dict(config)
    for old, new in FORK_NAMES.items():
        if old in config and new not in config:
            renamed[new] = config[old]
    if "mamba_headdim" in config and "n_mamba_heads" not in config:
        width = get(renamed, "mamba_expand", 2) * get(config, "hidden_size")
        head_dim = get(config, "mamba_headdim")
        if width % head_dim:
            raise ConfigError(f"field 'mamba_headdim' is {head_dim}: it must divide "
                              f"'expansion_factor' * 'hidden_size' ({width})")
        renamed["n_mamba_heads"] = width // head_dim
    return renamed


def read_config(config):
    original, config = config, _transformers_names(config)
    hidden = get(config, "hidden_size")
    kinds = layer_kinds(config.get("layers_block_type") or config.get("layer_types"), KINDS,
                        "layers_block_type")
    if config.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ConfigError(f"field 'hidden_act' is {config['hidden_act']!r}: expected one of "
                          f"{', '.join(ACTIVATIONS)}")
    expand, heads = get(config, "mamba_expand", 2), get(config, "n_mamba_heads", 8)
    if expand * hidden % heads:
        raise ConfigError(f"field 'n_mamba_heads' is {heads}: it must divide 'mamba_expand' * "
                          f"'hidden_size' ({expand * hidden})")
    attention_heads = get(config, "num_attention_heads")
    kv_heads = get(config, "num_key_value_heads", attention_heads)
    adapters = get(config, "use_shared_attention_adapter", False, "bool")
    if adapters and kv_heads != attention_heads:
        raise ConfigError("field 'num_key_value_heads' must equal 'num_attention_heads' with "
                          "'use_shared_attention_adapter' (the adapters are as wide as q)")
    if 2 * hidden % attention_heads:
        raise ConfigError(f"field 'num_attention_heads' is {attention_heads}: it must divide "
                          f"2 * 'hidden_size' ({2 * hidden})")
    blocks = get(config, "num_mem_blocks", 1)
    return dict(
        family="zamba2", arch="mamba2", layer_types=kinds, d_model=hidden, n_layer=len(kinds),
        vocab_size=get(config, "vocab_size"), expand=expand, head_dim=expand * hidden // heads,
        d_state=get(config, "mamba_d_state", 64), d_conv=get(config, "mamba_d_conv", 4),
        n_groups=get(config, "mamba_ngroups", 1), chunk_size=get(config, "chunk_size", 256),
        # transformers bounds Δ below by time_step_min (there is no time_step_limit field).
        dt_limit=(get(config, "time_step_min", 0.001, "number"), float("inf")),
        conv_bias=True, bias=get(config, "add_bias_linear", False, "bool"),
        norm_eps=get(config, "rms_norm_eps", 1e-5, "positive_number"), gate_norm_eps=1e-5,
        residual_in_fp32=False, tie_embeddings=get(config, "tie_word_embeddings", True, "bool"),
        attn_heads=attention_heads, attn_kv_heads=kv_heads,
        attn_head_dim=2 * hidden // attention_heads,
        rope_theta=rope_theta(config) if get(config, "use_mem_rope", False, "bool") else None,
        mlp_size=get(config, "intermediate_size", None) or 4 * hidden,
        mlp_activation=config.get("hidden_act", "gelu"),
        shared_blocks=blocks, adapter_rank=get(config, "adapter_rank", 128),
        attention_adapters=adapters, mlp_bias=get(config, "add_bias_linear", False, "bool"),
        source_config=original, **common_fields(config))


def _invocations(config):
    """[(layer index, block)] of the hybrid layers in order, and each block's first layer."""
    hybrid = [i for i in range(config.n_layer) if config.layer_type(i) == "hybrid"]
    firsts = {}
    for k, i in enumerate(hybrid):
        firsts.setdefault(k % config.shared_blocks, i)
    return hybrid, firsts


def to_model_names(weights, config):
    hybrid, firsts = _invocations(config)
    block_of_layer = {i: b for b, i in firsts.items()}
    renamed, copies = {}, []
    for name, value in rename(weights, NAMES).items():
        adapter, shared = ADAPTER.match(name), SHARED.match(name)
        if adapter:
            part, mlp_part, k, which, suffix = adapter.groups()
            if int(k) >= len(hybrid):
                raise CheckpointError(f"tensor {name!r}: invocation {k}, but the config has "
                                      f"{len(hybrid)} hybrid layers")
            name = (f"backbone.layers.{hybrid[int(k)]}.adapters.{part or mlp_part}."
                    f"{('down', 'up')[int(which)]}.{suffix}")
        elif shared:
            layer, rest = int(shared.group(1)), shared.group(2)
            if layer not in hybrid:
                raise CheckpointError(f"unexpected tensor {name!r}: layer {layer} is not a "
                                      "hybrid layer")
            if layer not in block_of_layer:
                copies.append((name, layer, rest, value))
                continue
            name = f"backbone.blocks.{block_of_layer[layer]}.{rest}"
        renamed[name] = value
    for name, layer, rest, value in copies:
        # A block stored again at a later invocation must be the same block (transformers unties
        # them in untied-embedding configs, which would make them different models).
        first = renamed.get(f"backbone.blocks.{hybrid.index(layer) % config.shared_blocks}.{rest}")
        if first is None or first.shape != value.shape or not mx.array_equal(first, value).item():
            raise CheckpointError(f"tensor {name!r}: a shared block stored again with other "
                                  "values; the blocks of this checkpoint are not shared")
    return split_rows(renamed, "gate_up_proj", ("gate_proj", "up_proj"))


def to_checkpoint_names(weights, config):
    hybrid, firsts = _invocations(config)
    result = {}
    for name, value in join_rows(weights, ("gate_proj", "up_proj"), "gate_up_proj").items():
        block = re.match(r"backbone\.blocks\.(\d+)\.(.*)$", name)
        adapter = re.match(r"backbone\.layers\.(\d+)\.adapters\.(\w+)\.(down|up)\.(\w+)$", name)
        if block:
            name = f"model.layers.{firsts[int(block.group(1))]}.shared_transformer.{block.group(2)}"
        elif adapter:
            layer, part, which, suffix = adapter.groups()
            k = hybrid.index(int(layer))
            where = ("feed_forward.gate_up_proj_adapter_list" if part == "gate_up"
                     else f"self_attn.linear_{part}_adapter_list")
            name = (f"model.layers.{firsts[k % config.shared_blocks]}.shared_transformer."
                    f"{where}.{k}.{('down', 'up').index(which)}.{suffix}")
        result[name] = value
    hybrid_prefixes = [(new.replace("{i}", str(i)), old.replace("{i}", str(i)))
                       for i in hybrid for old, new in NAMES[2:4]]
    return rename(rename(result, hybrid_prefixes), swapped(NAMES[:2] + NAMES[4:]))

