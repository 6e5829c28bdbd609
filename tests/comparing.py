"""What the tests compare with: one relative error that no NaN or Inf can pass, the assertion that
names the array that fails, and a tokenizer over the tiny checkpoints' ids.

Every tolerance in the suite goes through `relative_error` on one array or `assert_close` on one
array or a dict of them, never through Python's `max()` over a list of errors: `max()` skips a NaN
that is not first, so a kernel writing NaN into one gradient of nine would pass.
"""

import mlx.core as mx
import numpy as np


def as_float64(x):
    """An MLX array (any dtype, bfloat16 included), numpy array or number as float64 numpy."""
    if isinstance(x, mx.array):
        x = np.array(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)
    return np.asarray(x, np.float64)


def relative_error(ours, theirs, floor=0.0):
    """The largest |ours - theirs| relative to max(floor, the largest |theirs|), in float64; inf
    when either holds a NaN or an Inf, or the shapes differ, so that no bound passes it."""
    ours, theirs = as_float64(ours), as_float64(theirs)
    if ours.shape != theirs.shape or not (np.isfinite(ours).all() and np.isfinite(theirs).all()):
        return float("inf")
    difference = float(np.abs(ours - theirs).max(initial=0.0))
    scale = max(floor, float(np.abs(theirs).max(initial=0.0)))
    return difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))


def _what_is_wrong(ours, theirs):
    ours, theirs = as_float64(ours), as_float64(theirs)
    if ours.shape != theirs.shape:
        return f"shape {ours.shape}, expected {theirs.shape}"
    for side, x in (("ours", ours), ("the reference", theirs)):
        nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        if nan or inf:
            first = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
            return f"{nan} NaN and {inf} Inf in {side} (first at {first})"
    return None


def assert_close(ours, theirs, tol, floor=0.0, name="the array"):
    """Asserts relative_error(ours, theirs, floor) <= tol. `ours` and `theirs` are arrays or dicts
    {name: array} with the same keys; the message names every array that fails and why (a NaN, an
    Inf, a shape, or its error). Returns the errors {name: error} (one array: its error)."""
    pairs = ({k: (ours[k], theirs[k]) for k in theirs} if isinstance(theirs, dict)
             else {name: (ours, theirs)})
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), f"arrays {sorted(ours)}, expected {sorted(theirs)}"
    errors = {k: relative_error(a, b, floor) for k, (a, b) in pairs.items()}
    failed = [k for k, e in errors.items() if not e <= tol]
    if failed:
        lines = [f"{k}: {_what_is_wrong(*pairs[k]) or f'relative error {errors[k]:.3g}'}" for k in failed]
        raise AssertionError(f"over the tolerance {tol:g}: " + "; ".join(lines)
                             + "\n(all errors: " + ", ".join(f"{k} {e:.2g}" for k, e in errors.items()) + ")")
    return errors if isinstance(theirs, dict) else errors[name]


class IdTokenizer:
    """The minimal tokenizer interface, over the tiny checkpoints' 100 ids."""

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def encode(self, text):
        return [ord(c) - 32 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)
