"""The scan ops on top of the kernels of kernel_source.py, for one backend ("metal" or "cuda").

metal.py and cuda.py are this module bound to a backend. Kernel objects are built on first use
and cached (`_kernel`), so importing never needs Metal or CUDA. Gradients come from the reverse-scan
kernel through `mx.custom_function`: its vjp reruns the forward kernel to save a state every TC
steps, then runs the backward kernel.
"""
import functools
import math
from typing import NamedTuple

import mlx.core as mx

from . import kernel_source as ks
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
    P, flags = cfg[0], cfg[2]

    @mx.custom_function
    def scan(*arrays):
        y, last, _ = _launch(backend, "fwd", cfg, arrays)
        return y, last

    @scan.vjp
    def scan_vjp(arrays, cotangents, outputs):
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

    return scan


def _common_dtype(*xs):
    dt = functools.reduce(lambda a, b: (mx.zeros((), a) + mx.zeros((), b)).dtype,
                          [x.dtype for x in xs if x is not None])
    return dt if dt in _FLOATS else mx.float32


def _run(backend, P, HPG, flags, limit, u, dt, A, Bm, Cm, D, z, bias, state):
    """Casts to the kernel's dtypes, fills absent inputs with placeholders and runs the scan."""
    T = _common_dtype(u, dt, Bm, Cm, z)
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    dummy = mx.zeros((1,), T)
    flags |= sum(ks.FLAGS[k] for k, x in (("D", D), ("z", z), ("bias", bias), ("state", state)) if x is not None)
    lo, hi = limit
    if lo > 0.0 or hi < math.inf:  # as the reference: a clamp only when it can bind
        flags |= ks.FLAGS["limit"]
    arrays = (u.astype(T), dt.astype(T), f32(A), Bm.astype(T), Cm.astype(T),
              f32(D) if D is not None else f32(dummy), z.astype(T) if z is not None else dummy,
              f32(bias) if bias is not None else f32(dummy), f32(state) if state is not None else f32(dummy))
    return _scan_fn(backend, (P, HPG, flags, float(lo), float(hi)))(*arrays)


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
