"""Shared-context reuse in evaluation: a multiple-choice task scored with and without it, on the
same model, as a ratio.

A task like HellaSwag or ARC: --questions contexts of --context-tokens random tokens, each with
--choices continuations of --choice-tokens. With reuse (the default of `mlx_mamba.evaluate`)
each context is prefilled once and every choice continues a copy of its state; without
(`--no-context-reuse`) every (context, choice) request is fed whole. Both go through
`scoring.continuation_logprobs`, whose results are checked to agree before any timing.

Models: a Mamba2 of mamba2-130m's shape and a Granite 4.0-H (hybrid: Mamba2, attention, MoE)
narrowed as in benchmarks/hybrid.py, each cut to --layers layers, random weights.

    python benchmarks/eval_reuse.py --clock cpu         # docs/evaluation.md's table
"""

import argparse
import platform

import mlx.core as mx
import numpy as np

from generate import CLOCKS, VOCAB
from hybrid import NARROW, make_config
from mlx_mamba.config import ModelConfig
from mlx_mamba.loader import build_model
from mlx_mamba.scoring import continuation_logprobs

MAMBA2_130M = dict(arch="mamba2", d_model=768, vocab_size=VOCAB, d_state=128, head_dim=64,
                   n_groups=1, chunk_size=256)
MODELS = ("mamba2-130m", "granite-4.0-h-tiny")


def make_model(name, layers):
    if name == "mamba2-130m":
        config = ModelConfig(**MAMBA2_130M, n_layer=layers)
    else:
        config = ModelConfig.from_dict(make_config(name, layers, NARROW[name]))
    mx.random.seed(0)
    model = build_model(config)
    mx.eval(model.parameters())
    return model


def make_requests(args):
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(args.questions):
        context = rng.integers(1000, 30000, args.context_tokens).tolist()
        requests += [(context, rng.integers(1000, 30000, args.choice_tokens).tolist())
                     for _ in range(args.choices)]
    return requests


def best_time(run, repeats, clock):
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--layers", type=int, default=4, help="layers of each model's pattern")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--choice-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    requests = make_requests(args)
    print(f"{platform.machine()}, MLX {mx.__version__} on {mx.default_device()}, clock: "
          f"{args.clock}; {args.questions} questions x {args.choices} choices, context "
          f"{args.context_tokens} tokens, choices {args.choice_tokens} tokens, batch "
          f"{args.batch_size}, {args.layers} layers")
    print("| model | with reuse (s) | without (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        model = make_model(name, args.layers)

        def score(reuse, model=model):
            return continuation_logprobs(model, requests, batch_size=args.batch_size,
                                         reuse=reuse)

        shared, alone = np.array(score(True))[:, 0], np.array(score(False))[:, 0]  # warm-up
        gap = float(np.abs(shared - alone).max() / np.abs(alone).max())
        if not gap < 1e-4:
            raise SystemExit(f"error: {name}: reuse changes the log-likelihoods ({gap:.1e})")
        with_reuse = best_time(lambda: score(True), args.repeats, clock)
        without = best_time(lambda: score(False), args.repeats, clock)
        print(f"| {name} | {with_reuse:.2f} | {without:.2f} | {without / with_reuse:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
