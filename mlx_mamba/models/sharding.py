"""Tensor parallel pieces shared by every layer kind: which part of a count each rank holds, the
slices of a tensor that make its shard, and the one communication (a sum over the group).

A layer's `shard(group)` returns its plan, {parameter name: (axis, ranges)}: the rank keeps the
rows [start, stop) of each range along that axis, concatenated. The same plan slices a loaded
model in place (`Model.shard`) or says which bytes to read from a file (`sharded_load`).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


class ShardingError(ValueError):
    """A world size that does not divide what must be split; the message names the field, its
    value and the world size."""


def share(count, group, field):
    """(start, stop): this rank's contiguous, equal share of `count` items (heads, channels)."""
    size = group.size()
    if count % size:
        raise ShardingError(f"{field} is {count}, which the world size {size} does not divide")
    part = count // size
    return group.rank() * part, (group.rank() + 1) * part


def readers_share(members, readers, group, field):
    """(start, stop): the `readers` (B/C groups, KV heads) that this rank's share of `members`
    (heads, query heads) reads, member m reading reader m // (members / readers). Split when the
    world size divides their count; else, when it is a multiple of it, each rank's members all
    read one reader, which every rank holds that needs it."""
    size = group.size()
    if readers % size == 0:
        return share(readers, group, field)
    if size % readers == 0:
        reader = group.rank() // (size // readers)
        return reader, reader + 1
    raise ShardingError(f"{field} is {readers}: the world size {size} neither divides it nor is "
                        "a multiple of it")


def balanced_ranges(sizes, parts, field):
    """Bounds [0, b1, ..., len(sizes)] of `parts` contiguous, non-empty ranges of items whose
    sizes sum as evenly as the items allow: each bound is the one nearest to its share."""
    if len(sizes) < parts:
        raise ShardingError(f"{field} is {len(sizes)}, fewer than the world size {parts}")
    before = [0]
    for size in sizes:
        before.append(before[-1] + size)
    bounds = [0]
    for k in range(1, parts):
        target = before[-1] * k / parts
        candidates = range(bounds[-1] + 1, len(sizes) - (parts - k) + 1)
        bounds.append(min(candidates, key=lambda b: abs(before[b] - target)))
    return bounds + [len(sizes)]


def shifted(ranges, offset):
    return [(start + offset, stop + offset) for start, stop in ranges]


def take(array, axis, ranges):
    """The rows `ranges` of `array` along `axis`, concatenated, in a buffer of their own (a view
    would keep the whole tensor alive)."""
    index = [slice(None)] * array.ndim
    parts = []
    for start, stop in ranges:
        index[axis] = slice(start, stop)
        parts.append(array[tuple(index)])
    return mx.contiguous(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis))


def apply_plan(module, plan):
    """Slice `module`'s parameters as `plan` says, in place."""
    flat = dict(_flatten(module.parameters()))
    module.update(tree_unflatten([(name, take(flat[name], axis, ranges))
                                  for name, (axis, ranges) in plan.items()]))


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        yield prefix[:-1], tree
        return
    for key, value in items:
        yield from _flatten(value, f"{prefix}{key}.")


def prefixed(prefix, plan):
    return {f"{prefix}.{name}": entry for name, entry in plan.items()}


def _packing(module, name):
    """How many stored columns one input feature takes in `module`'s parameter `name`."""
    if not hasattr(module, "bits"):
        return 1
    return module.bits / 32 if name == "weight" else 1 / module.group_size


def rows_plan(module, ranges):
    """The plan keeping output rows `ranges` of a Linear, QuantizedLinear or stacked experts'
    linear (E, out, in): weight, scales and biases along their row axis, the bias with them."""
    return {name: (value.ndim - 1 if name == "bias" else value.ndim - 2, ranges)
            for name, value in module.parameters().items()}


def columns_plan(module, ranges, group, field):
    """The plan keeping input columns `ranges` (in input features) of such a linear; quantized
    weights, scales and biases in their packed units. A bias stays whole (added once, after the
    sum). A share that splits a quantization group is an error."""
    group_size = getattr(module, "group_size", 1)
    for start, stop in ranges:
        if start % group_size or stop % group_size:
            raise ShardingError(
                f"{field}: its {(stop - start) * group.size()} inputs over the world size "
                f"{group.size()} leave {stop - start} per rank, not a multiple of the "
                f"quantization group size {group_size}")
    plan = {}
    for name, value in module.parameters().items():
        if name != "bias":
            unit = _packing(module, name)
            plan[name] = (value.ndim - 1, [(int(a * unit), int(b * unit)) for a, b in ranges])
    return plan


def sharded_to_all(linear, group):
    """`linear` (its columns already sliced) as MLX's layer that sums its outputs over the group
    and then adds the bias: the one communication of a row-split projection."""
    out_dims = linear.weight.shape[0]
    bias = "bias" in linear
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = linear.weight.shape[1] * 32 // linear.bits * group.size()
        layer = nn.QuantizedShardedToAllLinear(in_dims, out_dims, bias, linear.group_size,
                                               linear.bits, linear.mode, group)
    else:
        in_dims = linear.weight.shape[1] * group.size()
        layer = nn.ShardedToAllLinear(in_dims, out_dims, bias, group)
    layer.update(linear.parameters())
    return layer


def shard_output(parent, name, ranges, group, field):
    """Keep input columns `ranges` of `parent[name]` and make it sum over the group; the plan."""
    plan = columns_plan(parent[name], ranges, group, field)
    apply_plan(parent[name], plan)
    parent[name] = sharded_to_all(parent[name], group)
    return prefixed(name, plan)


def shard_input(parent, name, ranges):
    """Keep output rows `ranges` of `parent[name]`; the plan."""
    plan = rows_plan(parent[name], ranges)
    apply_plan(parent[name], plan)
    return prefixed(name, plan)


def all_sum(x, group):
    """The sum of x over the group (x itself without one)."""
    return x if group is None else mx.distributed.all_sum(x, group=group)
