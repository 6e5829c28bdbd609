"""Argument checks of the scan ops, from shapes and dtypes alone.

No array is ever evaluated here, so the ops stay lazy and run under mx.compile. Each array
argument's accepted shapes are written in named sizes; the first argument (in table order) that
has a size sets it, and every later one must agree.
"""

import functools
import math
from numbers import Integral, Real
from typing import NamedTuple

import mlx.core as mx


class OpArgumentError(ValueError):
    """A scan op called with an argument of the wrong shape, dtype or value; the message names it."""


_SCAN = ("batch", "length", "channels")
_SSD = ("batch", "length", "heads", "head_dim")

# op -> {array argument: accepted shapes}, in checking order.
SHAPES = {
    "selective_scan": {
        "u": [_SCAN], "delta": [_SCAN], "A": [("channels", "d_state")],
        "B": [("batch", "length", "d_state")], "C": [("batch", "length", "d_state")],
        "D": [("channels",)], "z": [_SCAN], "delta_bias": [("channels",)],
        "state": [("batch", "channels", "d_state")],
    },
    "selective_scan_step": {
        "u": [("batch", "channels")], "delta": [("batch", "channels")],
        "A": [("channels", "d_state")], "B": [("batch", "d_state")], "C": [("batch", "d_state")],
        "D": [("channels",)], "z": [("batch", "channels")], "delta_bias": [("channels",)],
        "state": [("batch", "channels", "d_state")],
    },
    "ssd": {
        "x": [_SSD], "dt": [_SSD[:3]], "A": [("heads",)],
        "B": [("batch", "length", "groups", "d_state")],
        "C": [("batch", "length", "groups", "d_state")],
        "D": [("heads",), ("heads", "head_dim")], "z": [_SSD], "dt_bias": [("heads",)],
        "initial_states": [("batch", "heads", "head_dim", "d_state")],
    },
    "ssd_step": {
        "x": [("batch", "heads", "head_dim")], "dt": [("batch", "heads")], "A": [("heads",)],
        "B": [("batch", "groups", "d_state")], "C": [("batch", "groups", "d_state")],
        "D": [("heads",), ("heads", "head_dim")], "z": [("batch", "heads", "head_dim")],
        "dt_bias": [("heads",)], "state": [("batch", "heads", "head_dim", "d_state")],
    },
}

# Array arguments that may be None.
OPTIONAL = {
    "selective_scan": {"D", "z", "delta_bias", "state"},
    "selective_scan_step": {"D", "z", "delta_bias"},
    "ssd": {"D", "z", "dt_bias", "initial_states"},
    "ssd_step": {"D", "z", "dt_bias"},
}

FLAGS = ("delta_softplus", "return_last_state", "dt_softplus", "return_final_states")


class _Array(NamedTuple):
    """An array as the checks see it."""
    shape: tuple
    dtype: mx.Dtype

    def __repr__(self):
        return f"an mx.array of shape {self.shape}"


def check(op, arguments):
    """Raise OpArgumentError naming the first bad argument of `op`; `arguments` maps every
    parameter name of the op to its value (as locals() does at the op's start)."""
    # Arrays as (shape, dtype), other values as (type, value) (1 == True in Python, not here):
    # all that the checks read, and the key under which a passed check is remembered, as a
    # decoding step calls the ops with the same shapes once per layer and token.
    described = tuple([(v.shape, v.dtype) if isinstance(v, mx.array) else (type(v), v)
                       for v in arguments.values()])
    try:
        hash(described)
    except TypeError:  # a list or a numpy array somewhere: checked, not remembered
        _check(op, tuple(arguments), described)
    else:
        _check_remembered(op, tuple(arguments), described)


@functools.lru_cache(maxsize=1024)
def _check_remembered(op, names, described):
    _check(op, names, described)


def _check(op, names, described):
    arguments = {name: value if isinstance(kind, type) else _Array(kind, value)
                 for name, (kind, value) in zip(names, described)}
    sizes = {}
    for name, shapes in SHAPES[op].items():
        _check_array(op, name, arguments[name], shapes, sizes, name in OPTIONAL[op])
    if "groups" in sizes and sizes["heads"] % sizes["groups"]:
        raise OpArgumentError(f"{op}: the {sizes['heads']} heads of x do not split evenly into "
                              f"the {sizes['groups']} groups of B and C")
    for name in FLAGS:
        if name in arguments and not isinstance(arguments[name], bool):
            raise OpArgumentError(f"{op}: {name} must be True or False, got {arguments[name]!r}")
    if "chunk_size" in arguments:
        _check_chunk_size(op, arguments["chunk_size"])
    if "dt_limit" in arguments:
        _check_dt_limit(op, arguments["dt_limit"])


def _check_array(op, name, array, shapes, sizes, optional):
    if array is None and optional:
        return
    if not isinstance(array, _Array):
        raise OpArgumentError(f"{op}: {name} must be an mx.array, got {type(array).__name__}")
    shape, dtype = array
    if not mx.issubdtype(dtype, mx.floating):
        raise OpArgumentError(f"{op}: {name} has dtype {dtype}; expected a floating-point "
                              f"dtype (float32, float16 or bfloat16)")
    dims = next((d for d in shapes if len(d) == len(shape) and _agrees(d, shape, sizes)), None)
    if dims is None:
        expected = " or ".join(_render(d, sizes) for d in shapes)
        raise OpArgumentError(f"{op}: {name} has shape {shape}; expected {expected}")
    if 0 in shape:
        raise OpArgumentError(f"{op}: {name} has shape {shape}, an empty {dims[shape.index(0)]} "
                              f"axis; every size must be at least 1")
    for dim, n in zip(dims, shape):
        sizes.setdefault(dim, n)


def _agrees(dims, shape, sizes):
    for dim, n in zip(dims, shape):
        if sizes.get(dim, n) != n:
            return False
    return True


def _render(dims, sizes):
    # ("batch", "heads") with batch known -> "(batch=2, heads)"
    named = [f"{d}={sizes[d]}" if d in sizes else d for d in dims]
    return f"({', '.join(named)}{',' if len(named) == 1 else ''})"


def _check_chunk_size(op, chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral) or chunk_size < 1:
        raise OpArgumentError(f"{op}: chunk_size must be a positive integer, got {chunk_size!r}")


def _check_dt_limit(op, limit):
    # Plain numbers only: the ops decide from their values whether to clamp, which must not
    # evaluate an array.
    try:
        lo, hi = limit
    except (TypeError, ValueError):
        lo = hi = None
    if not all(isinstance(v, Real) and not isinstance(v, bool) and not math.isnan(v)
               for v in (lo, hi)) or lo > hi:
        raise OpArgumentError(f"{op}: dt_limit must be a pair of numbers (lo, hi) with lo <= hi, "
                              f"got {limit!r}")
