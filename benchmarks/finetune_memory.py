"""Fine-tuning memory against sequence length, ours and mlx-lm's in one run: the same shapes
(random weights), the same tokens, one optimizer step of batch x length tokens, LoRA or full.

Models: Mamba1, Mamba2 and a hybrid with Granite 4.0-H's layers (Mamba2 and attention layers,
each followed by a gated MLP; no positional encoding), built from one transformers config by
both libraries (mlx-lm's `granitemoehybrid`).

For each length: peak memory of a step (mx.get_peak_memory after mx.reset_peak_memory, weights
and optimizer state included; the step before is a warm-up) and tokens/s (the faster of two
steps). The longest length that fits `--budget-gb` is extrapolated from the two longest lengths
measured (memory is linear in the length on both sides). The goals of issue 20 are checked at
`--goal-length`. A PNG plots memory against length.

    python benchmarks/finetune_memory.py --layers 4 --lengths 1024 2048 --plot docs/finetune-memory.png
    python benchmarks/finetune_memory.py --layers 24 --lengths 512 1024 2048 4096 8192
"""

import argparse
import json
import math
import platform
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import granitemoehybrid as lm_granite
from mlx_lm.models import mamba as lm_mamba
from mlx_lm.models import mamba2 as lm_mamba2
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_mamba.config import ModelConfig
from mlx_mamba.models import Model
from mlx_mamba.tuner import Batch, apply_adapters, loss_terms

VOCAB = 50280  # GPT-NeoX-20B's: the state-spaces models'
# Steps timed after the warm-up, the fastest counted: other jobs on shared cores only slow a step.
TIMED_STEPS = 2
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def granite_config(d_model, layers, vocab):
    """A transformers config of Granite 4.0-H's dense layers at `d_model`: an attention layer
    every fourth (heads of 64, a third as many KV heads), Mamba2 layers between (heads of 64,
    128 states), each followed by a gated MLP. The dense MLP is `intermediate_size` wide in
    mlx-lm and `shared_intermediate_size` in transformers' layout: both the same here."""
    return dict(model_type="granitemoehybrid", vocab_size=vocab, hidden_size=d_model,
                num_hidden_layers=layers, max_position_embeddings=131072,
                layer_types=["attention" if i % 4 == 3 else "mamba" for i in range(layers)],
                num_attention_heads=d_model // 64, num_key_value_heads=max(1, d_model // 192),
                attention_bias=False, attention_multiplier=64 ** -0.5, embedding_multiplier=1.0,
                logits_scaling=1.0, residual_multiplier=1.0, rms_norm_eps=1e-5,
                intermediate_size=4 * d_model, shared_intermediate_size=4 * d_model,
                num_local_experts=0, mamba_n_heads=2 * d_model // 64, mamba_d_head=64,
                mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
                mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False,
                position_embedding_type="nope", tie_word_embeddings=True)


def ours(arch, d_model, layers, vocab):
    if arch == "hybrid":
        return Model(ModelConfig.from_dict(granite_config(d_model, layers, vocab)))
    fields = dict(mamba1=dict(d_state=16, dt_rank=math.ceil(d_model / 16)),
                  mamba2=dict(d_state=128, head_dim=64, chunk_size=256))[arch]
    return Model(ModelConfig(arch=arch, d_model=d_model, n_layer=layers, vocab_size=vocab,
                             **fields))


def theirs(arch, d_model, layers, vocab):
    if arch == "hybrid":
        return lm_granite.Model(lm_granite.ModelArgs.from_dict(granite_config(d_model, layers,
                                                                              vocab)))
    if arch == "mamba1":
        return lm_mamba.Model(lm_mamba.ModelArgs(
            "mamba", vocab, d_model, 2 * d_model, 16, layers, 4, False, True,
            math.ceil(d_model / 16)))
    return lm_mamba2.Model(lm_mamba2.ModelArgs(
        "mamba2", 2 * d_model // 64, 64, vocab, d_model, 2 * d_model, 128, layers, 1e-5, 4, 1,
        False, True, True, (0.0, float("inf")), 256))


def our_step(model, tokens):
    batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones(tokens[:, 1:].shape, np.float32),
                  np.full(len(tokens), tokens.shape[1] - 1, np.int32))
    grad = nn.value_and_grad(model, lambda m: loss_terms(m, batch)[0])
    return lambda: grad(model)


def their_step(model, tokens):
    lengths = mx.array([[0, tokens.shape[1] - 1]] * len(tokens))
    grad = nn.value_and_grad(model, default_loss)
    inputs = mx.array(tokens)
    return lambda: grad(model, inputs, lengths)


def measure(make_model, adapt, make_step, tokens):
    mx.random.seed(0)
    model = make_model()
    mx.eval(model.parameters())
    adapt(model)
    optimizer = optim.Adam(learning_rate=1e-5)
    step = make_step(model, tokens)

    def update():
        _, grads = step()
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)

    update()  # warm-up: allocations, optimizer state
    mx.clear_cache()
    mx.reset_peak_memory()
    seconds = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        update()
        seconds.append(time.perf_counter() - start)
    return mx.get_peak_memory() / 2**30, tokens.size / min(seconds)


def longest(points, budget):
    """The length at which the line through the two longest points reaches `budget` GB."""
    (l1, m1), (l2, m2) = points[-2:]
    slope = (m2 - m1) / (l2 - l1)
    return int(l2 + (budget - m2) / slope) if slope > 0 else math.inf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["mamba1", "mamba2", "hybrid"],
                        choices=["mamba1", "mamba2", "hybrid"])
    parser.add_argument("--kinds", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=768, help="130m: 768")
    parser.add_argument("--layers", type=int, default=4, help="130m: 24")
    parser.add_argument("--vocab-size", type=int, default=VOCAB,
                        help="a small one leaves the layers' share of the time")
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--goal-length", type=int, default=2048,
                        help="the length (one of --lengths) at which the goals are checked")
    parser.add_argument("--plot", default="finetune_memory.png")
    parser.add_argument("--save", help="write the measurements to this JSON file")
    parser.add_argument("--replot", nargs="+", metavar="JSON",
                        help="measure nothing: plot the curves of runs saved with --save")
    args = parser.parse_args()
    if args.replot:
        runs = [json.loads(open(path).read()) for path in args.replot]
        curves = {tuple(key.split()): points for run in runs for key, points in run.items()}
        return plot(curves, args)
    print(f"{platform.platform()}, MLX {mx.__version__}, device {mx.default_device()}; "
          f"d_model {args.d_model}, {args.layers} layers, vocabulary {args.vocab_size}, batch "
          f"{args.batch_size}, float32, random weights, one Adam step after a warm-up one\n")
    print("| model | tuning | tokens | mlx-mamba GB | mlx-lm GB | ratio | mlx-mamba tok/s | "
          "mlx-lm tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    curves, speeds = {}, {}
    for arch in args.archs:
        for kind in args.kinds:
            def adapt_ours(model):
                apply_adapters(model, {"fine_tune_type": kind, "num_layers": -1,
                                       "lora_parameters": LORA})

            def adapt_theirs(model):
                model.freeze()
                if kind == "lora":
                    linear_to_lora_layers(model, args.layers, LORA)
                else:  # mlx-lm's full tuning: the layers, as ours
                    for layer in model.layers:
                        layer.unfreeze()

            for length in args.lengths:
                shape = (arch, args.d_model, args.layers, args.vocab_size)
                tokens = rng.integers(0, args.vocab_size, (args.batch_size, length + 1))
                tokens = tokens.astype(np.int32)
                ours_gb, ours_tps = measure(lambda: ours(*shape), adapt_ours, our_step, tokens)
                theirs_gb, theirs_tps = measure(lambda: theirs(*shape), adapt_theirs, their_step,
                                                tokens)
                for side, gb, tps in (("mlx-mamba", ours_gb, ours_tps),
                                      ("mlx-lm", theirs_gb, theirs_tps)):
                    curves.setdefault((arch, kind, side), []).append((length, gb))
                    speeds[arch, kind, side, length] = tps
                print(f"| {arch} | {kind} | {args.batch_size} x {length} | {ours_gb:.2f} | "
                      f"{theirs_gb:.2f} | {ours_gb / theirs_gb:.2f} | {ours_tps:.0f} | "
                      f"{theirs_tps:.0f} |", flush=True)
    if len(args.lengths) >= 2:
        print(f"\nLongest sequence in {args.budget_gb:g} GB (extrapolated from the two longest "
              "lengths):")
        for (arch, kind, side), points in curves.items():
            print(f"  {arch} {kind} {side}: {longest(points, args.budget_gb)} tokens")
        if args.goal_length in args.lengths:
            goals(curves, speeds, args)
    if args.save:
        with open(args.save, "w") as file:
            json.dump({" ".join(key): points for key, points in curves.items()}, file)
    plot(curves, args)


def goals(curves, speeds, args):
    """Issue 20's goals at `--goal-length`: memory ratio <= 0.35, speed ratio >= 1, longest
    sequence in the budget >= 4x mlx-lm's."""
    length = args.goal_length
    print(f"\nGoals at {args.batch_size} x {length} tokens (ours / mlx-lm):\n")
    print(f"| model | tuning | memory (goal <= 0.35) | tokens/s (goal >= 1) | "
          f"longest in {args.budget_gb:g} GB (goal >= 4) |")
    print("|---|---|---|---|---|")
    for arch in args.archs:
        for kind in args.kinds:
            ours_curve, their_curve = (curves[arch, kind, side] for side in ("mlx-mamba", "mlx-lm"))
            memory = dict(ours_curve)[length] / dict(their_curve)[length]
            speed = speeds[arch, kind, "mlx-mamba", length] / speeds[arch, kind, "mlx-lm", length]
            reach = longest(ours_curve, args.budget_gb) / longest(their_curve, args.budget_gb)
            print(f"| {arch} | {kind} | {memory:.2f} {'met' if memory <= 0.35 else 'not met'} | "
                  f"{speed:.2f} {'met' if speed >= 1 else 'not met'} | "
                  f"{reach:.1f}x {'met' if reach >= 4 else 'not met'} |")


def plot(curves, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (arch, kind, side), points in curves.items():
        lengths, gb = zip(*points)
        axes.plot(lengths, gb, marker="o", linestyle="-" if side == "mlx-mamba" else "--",
                  label=f"{side} {arch} {kind}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel(f"sequence length (batch {args.batch_size})")
    axes.set_ylabel("peak memory of a training step (GB)")
    axes.set_title(f"Fine-tuning memory, d_model {args.d_model}, {args.layers} layers, "
                   f"vocabulary {args.vocab_size}")
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"\nPlot: {args.plot}")


if __name__ == "__main__":
    main()
