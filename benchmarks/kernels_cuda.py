"""Checks the CUDA scan kernels against the pure-MLX reference on an NVIDIA GPU, then times them
at real model shapes against the pure-MLX path and against mlx-lm's Mamba2 decode step.

Needs MLX's CUDA build; this script installs nothing. On the GPU machine:
    python -m pip install -e ".[cuda]"        # mlx[cuda13]; or: python -m pip install "mlx[cuda13]"
    python benchmarks/kernels_cuda.py [--quick]
    python benchmarks/kernels_cuda.py --dry-run   # anywhere: tiny shapes on the CPU, see below

Prints, in this order:
- checks: the largest error of every output and gradient of the kernels, relative to the
  output's scale, against the reference (odd shapes, float32/float16/bfloat16), and of the
  decode step against mlx-lm's `ssm_update`;
- prefill: milliseconds per call of `selective_scan` / `ssd`, forward and forward+backward, for
  the kernels and the pure-MLX reference, and the ratio reference / kernels (> 1: the kernels
  are faster), at Mamba1 (mamba-2.8b, falcon-mamba-7b) and Mamba2 (mamba2-2.7b, Codestral)
  shapes; for ssd also mlx-lm's `ssm_attn` forward, its pure-MLX prefill;
- decode: milliseconds per `ssd_step` (batch 1 and 16) for the kernels, the reference and
  mlx-lm's `ssm_update` (dt softplus and limit, D, no gate on every side), with both ratios.
  mlx-lm's `ssm_update` runs its Metal kernel only on Metal; on CUDA it falls back to its
  pure-MLX `ssm_attn`, and the script says which one ran.
Times are wall-clock after a warm-up call, each call evaluated and synchronized.
Exit status 1 when a check fails.

--dry-run runs every step above on the CPU with tiny shapes, the reference standing in for the
kernels: it checks the script itself and measures nothing.
"""
import argparse
import sys
import time

import mlx.core as mx
from mlx_lm.models.ssm import ssm_attn, ssm_update

from mlx_mamba import ops

TOL = 1e-4  # float32 on a GPU: the reference's matmuls may round differently from a serial scan
KERNELS = "cuda"  # the backend under test; the reference with --dry-run

# name: (batch, channels, N) for Mamba1, (batch, heads, head_dim, groups, N) for Mamba2.
MAMBA1_SHAPES = {"mamba-2.8b": (1, 5120, 16), "falcon-mamba-7b": (1, 8192, 16)}
MAMBA2_SHAPES = {"mamba2-2.7b": (1, 80, 64, 1, 128), "codestral-7b": (1, 128, 64, 8, 128)}
DRY_MAMBA1 = {"tiny": (1, 12, 16)}
DRY_MAMBA2 = {"tiny": (1, 4, 8, 2, 16)}


def rel_err(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1.0)).item()


def mamba1(b, L, D, N, dtype=mx.float32):
    r = mx.random.normal
    return dict(u=r((b, L, D)).astype(dtype), delta=(0.5 * r((b, L, D))).astype(dtype),
                A=-mx.exp(r((D, N))), B=r((b, L, N)).astype(dtype), C=r((b, L, N)).astype(dtype),
                D=r((D,)), z=r((b, L, D)).astype(dtype), delta_bias=0.1 * r((D,)),
                delta_softplus=True, state=r((b, D, N)), return_last_state=True)


def mamba2(b, L, H, P, G, N, dtype=mx.float32):
    r = mx.random.normal
    return dict(x=r((b, L, H, P)).astype(dtype), dt=(0.5 * r((b, L, H))).astype(dtype),
                A=-mx.exp(r((H,))), B=r((b, L, G, N)).astype(dtype), C=r((b, L, G, N)).astype(dtype),
                chunk_size=256, D=r((H,)), z=r((b, L, H, P)).astype(dtype), dt_bias=0.1 * r((H,)),
                dt_softplus=True, dt_limit=(0.001, 10.0), initial_states=r((b, H, P, N)),
                return_final_states=True)


GRAD_ARGS = {"selective_scan": ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state"],
             "ssd": ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]}


def loss_and_grad(op, kw, backend):
    names = GRAD_ARGS[op]

    def loss(*arrays):
        y, last = getattr(ops, op)(**{**kw, **dict(zip(names, arrays))}, backend=backend)
        return (y.astype(mx.float32) ** 2).mean() + (last ** 2).mean()

    return lambda: mx.value_and_grad(loss, argnums=tuple(range(len(names))))(*(kw[n] for n in names))


def check(op, kw):
    got = getattr(ops, op)(**kw, backend=KERNELS)
    ref = getattr(ops, op)(**kw, backend="reference")
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    (_, g1), (_, g2) = loss_and_grad(op, kw, KERNELS)(), loss_and_grad(op, kw, "reference")()
    gerrs = [rel_err(a, b) for a, b in zip(g1, g2)]
    tol = TOL if kw["B"].dtype == mx.float32 else 2e-2
    ok = max(errs + gerrs) < tol
    print(f"  {op} {kw['B'].dtype} {tuple(kw['B'].shape)}: forward {max(errs):.2e}, "
          f"gradients {max(gerrs):.2e} {'ok' if ok else 'FAIL'}")
    return ok


def check_steps():
    s1 = mamba1(3, 1, 37, 12)
    args = dict(state=s1["state"], u=s1["u"][:, 0], delta=s1["delta"][:, 0], A=s1["A"],
                B=s1["B"][:, 0], C=s1["C"][:, 0], D=s1["D"], z=s1["z"][:, 0],
                delta_bias=s1["delta_bias"], delta_softplus=True)
    e1 = max(rel_err(a, b) for a, b in zip(ops.selective_scan_step(**args, backend=KERNELS),
                                           ops.selective_scan_step(**args, backend="reference")))
    s2 = mamba2(3, 1, 6, 5, 3, 12)
    args = dict(state=s2["initial_states"], x=s2["x"][:, 0], dt=s2["dt"][:, 0], A=s2["A"],
                B=s2["B"][:, 0], C=s2["C"][:, 0], D=s2["D"], z=s2["z"][:, 0], dt_bias=s2["dt_bias"],
                dt_softplus=True, dt_limit=(0.001, 10.0))
    e2 = max(rel_err(a, b) for a, b in zip(ops.ssd_step(**args, backend=KERNELS),
                                           ops.ssd_step(**args, backend="reference")))
    print(f"  steps: selective_scan_step {e1:.2e}, ssd_step {e2:.2e}")
    return max(e1, e2) < TOL


def decode_step(b, H, P, G, N):
    """(our ssd_step, mlx-lm's ssm_update) on the same decode step: A = -exp(A_log), no gate."""
    s = mamba2(b, 1, H, P, G, N)
    A_log, limit = mx.log(-s["A"]), s["dt_limit"]
    ours = dict(state=s["initial_states"], x=s["x"][:, 0], dt=s["dt"][:, 0], A=s["A"], B=s["B"][:, 0],
                C=s["C"][:, 0], D=s["D"], dt_bias=s["dt_bias"], dt_softplus=True, dt_limit=limit)

    def theirs():
        y, state = ssm_update(s["x"], A_log, s["B"], s["C"], s["D"], s["dt"], s["dt_bias"],
                              s["initial_states"], limit)
        return y[:, 0], state
    return (lambda backend: ops.ssd_step(**ours, backend=backend)), theirs


def check_mlx_lm():
    ours, theirs = decode_step(3, 8, 16, 2, 32)
    e = max(rel_err(a, b) for a, b in zip(ours(KERNELS), theirs()))
    print(f"  ssd_step against mlx-lm's ssm_update: {e:.2e}")
    return e < TOL


def timeit(fn, reps):
    mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    mx.synchronize()
    return 1e3 * (time.perf_counter() - start) / reps


def bench(op, name, kw, reps):
    ms = {}
    for backend in (KERNELS, "reference"):
        ms[backend] = (timeit(lambda: getattr(ops, op)(**kw, backend=backend), reps),
                       timeit(loss_and_grad(op, kw, backend), reps))
    (kf, kb), (rf, rb) = ms[KERNELS], ms["reference"]
    line = (f"  {op} {name} L={kw['B'].shape[1]} {kw['B'].dtype}: kernels {kf:.2f} / {kb:.2f} ms, "
            f"reference {rf:.2f} / {rb:.2f} ms (fwd / fwd+bwd): x{rf / kf:.1f} / x{rb / kb:.1f}")
    if op == "ssd":  # mlx-lm's pure-MLX prefill, forward only
        A_log = mx.log(-kw["A"])
        lm = timeit(lambda: ssm_attn(kw["x"], A_log, kw["B"], kw["C"], kw["D"], kw["dt"], kw["dt_bias"],
                                     kw["initial_states"], kw["dt_limit"]), reps)
        line += f"; mlx-lm ssm_attn {lm:.2f} ms fwd: x{lm / kf:.1f}"
    print(line)


def bench_decode(name, shape, reps):
    b, H, P, G, N = shape
    for batch in (b, 16):
        ours, theirs = decode_step(batch, H, P, G, N)
        k, r, lm = timeit(lambda: ours(KERNELS), reps), timeit(lambda: ours("reference"), reps), timeit(theirs, reps)
        print(f"  ssd_step {name} batch {batch}: kernels {k:.3f} ms, reference {r:.3f} ms (x{r / k:.1f}), "
              f"mlx-lm {lm:.3f} ms (x{lm / k:.1f})")


def main():
    global KERNELS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prefill of 512 tokens, not 2048")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU, the reference in place of the kernels: checks the script")
    args = parser.parse_args()
    shapes1, shapes2, length, reps = MAMBA1_SHAPES, MAMBA2_SHAPES, 512 if args.quick else 2048, 5
    if args.dry_run:
        KERNELS, shapes1, shapes2, length, reps = "reference", DRY_MAMBA1, DRY_MAMBA2, 19, 1
        mx.set_default_device(mx.cpu)
    elif not mx.cuda.is_available():
        sys.exit("MLX has no CUDA backend here: install mlx[cuda13] on a machine with an NVIDIA GPU")
    else:
        mx.set_default_device(mx.gpu)
    mx.random.seed(0)
    print(f"kernels: {KERNELS}; mlx-lm's ssm_update runs "
          + ("its Metal kernel" if mx.default_device() == mx.gpu and mx.metal.is_available()
             else "its pure-MLX ssm_attn (its decode kernel is Metal-only)"))
    print("checks (odd shapes, error relative to the output's scale):")
    ok = check_steps() & check_mlx_lm()
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        ok &= check("selective_scan", mamba1(2, 77, 37, 12, dtype))
        ok &= check("ssd", mamba2(2, 131, 6, 5, 3, 40, dtype))
    print("prefill (ms per call; xR = the other side's time / the kernels'):")
    for name, (b, D, N) in shapes1.items():
        bench("selective_scan", name, mamba1(b, length, D, N), reps)
    for name, (b, H, P, G, N) in shapes2.items():
        bench("ssd", name, mamba2(b, length, H, P, G, N), reps)
        bench("ssd", name, mamba2(b, length, H, P, G, N, mx.bfloat16), reps)
    print("decode (ms per step):")
    for name, shape in shapes2.items():
        bench_decode(name, shape, 20 * reps)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
