"""The kernels at the sizes real checkpoints use, forward and backward, on the emulator.

test_kernels.py checks the logic at small, odd sizes (N = 12: 16 lanes, one state a lane). Real
checkpoints have Mamba1 N = 16 and Mamba2 N = 64 or 128 with head dim P = 64 and 1 or 8 groups:
32 lanes holding 2 or 4 states each, chunks of TC = 16 or 8 steps (see kernel_ops._layout). Each
case runs forward and backward through the public op and compares y, the last state and every
gradient with the pure-MLX reference (and y, the last state with float64 loops in float32), at a
length that is a multiple of TC and at one that is not. Heads are few (H = G or 2 G) and batches
small so that the emulator stays quick; the per-channel work is the real one.
"""
import math

import mlx.core as mx
import numpy as np
import pytest

import float64_reference as f64
from comparing import assert_close
from kernel_texts import PLANTED_NAN, plant
from metal_emulator import harness
from mlx_mamba import ops
from mlx_mamba.ops import kernel_ops

pytestmark = pytest.mark.skipif(harness.compiler() is None,
                                reason="g++ is missing: the kernel emulator compiles kernels with it")

# Error relative to the reference's scale (max |ref|, at least 1); measured: float32 1e-6, float16
# 7e-4, bfloat16 7e-3 (the halves' inputs are the same in both paths; y and the gradients are
# rounded to the input's dtype).
TOLERANCE = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 3e-2}

MAMBA1_16 = dict(family="mamba1", b=2, D=16, N=16)   # 16 lanes, 8 channels a threadgroup, TC = 64
MAMBA2_64 = dict(family="mamba2", b=1, P=64, N=64)    # 32 lanes x 2 states, TC = 16
MAMBA2_128 = dict(family="mamba2", b=1, P=64, N=128)  # 32 lanes x 4 states, TC = 8


def case(shape, G=1, H=None, **kw):
    return dict(shape, G=G, H=H or 2 * G, **kw) if shape["family"] == "mamba2" else dict(shape, **kw)


# Every family in every dtype on Metal, at a length of one whole chunk (a multiple of TC) and at
# one of a chunk and a part (so a saved state carries over); 8 groups in float32. CUDA runs the same
# body through its own prelude: float32 for each family and one half suffice there.
CASES = [
    case(MAMBA1_16, L=64, dtype=mx.float32), case(MAMBA1_16, L=67, dtype=mx.float32),
    case(MAMBA1_16, L=67, dtype=mx.float16), case(MAMBA1_16, L=64, dtype=mx.bfloat16),
    case(MAMBA2_64, L=16, dtype=mx.float32), case(MAMBA2_64, L=19, dtype=mx.float32),
    case(MAMBA2_64, L=19, dtype=mx.float16), case(MAMBA2_64, L=16, dtype=mx.bfloat16),
    case(MAMBA2_64, G=8, H=8, L=19, dtype=mx.float32),
    case(MAMBA2_128, L=8, dtype=mx.float32), case(MAMBA2_128, L=11, dtype=mx.float32),
    case(MAMBA2_128, L=8, dtype=mx.float16), case(MAMBA2_128, L=11, dtype=mx.bfloat16),
    case(MAMBA2_128, G=8, H=8, L=11, dtype=mx.float32),
]
CUDA_CASES = [
    case(MAMBA1_16, L=67, dtype=mx.float32), case(MAMBA2_64, L=19, dtype=mx.float32),
    case(MAMBA2_128, L=11, dtype=mx.float32), case(MAMBA2_128, L=11, dtype=mx.bfloat16),
]


def case_id(c):
    groups = f"-G{c['G']}-H{c['H']}" if c["family"] == "mamba2" else ""
    return f"{c['family']}-N{c['N']}{groups}-L{c['L']}-{str(c['dtype']).split('.')[-1]}"


@pytest.fixture
def emulated(monkeypatch):
    harness.install(monkeypatch)
    kernel_ops._kernel.cache_clear()
    yield
    kernel_ops._kernel.cache_clear()


def inputs(c):
    """The op's keyword arguments, the names of the differentiated ones, and the output shapes."""
    mx.random.seed(11)
    r = lambda *s: mx.random.normal(s)  # noqa: E731
    b, L, N, T = c["b"], c["L"], c["N"], c["dtype"]
    if c["family"] == "mamba1":
        D = c["D"]
        x = dict(u=r(b, L, D), delta=r(b, L, D) * 0.5, A=-mx.exp(r(D, N)), B=r(b, L, N), C=r(b, L, N),
                 D=r(D), z=r(b, L, D), delta_bias=r(D) * 0.1, state=r(b, D, N))
        halves = ("u", "delta", "B", "C", "z")
        names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state"]
        shapes = [(b, L, D), (b, D, N)]
    else:
        H, P, G = c["H"], c["P"], c["G"]
        x = dict(x=r(b, L, H, P), dt=r(b, L, H) * 0.5, A=-mx.exp(r(H)), B=r(b, L, G, N), C=r(b, L, G, N),
                 D=r(H), z=r(b, L, H, P), dt_bias=r(H) * 0.1, initial_states=r(b, H, P, N))
        halves = ("x", "dt", "B", "C", "z")
        names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
        shapes = [(b, L, H, P), (b, H, P, N)]
    return {k: v.astype(T) if k in halves else v for k, v in x.items()}, names, shapes


def run_op(c, x, backend):
    if c["family"] == "mamba1":
        return ops.selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
    return ops.ssd(**x, chunk_size=64, dt_softplus=True, return_final_states=True, backend=backend)


def outputs_and_gradients(c, backend):
    """(y, last state), then the gradient of each input, for random output weights."""
    x, names, shapes = inputs(c)
    mx.random.seed(12)
    weights = [mx.random.normal(shapes[0]).astype(c["dtype"]), mx.random.normal(shapes[1])]
    fn = lambda *a: list(run_op(c, dict(x, **dict(zip(names, a))), backend))  # noqa: E731
    outs, grads = mx.vjp(fn, [x[k] for k in names], weights)
    return dict(zip(["y", "last"], outs)) | {"d" + n: g for n, g in zip(names, grads)}


def float64_outputs(c):
    x, _, _ = inputs(c)
    x = {k: np.array(v.astype(mx.float32), np.float64) for k, v in x.items()}
    if c["family"] == "mamba1":
        return f64.selective_scan(**x, delta_softplus=True)
    return f64.ssd(**x, dt_softplus=True, dt_limit=(0.0, math.inf))


def check(c, backend):
    """Each output and gradient of the kernels against the reference (and float64), each within
    TOLERANCE of its scale (max |ref|, at least 1); an AssertionError names those that are not."""
    got, ref = outputs_and_gradients(c, backend), outputs_and_gradients(c, "reference")
    if c["dtype"] == mx.float32:
        for k, r in zip(["y", "last"], float64_outputs(c)):
            got[k + " (float64)"], ref[k + " (float64)"] = got[k], r
    return assert_close(got, ref, TOLERANCE[c["dtype"]], floor=1.0)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_metal_at_real_sizes(emulated, c):
    check(c, "metal")


@pytest.mark.parametrize("c", CUDA_CASES, ids=case_id)
def test_cuda_at_real_sizes(emulated, c):
    check(c, "cuda")


# Planted bugs, one or more for each feature of today's layouts (KERNELS.md), in both kernels and
# both families; each must fail `check` (an AssertionError naming the arrays), or the emulator
# (the race detector, a canary). name: (case, kernel, text, its replacement). Each case is the
# smallest real size with the feature: Mamba1 N = 16 (16 lanes, CPT = 4, TC = 64), Mamba2 N = 128
# (32 lanes x 4 states, CPT = 4, TC = 8), at lengths of two chunks.
M1, M2 = case(MAMBA1_16, L=67, dtype=mx.float32), case(MAMBA2_128, L=11, dtype=mx.float32)  # 2 chunks each
MUTANTS = {
    # Several channels a thread (CPT = 4 in both cases)
    "CPT: a thread's channels read its first channel's u": (
        M2, "fwd", "uv[r] = float(u[row * CH + cr]);", "uv[r] = float(u[row * CH + c]);"),
    "CPT: Mamba1's A of a thread's first channel for all": (
        M1, "fwd", "A[(c + r) * N + n] : 0.0f) : A[(c + r) / P];", "A[c * N + n] : 0.0f) : A[(c + r) / P];"),
    # Several states a lane (N = 128: NPL = 4)
    "NPL: forward reads B at state lane * NPL + k": (
        M2, "fwd", "bv[k] = sB[tt * NP + lane + S * k];", "bv[k] = sB[tt * NP + lane * NPL + k];"),
    "NPL: wrong state layout in the backward recompute": (
        M2, "bwd", "* prev + d * uv * sB[tt * NP + lane + S * k];", "* prev + d * uv * sB[tt * NP + lane * NPL + k];"),
    "NPL: reduction slot ignores the state index": (  # the race detector's find: red read unwritten
        M2, "bwd", "red[(tid / 32) * NP + lane + S * k] = sb;", "red[(tid / 32) * NP + lane] = sb;"),
    "NPL: gradient of A written at the lane, not the state": (
        M2, "bwd", "MM_ST(&gA[long(bb * CH + c) * N + n], gA_acc[k]);", "MM_ST(&gA[long(bb * CH + c) * N + lane], gA_acc[k]);"),
    # Chunk checkpoints (two chunks in both cases)
    "checkpoints: a thread's channels saved over its first (planted NaN)": (M2, *PLANTED_NAN),
    "checkpoints: Mamba1's saved over a thread's first channel": (M1, *PLANTED_NAN),
    "checkpoints: backward starts a chunk from the next chunk's state": (
        M2, "bwd", "ckpt[(long(bb * NC + j) * CH + c) * N + n]", "ckpt[(long(bb * NC + (j + 1) % NC) * CH + c) * N + n]"),
    # The paired lane reduction of a thread's CPT sums (S = 32 lanes, CPT = 4: two exchanges)
    "paired reduction: a lane keeps the half it sends": (
        M2, "fwd", "const float kept = upper ? acc[i + m] : acc[i], sent = upper ? acc[i] : acc[i + m];",
        "const float kept = upper ? acc[i] : acc[i + m], sent = upper ? acc[i + m] : acc[i];"),
    "paired reduction: a lane's sum given to the wrong channel": (
        M1, "fwd", "const int r = lane / (S / CPT), cr = c + r;", "const int r = lane % CPT, cr = c + r;"),
    "lane count hard-coded in the backward reduction": (M2, "bwd", "gd = mm_xor_sum(gd, 1, S);", "gd = mm_xor_sum(gd, 1, 16);"),
    # Head boundaries inside a thread (Mamba1: every channel is a head of P = 1)
    "heads: a thread's later heads take its first head's dt": (
        M1, "fwd", "if (r == 0 || cr % P == 0) {", "if (r == 0) {"),
    # The final-state write
    "final state: a thread's channels written over its first": (
        M2, "fwd", "if (n < N) last[long(bb * CH + c + r) * N + n]", "if (n < N) last[long(bb * CH + c) * N + n]"),
    "final state: Mamba1's last state of the wrong states": (
        M1, "fwd", "if (n < N) last[long(bb * CH + c + r) * N + n] = h[r * NPL + k];",
        "if (n < N) last[long(bb * CH + c + r) * N + (n + 1) % N] = h[r * NPL + k];"),
    "final state: gradient of the initial state of every batch row at row 0's place": (
        M1, "bwd", "MM_ST(&gstate[long(bb * CH + c) * N + n], gh[k]);", "MM_ST(&gstate[long(c) * N + n], gh[k]);"),
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_real_sizes_catch_broken_kernels(emulated, monkeypatch, mutant):
    c, kind, old, new = MUTANTS[mutant]
    plant(monkeypatch, kind, old, new)
    try:
        check(c, "metal")
    except (AssertionError, harness.EmulatorError) as e:  # the emulator: a race or a canary
        print(f"{mutant}: caught: {str(e).splitlines()[0][:300]}")
        return
    raise AssertionError(f"the mutant {mutant!r} passed the kernel comparison")
