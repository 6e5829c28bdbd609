"""The scan kernels' full text as MLX compiles it, for the template arguments kernel_ops gives them
on the checkpoints people run (test_nvrtc.py, test_kernel_source_review.py), and planted bugs."""
import types

import mlx.core as mx

from metal_emulator import harness
from mlx_mamba.ops import kernel_ops
from mlx_mamba.ops import kernel_source as ks

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# (N, P, channels per B/C group) of real checkpoints. Mamba1 (N = 16, P = 1): d_inner 1536 (130m)
# to 8192 (falcon-mamba-7b). Mamba2, P = 64: N = 128 with one group (mamba2-130m: 1536,
# mamba2-2.7b: 5120) or eight (Codestral, Nemotron-H: 16 heads = 1024 channels a group); N = 64
# (Zamba2: 64 heads, one group).
CHECKPOINT_SHAPES = [(16, 1, 1536), (16, 1, 8192), (128, 64, 1536), (128, 64, 5120), (128, 64, 1024),
                     (64, 64, 4096)]
# Inputs in the scan's dtype T; `params` is int32, every other input float32 (kernel_ops._launch).
T_INPUTS = {"u", "dt", "Bm", "Cm", "z", "gy"}


def template(kind, dtype, N, P, channels_per_group):
    """The `template` argument of kernel `kind`'s launch (kernel_ops._launch)."""
    return [("T", dtype), *kernel_ops._layout(kind, N, P, channels_per_group)._asdict().items()]


def checkpoint_templates(kind, dtype):
    """{name of the sizes: template} of kernel `kind` on CHECKPOINT_SHAPES for `dtype`, no repeats."""
    out = {}
    for shape in CHECKPOINT_SHAPES:
        t = template(kind, dtype, *shape)
        out["_".join(f"{k}{v}" for k, v in t[1:])] = t
    return out


def names(kind):
    """(input names, output names) of kernel `kind`."""
    return (ks.FWD_INPUTS, ks.FWD_OUTPUTS) if kind == "fwd" else (ks.BWD_INPUTS, ks.BWD_OUTPUTS)


def signature(kind, dtype):
    """(input dtypes, output dtypes) of kernel `kind` for scan dtype `dtype`."""
    ins, outs = names(kind)
    return ([dtype if n in T_INPUTS else mx.int32 if n == "params" else mx.float32 for n in ins],
            [dtype if kind == "fwd" and n == "y" else mx.float32 for n in outs])


def wrapped(backend, kind, dtype, template, header=None, source=None):
    """(kernel name, full text) of kernel `kind` as MLX compiles it for `backend` (the emulator's
    wrapping, which follows MLX's); `header` and `source` replace the rendered ones."""
    rendered = ks.render(backend, kind)
    ins, outs = names(kind)
    kernel = types.SimpleNamespace(name=f"mlx_mamba_scan_{kind}", header=header or rendered[0],
                                   source=source or rendered[1], input_names=ins, output_names=outs,
                                   atomic_outputs=kind == "bwd")
    in_dtypes, out_dtypes = signature(kind, dtype)
    inputs = [mx.zeros((1,), d) for d in in_dtypes]
    if backend == "cuda":
        return harness.cuda_source(kernel, inputs, out_dtypes, template)
    return harness.metal_source(kernel, inputs, out_dtypes, template)[:2]


# The planted bug: the forward kernel saves the chunk checkpoints of a thread's CPT
# channels all over its first channel's, so the others' slots are never written (the emulator
# starts outputs as NaN). y and the last state stay right; the gradients of dt, A, C, z and
# dt_bias that the backward kernel computes from those checkpoints are NaN for those channels.
PLANTED_NAN = ("fwd", "ckpt[(long(bb * NC + t0 / TC) * CH + c + r) * N + n] = h[r * NPL + k];",
               "ckpt[(long(bb * NC + t0 / TC) * CH + c) * N + n] = h[r * NPL + k];")


PRISTINE = dict(ks.BODIES)  # the bodies as kernel_source.py has them


def plant(monkeypatch, kind, old, new):
    """Kernel `kind`'s body with `old` (which must be in it exactly once) replaced by `new`, for
    this test; a second plant in the same test replaces the first."""
    body = PRISTINE[kind]
    assert body.count(old) == 1, (f"{old!r} is not in the {kind} kernel once: re-target it to "
                                  "kernel_source.py")
    monkeypatch.setitem(ks.BODIES, kind, body.replace(old, new))
    kernel_ops._kernel.cache_clear()
