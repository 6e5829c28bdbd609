"""The scan ops on top of the kernels of kernel_source.py, for one backend ("metal" or "cuda").

metal.py and cuda.py are this module bound to a backend. Kernel objects are built on first use
and cached (`_kernel`), so importing never needs Metal or CUDA. Gradients come from the reverse-scan
kernel through `mx.custom_function`: its vjp reruns the forward kernel to save a state every TC
steps, then runs the backward kernel. The first use of each kernel instantiation is checked
against the reference path (`_trusted`); one that fails runs on the reference path instead.
"""
import functools
import math
import os
import warnings
from typing import NamedTuple

import mlx.core as mx

from . import kernel_source as ks
from . import reference
from .arguments import OpArgumentError

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


@functools.lru_cache(maxsize=None)
def _kernel(backend, kind):
    header, source = ks.render(backend, kind)
    ins, outs = (ks.FWD_INPUTS, ks.FWD_OUTPUTS) if kind == "fwd" else (ks.BWD_INPUTS, ks.BWD_OUTPUTS)
    name = f"mlx_mamba_scan_{kind}"
    if backend == "metal":
        return mx.fast.metal_kernel(name=name, input_names=ins, output_names=outs, source=source,
                                    header=header, atomic_outputs=kind == "bwd")
    return mx.fast.cuda_kernel(name=name, input_names=ins, output_names=outs, source=source,
                               header=header)


# Threadgroup memory a kernel may ask for: Apple GPUs have 32 KB (CUDA allows 48 KB static).
SHARED_LIMIT = 32 * 1024


class Layout(NamedTuple):
    """Template sizes: S lanes per channel, NPL states per lane, CPT channels per thread, CPG
    channels per threadgroup, TC steps per chunk (the same for both kernels: checkpoints)."""
    S: int
    NPL: int
    CPT: int
    CPG: int
    TC: int

    @property
    def threads(self):
        return self.CPG // self.CPT * self.S

    def shared_bytes(self, kind):
        staged = 2 * self.TC * self.S * self.NPL  # sB, sC
        if kind == "bwd":  # and red: 2 rows of S * NPL per simdgroup
            staged += 2 * max(1, self.threads // 32) * self.S * self.NPL
        return 4 * staged


@functools.lru_cache(maxsize=None)  # asked on every op call, decode steps included
def _layout(kind, N, P, channels_per_group):
    """The layout of kernel `kind` for N states and P channels per head (see KERNELS.md). The
    forward kernel gives a thread up to 4 channels (of one head when P > 1; at most 16 states in
    registers), in groups of 128 threads. The backward kernel, which holds TC states per lane,
    gives a thread one channel, in groups of 256 threads, fewer where its threadgroup memory would
    pass SHARED_LIMIT."""
    S = min(32, 1 << (N - 1).bit_length())
    NPL = -(-N // S)
    TC = max(1, min(64, 1024 // (S * NPL)))
    if kind == "fwd":
        CPT = next(r for r in (4, 2, 1) if r == 1 or (
            r * NPL <= 16 and r <= S and (P == 1 or P % r == 0) and channels_per_group % r == 0))
        threads = 128
    else:
        CPT, threads = 1, 256
    CPG = CPT * max(1, threads // S)
    too_big = lambda cpg: Layout(S, NPL, CPT, cpg, TC).shared_bytes(kind) > SHARED_LIMIT  # noqa: E731
    while channels_per_group % CPG or (CPG > CPT and too_big(CPG)):
        CPG //= 2
    layout = Layout(S, NPL, CPT, CPG, TC)
    if layout.shared_bytes(kind) > SHARED_LIMIT:
        what = "forward" if kind == "fwd" else "gradient"
        raise OpArgumentError(
            f"d_state N={N} is too large for the {what} scan kernel: it needs "
            f"{layout.shared_bytes(kind)} bytes of threadgroup memory, over the limit of {SHARED_LIMIT}; "
            "use backend='reference'")
    return layout


def _launch(backend, kind, cfg, arrays, extra=()):
    """Runs kernel `kind` on the unified layout (see kernel_source): u (B, L, CH), dt (B, L, NH),
    A, B/C (B, L, G, N), D, z, dt_bias, state. cfg = (P, HPG, flags, lo, hi)."""
    P, HPG, flags, lo, hi = cfg
    u, dt, A, Bm = arrays[:4]
    batch, L, CH = u.shape
    G, N = Bm.shape[2:]
    layout = _layout(kind, N, P, HPG * P)
    NC = -(-L // layout.TC)
    params = mx.array([L, CH, N, P, HPG, G, flags], dtype=mx.int32)
    lims = mx.array([lo, hi], dtype=mx.float32)
    kw = dict(inputs=[*arrays, params, lims, *extra], grid=(CH // layout.CPT * layout.S, batch, 1),
              threadgroup=(layout.threads, 1, 1), template=[("T", u.dtype), *layout._asdict().items()])
    if kind == "fwd":
        save = flags & ks.FLAGS["save"]
        shapes = [(batch, L, CH), (batch, CH, N), (batch, NC, CH, N) if save else (1,)]
        return _kernel(backend, kind)(output_shapes=shapes, output_dtypes=[u.dtype] + [mx.float32] * 2, **kw)
    z = arrays[6]
    shapes = [(batch, L, CH), (batch, L, CH), (batch, L, CH) if z.ndim == 3 else (1,), (batch, CH, N),
              (batch, CH), (batch, CH, N), (batch, L, G, N), (batch, L, G, N)]
    return _kernel(backend, kind)(output_shapes=shapes, output_dtypes=[mx.float32] * 8, init_value=0.0, **kw)


@functools.lru_cache(maxsize=None)
def _scan_fn(backend, cfg):
    """Differentiable scan over arrays (u, dt, A, B, C, D, z, dt_bias, state) -> (y, last state)."""

    @mx.custom_function
    def scan(*arrays):
        y, last, _ = _launch(backend, "fwd", cfg, arrays)
        return y, last

    @scan.vjp
    def scan_vjp(arrays, cotangents, outputs):
        if _use_kernel(backend, "bwd", arrays[0].dtype, arrays[3].shape[-1], cfg[0], cfg[0] * cfg[1]):
            return _kernel_vjp(backend, cfg, arrays, cotangents)
        return tuple(mx.vjp(functools.partial(_reference_scan, cfg), list(arrays), list(cotangents))[1])

    return scan


def _kernel_vjp(backend, cfg, arrays, cotangents):
    """The gradients of the scan from the kernels: the forward kernel saves the states at chunk
    starts, the backward kernel walks back from them."""
    P, flags = cfg[0], cfg[2]
    u, dt, A, Bm, Cm, Dv, z, bias, state = arrays
    gy, glast = cotangents
    save_cfg = cfg[:2] + (cfg[2] | ks.FLAGS["save"],) + cfg[3:]
    ckpt = _launch(backend, "fwd", save_cfg, arrays)[2]
    gu, gdt, gz, gA, gD, gs, gB, gC = _launch(
        backend, "bwd", cfg, arrays, (gy.astype(u.dtype), glast.astype(mx.float32), ckpt))
    batch, L, CH = u.shape
    per_head = lambda x: x.reshape(*x.shape[:-1], CH // P, P).sum(-1)  # noqa: E731
    gdt_head = per_head(gdt)
    grads = [gu, gdt_head,
             gA.sum(0) if flags & ks.FLAGS["a_per_n"] else per_head(gA.sum((0, 2))),
             gB, gC, gD.sum(0), gz, gdt_head.sum((0, 1)), gs]
    present = [True] * 5 + [flags & ks.FLAGS[k] for k in ("D", "z", "bias", "state")]
    return tuple((g.astype(a.dtype) if ok else mx.zeros_like(a)) for g, a, ok in zip(grads, arrays, present))


def _reference_scan(cfg, *arrays):
    """The pure-MLX scan on the kernels' layout: what a kernel that fails its check is replaced
    by, and what the check compares with. Returns (y (B, L, CH), last state (B, CH, N))."""
    P, HPG, flags, lo, hi = cfg
    u, dt, A, Bm, Cm, Dv, z, bias, state = arrays
    batch, L, CH = u.shape
    given = lambda name, x: x if flags & ks.FLAGS[name] else None  # noqa: E731
    softplus = bool(flags & ks.FLAGS["softplus"])
    if flags & ks.FLAGS["a_per_n"]:  # Mamba1: one channel a head, one group
        return reference.selective_scan(u, dt, A, Bm[:, :, 0], Cm[:, :, 0], given("D", Dv), given("z", z),
                                        given("bias", bias), softplus, given("state", state), True)
    NH = CH // P
    split = lambda x, *shape: None if x is None else x.reshape(shape)  # noqa: E731
    y, last = reference.ssd(split(u, batch, L, NH, P), dt, A, Bm, Cm, reference.MAX_SSD_CHUNK,
                            split(given("D", Dv), NH, P), split(given("z", z), batch, L, NH, P),
                            given("bias", bias), softplus, (lo, hi),
                            split(given("state", state), batch, NH, P, -1), True)
    return y.reshape(batch, L, CH), last.reshape(batch, CH, -1)


# How far a kernel's answer on the check's input may be from the reference's, relative to the
# reference's scale. The emulator measures float32 5e-6, float16 5e-4, bfloat16 4e-3 (gradients
# are rounded to the input's dtype); a GPU's fast exp adds a little; a wrong kernel is off by 0.1
# or more.
_CHECK_TOLERANCE = {mx.float32: 1e-3, mx.float16: 1e-2, mx.bfloat16: 5e-2}
# What the check compares, in the order _launch (forward) and _kernel_vjp (backward) return them.
_CHECKED_OUTPUTS = {"fwd": ("y", "last state"),
                    "bwd": tuple(f"gradient of {n}" for n in ("u", "dt", "A", "B", "C", "D", "z", "dt_bias", "state"))}


def _use_kernel(backend, kind, dtype, N, P, channels_per_group):
    """Whether kernel `kind` runs this work; False sends it to the reference path.
    MLX_MAMBA_KERNEL_CHECK=0 skips the check (the tests judge the kernels themselves)."""
    if os.environ.get("MLX_MAMBA_KERNEL_CHECK") == "0":
        return True
    return _trusted(backend, kind, dtype, _layout(kind, N, P, channels_per_group))


@functools.lru_cache(maxsize=None)
def _trusted(backend, kind, dtype, layout):
    """Builds and runs kernel `kind` once at these template sizes on a small input and compares
    it with the reference path. A build or run error (MLX raises it in mx.eval) or a wrong answer
    is reported once, as a warning, and the kernel is not used again in this process."""
    try:
        error = _check(backend, kind, dtype, layout)
    except Exception as e:  # noqa: BLE001 - whatever the GPU compiler or driver raises
        error = f"{type(e).__name__}: {e}"
    if error is None:
        return True
    what = "forward scan" if kind == "fwd" else "backward (gradient) scan"
    sizes = ", ".join(f"{k}={v}" for k, v in layout._asdict().items())
    warnings.warn(f"mlx-mamba: the {backend} {what} kernel for {dtype} ({sizes}) failed its "
                  f"first-use check: {error}. That work runs on the pure-MLX reference path from "
                  "now on; MLX_MAMBA_BACKEND=reference forces that path for every op.",
                  RuntimeWarning, stacklevel=2)
    return False


def _check(backend, kind, dtype, layout):
    """None when the kernel's answer matches the reference's, else what differs."""
    # 2 batch rows, 8 groups of one head of CPG channels (which _layout gives this same layout),
    # a chunk of TC steps and a part of one; every option on. Every array has 8 elements or more: Metal compiles a kernel apart for
    # smaller inputs (constant address space), which real checkpoints never pass.
    batch, G, N, L = 2, 8, layout.S * layout.NPL, layout.TC + 3
    CPG = layout.CPG
    CH = G * CPG
    keys = iter(mx.random.split(mx.random.key(0), 11))  # not the global generator: a user's results stay put
    r = lambda *shape, dt=dtype: mx.random.normal(shape, key=next(keys)).astype(dt)  # noqa: E731
    f32 = mx.float32
    arrays = (r(batch, L, CH), r(batch, L, G), -mx.exp(r(G, dt=f32)), r(batch, L, G, N), r(batch, L, G, N),
              r(CH, dt=f32), r(batch, L, CH), 0.1 * r(G, dt=f32), r(batch, CH, N, dt=f32))
    flags = sum(ks.FLAGS[k] for k in ("state", "D", "z", "bias", "softplus", "limit"))
    cfg = (CPG, 1, flags, 0.0, 1.5)
    if kind == "fwd":
        got, want = _launch(backend, "fwd", cfg, arrays)[:2], _reference_scan(cfg, *arrays)
    else:
        cotangents = [r(batch, L, CH), r(batch, CH, N, dt=f32)]
        got = _kernel_vjp(backend, cfg, arrays, cotangents)
        want = mx.vjp(functools.partial(_reference_scan, cfg), list(arrays), cotangents)[1]
    mx.eval(got, want)
    names = _CHECKED_OUTPUTS[kind]
    for name, g, w in zip(names, got, want):  # each on its own: max() over errors would skip a NaN
        g, w = g.astype(f32), w.astype(f32)
        if not mx.isfinite(g).all().item():
            return f"its {name} holds NaN or Inf"
        error = (mx.abs(g - w).max() / mx.maximum(mx.abs(w).max(), 1.0)).item()
        if not error <= _CHECK_TOLERANCE[dtype]:  # NaN fails too
            return f"its {name} differs from the reference by {error:.3g} (relative to the reference's scale)"
    return None


def _common_dtype(*xs):
    dt = functools.reduce(lambda a, b: (mx.zeros((), a) + mx.zeros((), b)).dtype,
                          [x.dtype for x in xs if x is not None])
    return dt if dt in _FLOATS else mx.float32


def _run(backend, P, HPG, flags, limit, u, dt, A, Bm, Cm, D, z, bias, state):
    """Casts to the kernel's dtypes, fills absent inputs with placeholders and runs the scan."""
    T = _common_dtype(u, dt, Bm, Cm, z)
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    dummy = mx.zeros((8,), T)  # 8 elements, as in the first-use check (see _check)
    flags |= sum(ks.FLAGS[k] for k, x in (("D", D), ("z", z), ("bias", bias), ("state", state)) if x is not None)
    lo, hi = limit
    if lo > 0.0 or hi < math.inf:  # as the reference: a clamp only when it can bind
        flags |= ks.FLAGS["limit"]
    arrays = (u.astype(T), dt.astype(T), f32(A), Bm.astype(T), Cm.astype(T),
              f32(D) if D is not None else f32(dummy), z.astype(T) if z is not None else dummy,
              f32(bias) if bias is not None else f32(dummy), f32(state) if state is not None else f32(dummy))
    cfg = (P, HPG, flags, float(lo), float(hi))
    if _use_kernel(backend, "fwd", T, Bm.shape[-1], P, HPG * P):
        return _scan_fn(backend, cfg)(*arrays)
    return _reference_scan(cfg, *arrays)


def selective_scan(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, return_last_state):
    # u, delta, z (B, L, D); A (D, N); B, C (B, L, N); state (B, D, N)
    Dm = u.shape[-1]
    flags = ks.FLAGS["a_per_n"] | (ks.FLAGS["softplus"] if delta_softplus else 0)
    y, last = _run(backend, 1, Dm, flags, (0.0, math.inf), u, delta, A, B[:, :, None], C[:, :, None],
                   D, z, delta_bias, state)
    y = y.astype(u.dtype)
    return (y, last) if return_last_state else y


def ssd(backend, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
        return_final_states):
    # x, z (B, L, H, P); dt (B, L, H); A, dt_bias (H,); D (H,) or (H, P); B, C (B, L, G, N);
    # states (B, H, P, N). The kernel scans step by step: chunk_size changes nothing.
    batch, L, H, P = x.shape
    G = B.shape[2]
    flat = lambda t: None if t is None else t.reshape(batch, L, H * P)  # noqa: E731
    s0 = None if initial_states is None else initial_states.reshape(batch, H * P, -1)
    if D is not None:  # the kernel reads D per channel (h, p); its gradient flows back through this
        D = mx.broadcast_to(D.reshape(H, -1), (H, P)).reshape(H * P)
    y, last = _run(backend, P, H // G, ks.FLAGS["softplus"] if dt_softplus else 0, tuple(dt_limit),
                   flat(x), dt, A, B, C, D, flat(z), dt_bias, s0)
    y = y.reshape(batch, L, H, P).astype(x.dtype)
    return (y, last.reshape(batch, H, P, -1)) if return_final_states else y


def selective_scan_step(backend, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    # state (B, D, N); u, delta, z (B, D); A (D, N); B, C (B, N): a scan of length 1
    z = None if z is None else z[:, None]
    y, new = selective_scan(backend, u[:, None], delta[:, None], A, B[:, None], C[:, None], D, z,
                            delta_bias, delta_softplus, state, True)
    return y[:, 0], new


def ssd_step(backend, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit):
    # state (B, H, P, N); x, z (B, H, P); dt (B, H); D (H,) or (H, P); B, C (B, G, N)
    z = None if z is None else z[:, None]
    y, new = ssd(backend, x[:, None], dt[:, None], A, B[:, None], C[:, None], 1, D, z, dt_bias,
                 dt_softplus, dt_limit, state, True)
    return y[:, 0], new
