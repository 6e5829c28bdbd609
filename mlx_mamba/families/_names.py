"""Tensor-name maps shared by the family modules: renaming by prefix, splitting packed
projections into rows and stacking per-expert tensors, each with its inverse."""

import re

import mlx.core as mx

from ..checkpoint import CheckpointError


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
