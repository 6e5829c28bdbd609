"""The scan ops against mlx-lm's methods on the same backend: time and peak memory, forward and
forward+backward, at sequence lengths 1024..8192.

- Mamba1: `ops.selective_scan` against mlx-lm's per-token recurrence (the arithmetic of its
  `MambaBlock.ssm_step`, one step per token, projections excluded on both sides).
- Mamba2: `ops.ssd` against mlx-lm's `ssm_attn` (mlx_lm.models.ssm), the same inputs.

    python benchmarks/ops.py
    python benchmarks/ops.py --lengths 1024 2048 4096 8192 --backend reference
"""

import argparse
import platform
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.ssm import ssm_attn

from mlx_mamba import ops


def mlx_lm_selective_scan(u, delta, A, B, C, D, delta_bias):
    # mlx-lm's Mamba1 prefill: its ssm_step arithmetic once per token.
    delta = nn.softplus(delta + delta_bias)
    state, ys = None, []
    for t in range(u.shape[1]):
        d, x = delta[:, t], u[:, t]
        new_state = mx.expand_dims(d * x, -1) * mx.expand_dims(B[:, t], 1)
        if state is not None:
            new_state += state * mx.exp(mx.expand_dims(d, -1) * A)
        state = new_state
        ys.append((state @ mx.expand_dims(C[:, t], -1)).squeeze(2) + D * x)
    return mx.stack(ys, axis=1)


def mamba1_inputs(length, channels, d_state):
    return dict(u=mx.random.normal((1, length, channels)),
                delta=mx.random.normal((1, length, channels)) - 3.0,
                A=-mx.exp(mx.random.normal((channels, d_state))),
                B=mx.random.normal((1, length, d_state)),
                C=mx.random.normal((1, length, d_state)),
                D=mx.random.normal((channels,)),
                delta_bias=mx.random.normal((channels,)))


def mamba2_inputs(length, heads, head_dim, d_state):
    return dict(x=mx.random.normal((1, length, heads, head_dim)),
                dt=mx.random.normal((1, length, heads)) - 3.0,
                A_log=mx.random.normal((heads,)),
                B=mx.random.normal((1, length, 1, d_state)),
                C=mx.random.normal((1, length, 1, d_state)),
                D=mx.random.normal((heads,)),
                dt_bias=mx.random.normal((heads,)))


def ours_mamba1(backend):
    return lambda u, delta, A, B, C, D, delta_bias: ops.selective_scan(
        u, delta, A, B, C, D, None, delta_bias, True, backend=backend)


def ours_mamba2(backend, chunk):
    return lambda x, dt, A_log, B, C, D, dt_bias: ops.ssd(
        x, dt, -mx.exp(A_log), B, C, chunk, D, None, dt_bias, True, backend=backend)


def theirs_mamba2(chunk):
    def run(x, dt, A_log, B, C, D, dt_bias):
        # ssm_attn clamps dt to time_step_limit; (0, inf) is the checkpoints' default.
        return ssm_attn(x, A_log, B, C, D, dt, dt_bias, time_step_limit=(0.0, float("inf")),
                        step=chunk)[0]
    return run


def measure(fn, inputs, backward, repeats):
    names = list(inputs)
    if backward:
        def loss(*arrays):
            return fn(**dict(zip(names, arrays))).sum()
        grad = mx.grad(loss, argnums=list(range(len(names))))
        run = lambda: grad(*inputs.values())  # noqa: E731
    else:
        run = lambda: fn(**inputs)  # noqa: E731
    mx.eval(run())
    mx.reset_peak_memory()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(run())
        best = min(best, time.perf_counter() - start)
    return best * 1e3, mx.get_peak_memory() / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--channels", type=int, default=1536, help="Mamba1 E (130m: 1536)")
    parser.add_argument("--heads", type=int, default=24, help="Mamba2 H (130m: 24)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--backend", default=None, help="force an ops backend")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"Machine: {platform.machine()} {platform.system()}, MLX {mx.__version__}, device "
          f"{mx.default_device()}, ops backend {ops.resolve_backend(args.backend)}; batch 1, "
          f"Mamba1 E={args.channels} N=16, Mamba2 H={args.heads} P=64 N=128 G=1 chunk "
          f"{args.chunk}\n")
    print("| op | pass | T | mlx-mamba ms | mlx-lm ms | speed-up | mlx-mamba MiB | mlx-lm MiB |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [("selective_scan", lambda t: mamba1_inputs(t, args.channels, 16),
              ours_mamba1(args.backend), mlx_lm_selective_scan),
             ("ssd", lambda t: mamba2_inputs(t, args.heads, 64, 128),
              ours_mamba2(args.backend, args.chunk), theirs_mamba2(args.chunk))]
    for name, make_inputs, ours, theirs in cases:
        for backward in (False, True):
            for length in args.lengths:
                inputs = make_inputs(length)
                mx.eval(inputs)
                ours_ms, ours_mem = measure(ours, inputs, backward, args.repeats)
                theirs_ms, theirs_mem = measure(theirs, inputs, backward, args.repeats)
                print(f"| {name} | {'fwd+bwd' if backward else 'fwd'} | {length} | "
                      f"{ours_ms:.0f} | {theirs_ms:.0f} | {theirs_ms / ours_ms:.2f}x | "
                      f"{ours_mem:.0f} | {theirs_mem:.0f} |", flush=True)


if __name__ == "__main__":
    main()
