"""Checks the CUDA scan kernels against the pure-MLX reference on an NVIDIA GPU, then times both.

Needs MLX's CUDA build; this script installs nothing. On the GPU machine:
    python -m pip install -e ".[cuda]"        # mlx[cuda13]; or: python -m pip install "mlx[cuda13]"
    python benchmarks/kernels_cuda.py [--quick]
Prints the largest error of every output and gradient (relative to the output's scale), then
milliseconds per call, forward and forward+backward, for the kernels and for the reference.
Exit status 1 when a check fails.
"""
import argparse
import math
import sys
import time

import mlx.core as mx

from mlx_mamba import ops

TOL = 1e-4  # float32 on a GPU: the reference's matmuls may round differently from a serial scan


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
    ok = True
    got = getattr(ops, op)(**kw, backend="cuda")
    ref = getattr(ops, op)(**kw, backend="reference")
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    (l1, g1), (l2, g2) = loss_and_grad(op, kw, "cuda")(), loss_and_grad(op, kw, "reference")()
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
    e1 = max(rel_err(a, b) for a, b in zip(ops.selective_scan_step(**args, backend="cuda"),
                                           ops.selective_scan_step(**args, backend="reference")))
    s2 = mamba2(3, 1, 6, 5, 3, 12)
    args = dict(state=s2["initial_states"], x=s2["x"][:, 0], dt=s2["dt"][:, 0], A=s2["A"],
                B=s2["B"][:, 0], C=s2["C"][:, 0], D=s2["D"], z=s2["z"][:, 0], dt_bias=s2["dt_bias"],
                dt_softplus=True, dt_limit=(0.001, 10.0))
    e2 = max(rel_err(a, b) for a, b in zip(ops.ssd_step(**args, backend="cuda"),
                                           ops.ssd_step(**args, backend="reference")))
    print(f"  steps: selective_scan_step {e1:.2e}, ssd_step {e2:.2e}")
    return max(e1, e2) < TOL


def timeit(fn, reps):
    mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    mx.synchronize()
    return 1e3 * (time.perf_counter() - start) / reps


def bench(op, kw, reps):
    line = f"  {op} {tuple(kw['B'].shape)} {kw['B'].dtype}:"
    for backend in ("cuda", "reference"):
        fwd = timeit(lambda: getattr(ops, op)(**kw, backend=backend), reps)
        bwd = timeit(loss_and_grad(op, kw, backend), reps)
        line += f"  {backend} {fwd:.2f} ms fwd, {bwd:.2f} ms fwd+bwd;"
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller timing shapes")
    args = parser.parse_args()
    if not mx.cuda.is_available():
        sys.exit("MLX has no CUDA backend here: install mlx[cuda13] on a machine with an NVIDIA GPU")
    mx.set_default_device(mx.gpu)
    mx.random.seed(0)
    print("checks (odd shapes, error relative to the output's scale):")
    ok = check_steps()
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        ok &= check("selective_scan", mamba1(2, 77, 37, 12, dtype))
        ok &= check("ssd", mamba2(2, 131, 6, 5, 3, 40, dtype))
    scale = 4 if args.quick else 1
    print("timings (ms per call):")
    bench("selective_scan", mamba1(1, 2048 // scale, 1536, 16), 10)
    bench("ssd", mamba2(1, 2048 // scale, 48, 64, 1, 128), 10)
    bench("ssd", mamba2(1, 2048 // scale, 128, 64, 8, 128, mx.bfloat16), 5)  # Codestral-like
    step = mamba2(16, 1, 48, 64, 1, 128)
    args2 = dict(state=step["initial_states"], x=step["x"][:, 0], dt=step["dt"][:, 0], A=step["A"],
                 B=step["B"][:, 0], C=step["C"][:, 0], D=step["D"], z=step["z"][:, 0])
    for backend in ("cuda", "reference"):
        print(f"  ssd_step batch 16, {backend}: {timeit(lambda: ops.ssd_step(**args2, backend=backend), 100):.3f} ms")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
