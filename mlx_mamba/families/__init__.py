"""Hybrid checkpoint families: each module reads its transformers config into a ModelConfig and
maps its tensor names to and from this package's one layer stack.

The stack's names (models/model.py): `backbone.embeddings`, `backbone.layers.{i}.norm`, `.mixer`
(Mamba, attention, MLP or MoE), `.ffn_norm` and `.ffn` (the feed-forward after the mixer, if
any), `backbone.norm_f`, `lm_head`. MoE parts: `router`, `score_bias`, `experts.{gate,up,down}_proj`
(stacked over experts), `shared_experts`. A family module has:
- `read_config(dict) -> ModelConfig`
- `to_model_names(weights) -> weights` and `to_checkpoint_names(weights, config) -> weights`,
  inverse to each other, so that converted models keep the family's transformers names.
"""

import re

import mlx.core as mx

from ..checkpoint import CheckpointError
from ..config import ConfigError, get


def rename(weights, prefixes):
    """weights with names starting with one of `prefixes` [(old, new)] rewritten; `{i}` in a
    prefix stands for a layer index. The first matching pair wins."""
    compiled = [(re.compile(re.escape(old).replace(r"\{i\}", r"(\d+)")), new)
                for old, new in prefixes]
    renamed = {}
    for name, value in weights.items():
        for pattern, new in compiled:
            match = pattern.match(name)
            if match:
                index = match.groups()[0] if match.groups() else ""
                name = new.replace("{i}", index) + name[match.end():]
                break
        renamed[name] = value
    return renamed


def swapped(prefixes):
    return [(new, old) for old, new in prefixes]


def mixer_names(weights, config, kind_names):
    """Checkpoint names of the stack's `backbone.layers.{i}.mixer.` tensors, which a family
    names after the layer kind: kind_names maps a kind to its prefix, `{i}` for the index."""
    renamed = {}
    for name, value in weights.items():
        match = re.match(r"backbone\.layers\.(\d+)\.mixer\.", name)
        if match:
            i = match.group(1)
            prefix = kind_names[config.layer_type(int(i))].replace("{i}", i)
            name = prefix + name[match.end():]
        renamed[name] = value
    return renamed


def split_rows(weights, packed, parts):
    """Replace each tensor named `*{packed}.{suffix}` by halves along its output rows (axis -2
    for stacked experts, 0 otherwise), named `*{part}.{suffix}` for part in `parts`."""
    result = {}
    for name, value in weights.items():
        match = re.match(rf"(.*){re.escape(packed)}\.(\w+)$", name)
        if not match:
            result[name] = value
            continue
        axis = 0 if value.ndim < 3 else -2
        for part, half in zip(parts, mx.split(value, len(parts), axis=axis)):
            result[f"{match.group(1)}{part}.{match.group(2)}"] = half
    return result


def join_rows(weights, parts, packed):
    """The inverse of `split_rows`."""
    result, groups = {}, {}
    for name, value in weights.items():
        match = re.match(rf"(.*)({'|'.join(map(re.escape, parts))})\.(\w+)$", name)
        if not match:
            result[name] = value
            continue
        groups.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
    for (prefix, suffix), halves in groups.items():
        axis = 0 if halves[parts[0]].ndim < 3 else -2
        # (A lone half only comes from naming one tensor in a message.)
        result[f"{prefix}{packed}.{suffix}"] = mx.concatenate(
            [halves[p] for p in parts if p in halves], axis)
    return result


EXPERT = re.compile(r"(.*\.experts\.)(\d+)\.(\w+)\.(\w+)$")  # one expert's tensor
STACKED = re.compile(r"(.*\.experts\.)(gate_proj|up_proj|down_proj)\.(\w+)$")  # all experts'


def stack_experts(weights, n_experts):
    """Per-expert tensors `experts.{e}.{proj}.{w}` stacked into `experts.{proj}.{w}`; every
    expert of 0 .. n_experts - 1 must be there, and no other. Run on the checkpoint's names, so
    that a message names the tensor as the checkpoint does."""
    weights, experts = dict(weights), {}
    for name in [n for n in weights if EXPERT.match(n)]:
        prefix, e, proj, suffix = EXPERT.match(name).groups()
        experts.setdefault((prefix, proj, suffix), {})[int(e)] = weights.pop(name)
    count = f"{n_experts} experts" if n_experts else "no mixture-of-experts layers"
    for (prefix, proj, suffix), parts in experts.items():
        missing = sorted(set(range(n_experts)) - set(parts))
        extra = sorted(set(parts) - set(range(n_experts)))
        if missing or extra:
            problem = "missing" if missing else "unexpected"
            raise CheckpointError(f"{problem} tensor "
                                  f"'{prefix}{(missing or extra)[0]}.{proj}.{suffix}': the "
                                  f"config has {count}")
        weights[f"{prefix}{proj}.{suffix}"] = mx.stack([parts[e] for e in range(n_experts)])
    return weights


def unstack_experts(weights):
    """The inverse of `stack_experts`."""
    result = {}
    for name, value in weights.items():
        match = STACKED.match(name)
        if match:
            prefix, proj, suffix = match.groups()
            result.update({f"{prefix}{e}.{proj}.{suffix}": value[e] for e in range(len(value))})
        else:
            result[name] = value
    return result


def attention_fields(config):
    """The attention sizes every family spells the same way."""
    heads = get(config, "num_attention_heads")
    hidden = get(config, "hidden_size")
    head_dim = get(config, "head_dim", None) or hidden // heads
    return dict(attn_heads=heads, attn_kv_heads=get(config, "num_key_value_heads", heads),
                attn_head_dim=get({"head_dim": head_dim}, "head_dim"),
                attn_bias=get(config, "attention_bias", False, "bool"))


def rope_theta(config):
    """RoPE's base from `rope_parameters` (transformers 5) or `rope_theta` (older configs);
    only the default (unscaled) RoPE is supported."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'rope_parameters' is {params!r}: expected an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"field 'rope_parameters.rope_type' is {kind!r}: only 'default' RoPE "
                          "is supported")
    if "rope_theta" in params:
        return get(params, "rope_theta", kind="positive_number", where="rope_parameters.")
    return get(config, "rope_theta", 10000.0, "positive_number")


def layer_kinds(names, aliases, field):
    """Map a family's per-layer names to the stack's kinds; unknown names are an error."""
    if not isinstance(names, (list, tuple)) or not names:
        raise ConfigError(f"field {field!r} is {names!r}: expected a list of layer types")
    kinds = []
    for i, name in enumerate(names):
        if name not in aliases:
            raise ConfigError(f"field {field!r}: layer {i} is {name!r}, expected one of "
                              f"{', '.join(sorted(aliases))}")
        kinds.append(aliases[name])
    return tuple(kinds)


from . import bamba, falcon_h1, granitemoehybrid, jamba, nemotron_h, zamba2  # noqa: E402

MODULES = {"bamba": bamba, "falcon_h1": falcon_h1, "granitemoehybrid": granitemoehybrid,
           "jamba": jamba, "nemotron_h": nemotron_h, "zamba2": zamba2}
FAMILIES = {name: module.read_config for name, module in MODULES.items()}
