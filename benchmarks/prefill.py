"""Prefill (parallel forward) throughput and peak memory: mlx-mamba against mlx-lm, same weights.

Both models get identical random weights in one process, their logits are checked against each
other, and each forward is timed (best of --repeats after a warm-up) with its peak memory.

    python benchmarks/prefill.py                      # 130m-shaped Mamba1 and Mamba2
    python benchmarks/prefill.py --layers 24 --lengths 256 1024 2048
"""

import argparse
import importlib
import platform
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_mamba import ModelConfig
from mlx_mamba.models import Model

SHAPES = {
    "mamba-130m": dict(arch="mamba1", d_model=768, vocab_size=50280, d_state=16, dt_rank=48),
    "mamba2-130m": dict(arch="mamba2", d_model=768, vocab_size=50288, d_state=128, head_dim=64,
                        n_groups=1, chunk_size=256),
}


def mlx_lm_model(config, weights):
    """mlx-lm's model of the same architecture, built from our transformers-form config."""
    args = config.to_dict()
    args.setdefault("time_step_rank", "auto")
    module = importlib.import_module(f"mlx_lm.models.{config.model_type}")
    model = module.Model(module.ModelArgs.from_dict(args))
    model.load_weights(list(weights.items()))
    return model


def measure(forward, ids, repeats):
    mx.eval(forward(ids))  # warm-up
    best = float("inf")
    mx.reset_peak_memory()
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(forward(ids))
        best = min(best, time.perf_counter() - start)
    return ids.size / best, mx.get_peak_memory() / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=4,
                        help="layers of the model's shape (24 for the whole 130m model)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    print(f"Machine: {platform.machine()} {platform.system()}, MLX {mx.__version__}, "
          f"device {mx.default_device()}; {args.layers} layers of each shape, batch 1, float32\n")
    print("| model | tokens | mlx-mamba tok/s | mlx-lm tok/s | speed ratio | "
          "mlx-mamba peak MiB | mlx-lm peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        config = ModelConfig(n_layer=args.layers, **SHAPES[name])
        ours = Model(config)
        mx.eval(ours.parameters())
        theirs = mlx_lm_model(config, dict(tree_flatten(ours.parameters())))
        check = mx.random.randint(0, 1000, (1, 64))
        difference = mx.abs(ours(check) - theirs(check)).max().item()
        assert difference < 1e-3, f"{name}: the two models disagree ({difference})"
        for length in args.lengths:
            ids = mx.random.randint(0, config.vocab_size, (1, length))
            ours_tps, ours_mem = measure(ours, ids, args.repeats)
            theirs_tps, theirs_mem = measure(theirs, ids, args.repeats)
            print(f"| {name} | {length} | {ours_tps:.0f} | {theirs_tps:.0f} | "
                  f"{ours_tps / theirs_tps:.2f}x | {ours_mem:.0f} | {theirs_mem:.0f} |", flush=True)


if __name__ == "__main__":
    main()
