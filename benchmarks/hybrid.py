"""Hybrid models (Granite 4.0-H, Nemotron-H, Falcon-H1, Jamba): mlx-mamba against mlx-lm on the
same weights.

One set of random weights is made by mlx-mamba, renamed and laid out as the hub's checkpoint holds
them and read by mlx-lm through its own `sanitize`; the two models' logits are compared on a prompt longer than a
chunk; then each generates through its own entry point, timed as in generate.py (prefill tok/s to
the first token, decode tok/s after it), with its peak MLX memory above the weights.

The configs are the real checkpoints' (SHAPES), made to fit a small CPU: `--layers` consecutive
layers of the real layer pattern, with its first attention layer and a Mamba layer after it
(prefill evaluates only the caches, so layers after the last Mamba layer never run);
`--narrow k` divides the width (hidden size, head counts, MLP and expert sizes) by k (by default
to about 400-500), keeping every per-head size, the state size, the groups, the expert count and
top-k; the vocabulary is that of the GPT-NeoX tokenizer that decodes the output. Full-size
models do not fit this project's 2-core CPU: a 4096-token prompt through one full Granite
4.0-H-Tiny layer is about 300 GFLOP.

    python benchmarks/hybrid.py --clock cpu                  # docs/benchmarks.md's table
    python benchmarks/hybrid.py --models granite-4.0-h-tiny --narrow 1 --layers 40   # the model
"""

import argparse
import dataclasses
import importlib
import math
import platform

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_mamba
from generate import CLOCKS, VOCAB, make_tokenizer, run_mlx
from mlx_mamba.config import ModelConfig
from mlx_mamba.families import to_checkpoint_names
from mlx_mamba.loader import build_model

GRANITE_LAYERS = (["mamba"] * 5 + ["attention"] + ["mamba"] * 9 + ["attention"]
                  + ["mamba"] * 9 + ["attention"] + ["mamba"] * 9 + ["attention"] + ["mamba"] * 4)
# The sizes and layer patterns of the published config.json files, with the fields whose defaults
# differ between mlx-lm and transformers spelled out. The µP multipliers are of the family's
# order, not the checkpoint's: they change no cost. Granite 4.0-H has one Mamba group, so
# mlx-lm's gated norm (over the whole width) computes what transformers' (per group) does.
SHAPES = {
    "granite-4.0-h-tiny": dict(
        model_type="granitemoehybrid", hidden_size=1536, num_hidden_layers=40,
        layer_types=GRANITE_LAYERS, num_attention_heads=12, num_key_value_heads=4,
        num_local_experts=64, num_experts_per_tok=6, intermediate_size=512,
        shared_intermediate_size=1024, mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
        mamba_conv_bias=True, mamba_proj_bias=False, attention_bias=False,
        position_embedding_type="nope", time_step_limit=[0.0, math.inf], rms_norm_eps=1e-5,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
        logits_scaling=6.0, vocab_size=100352, tie_word_embeddings=True,
        max_position_embeddings=131072),
    "nemotron-h-8b": dict(
        model_type="nemotron_h", hidden_size=4096, num_hidden_layers=52,
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=21504,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
        expand=2, chunk_size=128, use_conv_bias=True, use_bias=False, mamba_proj_bias=False,
        mlp_bias=False, attention_bias=False, time_step_limit=[0.0, math.inf],
        layer_norm_epsilon=1e-5, residual_in_fp32=False, vocab_size=131072,
        tie_word_embeddings=False, max_position_embeddings=8192),
    # Attention and Mamba2 side by side in every layer. mlx-lm 0.32.2 folds the µP multipliers
    # into the weights but drops `key_multiplier` (it looks for a `key_proj`) and leaves v
    # unscaled by `attention_in_multiplier`: both are 1 here, which changes no cost.
    "falcon-h1-0.5b": dict(
        model_type="falcon_h1", hidden_size=1024, num_hidden_layers=36, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=2048, mamba_d_ssm=1536,
        mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=128, mamba_conv_bias=True, mamba_proj_bias=False,
        mamba_rms_norm=False, mamba_norm_before_gate=False, attention_bias=False, mlp_bias=False,
        projectors_bias=False, rope_theta=1e11, rms_norm_eps=1e-5, vocab_size=32784,
        tie_word_embeddings=True, embedding_multiplier=5.66, lm_head_multiplier=0.039,
        attention_in_multiplier=1.0, key_multiplier=1.0, attention_out_multiplier=0.94,
        ssm_in_multiplier=1.25, ssm_out_multiplier=0.24, mlp_multipliers=[0.88, 0.59],
        ssm_multipliers=[0.35, 0.25, 0.35, 0.5, 0.35], max_position_embeddings=16384),
    # Mamba1 (with norms on Δ, B and C) and attention every 8 layers; a 16-expert MoE every
    # other layer.
    "jamba-v0.1": dict(
        model_type="jamba", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1, num_experts=16, num_experts_per_tok=2,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256,
        mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=1e-6, vocab_size=65536,
        tie_word_embeddings=False, max_position_embeddings=262144),
}
# mlx-lm's Jamba renormalises the top-2 router weights; transformers' (and so our default) does
# not. For the timing ours renormalises too, so that both compute the same thing (same cost).
AS_MLX_LM = {"jamba-v0.1": dict(router_normalize=True)}
# How many times narrower than the checkpoint each model runs by default: about 400-500 wide.
NARROW = {"granite-4.0-h-tiny": 4, "nemotron-h-8b": 8, "falcon-h1-0.5b": 2, "jamba-v0.1": 8}
# Nemotron-H's letters for the layer kinds, for the table (P: attention and Mamba2 in parallel).
LETTERS = {"mamba2": "M", "mamba1": "M", "attention": "*", "mlp": "-", "moe": "E", "parallel": "P"}
# The fields that make a model wider; --narrow divides them.
WIDTHS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "shared_intermediate_size", "mamba_n_heads", "mamba_num_heads", "moe_intermediate_size",
          "moe_shared_expert_intermediate_size", "mamba_d_ssm", "mamba_dt_rank")


def layer_window(kinds, layers):
    """Where `layers` consecutive entries of a layer pattern start: ending at the first Mamba
    layer after its first attention layer when there is room (at 0 otherwise).

    A Mamba layer last: prefill evaluates only the caches, so the layers after the last Mamba
    layer are skipped (by both libraries), and an attention layer there would cost nothing.
    """
    attention = next(i for i, kind in enumerate(kinds) if kind in ("attention", "*"))
    end = next(i for i in range(attention, len(kinds)) if kinds[i] in ("mamba", "M"))
    return max(end + 1 - layers, 0)


def pattern(config):
    return "".join(LETTERS[kind] for kind in config.layer_types)


def make_config(name, layers, narrow):
    """The real config of `name`, cut to `layers` layers and narrowed `narrow` times."""
    total = SHAPES[name]["num_hidden_layers"]
    if not 1 <= layers <= total:
        raise SystemExit(f"error: --layers {layers}: {name} has 1 to {total}")
    config = dict(SHAPES[name], vocab_size=VOCAB, num_hidden_layers=layers)
    for field in WIDTHS:
        if field in config:
            if config[field] % narrow:
                raise SystemExit(f"error: --narrow {narrow} does not divide {name}'s {field} "
                                 f"({config[field]})")
            config[field] //= narrow
    if "attn_layer_period" in config:  # Jamba: the pattern is two periods and their offsets
        period, offset = config["attn_layer_period"], config["attn_layer_offset"]
        kinds = ["attention" if i % period == offset else "mamba" for i in range(total)]
        start = layer_window(kinds, layers)
        for name in ("attn_layer", "expert_layer"):
            config[f"{name}_offset"] = (config[f"{name}_offset"] - start) % config[f"{name}_period"]
    elif config["model_type"] != "falcon_h1":  # Falcon-H1 has the same layer throughout
        kinds = "layer_types" if "layer_types" in config else "hybrid_override_pattern"
        start = layer_window(config[kinds], layers)
        config[kinds] = config[kinds][start:start + layers]
    return config


def mlx_lm_model(config, weights):
    """mlx-lm's model of the same checkpoint config, loaded with the same tensors (strictly)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    # As the hub's checkpoint holds them: torch's conv layout (C, 1, K), which is what tells
    # mlx-lm's Falcon-H1 to fold its multipliers in; copies, as that folding scales in place.
    weights = {k: v.swapaxes(1, 2) if k.endswith("conv1d.weight") else mx.array(v)
               for k, v in weights.items()}
    model.load_weights(list(model.sanitize(weights).items()))
    mx.eval(model.parameters())
    return model


def check_logits(ours, theirs, length):
    """The largest logit difference relative to the largest logit, on `length` random tokens."""
    ids = mx.random.randint(0, VOCAB, (1, length))
    a, b = ours(ids), theirs(ids)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def bench(name, args, tokenizer):
    import mlx_lm

    hf_config = make_config(name, args.layers, args.narrow or NARROW[name])
    mx.random.seed(0)
    try:
        config = dataclasses.replace(ModelConfig.from_dict(hf_config), **AS_MLX_LM.get(name, {}))
        ours = build_model(config)
    except ValueError as e:  # a narrowed or cut config that no model has
        raise SystemExit(f"error: {name}: {e}") from None
    mx.eval(ours.parameters())
    theirs = mlx_lm_model(hf_config, to_checkpoint_names(dict(tree_flatten(ours.parameters())),
                                                         config))
    gap = check_logits(ours, theirs, args.check_tokens)
    print(f"{name}: {pattern(config)}, max |logits mlx-mamba - mlx-lm| / max |logits| on "
          f"{args.check_tokens} tokens = {gap:.1e}", flush=True)
    if gap > 1e-4:
        raise SystemExit(f"error: {name}: the two models disagree ({gap:.1e}); timing them would "
                         "compare different computations")
    clock = CLOCKS[args.clock]
    runners = {
        "mlx-mamba": lambda p, n: mlx_mamba.stream_generate(ours, tokenizer, p, max_tokens=n),
        "mlx-lm": lambda p, n: mlx_lm.stream_generate(theirs, tokenizer, p, max_tokens=n),
    }

    def measure(generate_fn, prompt):
        """(prefill tok/s, decode tok/s, peak MiB above the memory held before)."""
        mx.synchronize()
        held = mx.get_active_memory()
        prefill, decode, peak = run_mlx(generate_fn, prompt, args.decode_tokens, clock)
        return prefill, decode, (peak * 1e9 - held) / 2**20

    for generate_fn in runners.values():
        measure(generate_fn, list(range(1000, 1016)))  # warm-up
    rows = []
    rng = np.random.default_rng(0)
    for length in args.prompt_tokens:
        prompt = rng.integers(1000, 30000, length).tolist()
        runs = {impl: [] for impl in runners}
        for _ in range(args.repeats):  # interleaved, so that a change in load hits both alike
            for impl, generate_fn in runners.items():
                runs[impl].append(measure(generate_fn, prompt))
                print(f"{name} {length} {impl}: prefill {runs[impl][-1][0]:.1f} tok/s, decode "
                      f"{runs[impl][-1][1]:.2f} tok/s, {runs[impl][-1][2]:.0f} MiB", flush=True)
        rows.append((length, {impl: np.median(r, axis=0) for impl, r in runs.items()}))
    return config, rows


def at_least(low):
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--narrow", type=at_least(1),
                        help="divide the width by this (1: the checkpoint's own width); by "
                             f"default {', '.join(f'{k} {v}' for k, v in NARROW.items())}")
    parser.add_argument("--prompt-tokens", type=at_least(1), nargs="+", default=[512, 4096])
    parser.add_argument("--decode-tokens", type=at_least(2), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=1,
                        help="runs per line; the median is shown")
    parser.add_argument("--check-tokens", type=at_least(1), default=300,
                        help="prompt length of the logits check (above mlx-lm's 256-token step)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steadier when "
                             "other work shares the machine)")
    args = parser.parse_args()
    tokenizer = make_tokenizer()
    table = {name: bench(name, args, tokenizer) for name in args.models}

    print(f"\n{platform.system()} {platform.machine()}, MLX {mx.__version__} "
          f"{mx.default_device()} backend (mlx_mamba ops: {mlx_mamba.ops.resolve_backend()}), "
          f"float32, batch 1, {args.layers} layers, vocabulary {VOCAB}, "
          f"{args.decode_tokens} decoded tokens, median of {args.repeats}, {args.clock} clock\n")
    print("| model | width | layers | prompt | prefill tok/s mlx-mamba / mlx-lm | ratio "
          "| decode tok/s mlx-mamba / mlx-lm | ratio | peak MiB mlx-mamba / mlx-lm |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (config, rows) in table.items():
        for length, lines in rows:
            (p0, d0, m0), (p1, d1, m1) = lines["mlx-mamba"], lines["mlx-lm"]
            print(f"| {name} | {config.d_model} | {pattern(config)} | {length} "
                  f"| {p0:.1f} / {p1:.1f} | {p0 / p1:.2f}x | {d0:.2f} / {d1:.2f} | {d0 / d1:.2f}x "
                  f"| {m0:.0f} / {m1:.0f} |")


if __name__ == "__main__":
    main()
