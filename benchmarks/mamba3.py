"""Mamba-3 prefill: its chunked parallel forward against a per-token loop of its own `step`, and
against a Mamba2 mixer of the same width and state size, as time per token.

    python benchmarks/mamba3.py
    python benchmarks/mamba3.py --lengths 1024 2048 4096 8192 --d-model 512 --clock cpu
"""

import argparse
import platform
import time

import mlx.core as mx

from mlx_mamba import Mamba2, Mamba3


def timed(run, clock, repeats):
    """The median seconds of `repeats` evaluated runs (after one warm-up)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    mx.eval(run())
    times = []
    for _ in range(repeats):
        start = now()
        mx.eval(run())
        times.append(now() - start)
    return sorted(times)[len(times) // 2]


def step_loop(mixer, x):
    cache = mixer.make_cache(x.shape[0])
    outputs = []
    for t in range(x.shape[1]):
        outputs.append(mixer.step(x[:, t], cache))
        mx.eval(outputs[-1], cache.state)  # a decoder evaluates every token
    return mx.stack(outputs, axis=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--mimo", action="store_true", help="Mamba-3 MIMO (rank 4) instead of SISO")
    p.add_argument("--loop-max", type=int, default=2048,
                   help="longest length at which the per-token loop is run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, for shared machines")
    args = p.parse_args()
    mx.random.seed(0)
    mamba3 = Mamba3(args.d_model, d_state=args.d_state, headdim=args.headdim,
                    is_mimo=args.mimo, mimo_rank=4 if args.mimo else 1)
    mamba2 = Mamba2(args.d_model, d_state=args.d_state, head_dim=args.headdim, chunk_size=64)
    mx.eval(mamba3.parameters(), mamba2.parameters())
    print(f"{platform.machine()} {platform.system()}, MLX {mx.__version__} on "
          f"{mx.default_device()}; d_model {args.d_model}, d_state {args.d_state}, "
          f"{'MIMO' if args.mimo else 'SISO'}; {args.clock} clock, µs per token")
    print("| T | Mamba-3 parallel | Mamba-3 step loop | loop / parallel | Mamba2 | Mamba-3 / Mamba2 |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        x = mx.random.normal((1, length, args.d_model))
        per_token = lambda s: 1e6 * s / length  # noqa: E731
        parallel = timed(lambda: mamba3(x), args.clock, args.repeats)
        baseline = timed(lambda: mamba2(x), args.clock, args.repeats)
        if length <= args.loop_max:
            loop = timed(lambda: step_loop(mamba3, x), args.clock, 1)
            loop_cells = f"{per_token(loop):.0f} | {loop / parallel:.1f}x"
        else:
            loop_cells = "– | –"
        print(f"| {length} | {per_token(parallel):.0f} | {loop_cells} | {per_token(baseline):.0f} "
              f"| {parallel / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
