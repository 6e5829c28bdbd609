"""Prefill and decode speed of mlx-mamba's generation, side by side with mlx-lm and transformers.

Every implementation runs the same random weights in one process, one after the other, through
its own generation entry point (mlx_mamba.stream_generate, mlx_lm.stream_generate,
transformers' generate), timed the same way from outside: prefill tokens/s is prompt tokens over
the time to the first generated token; decode tokens/s is the tokens after the first over the
time after it. Peak memory is mx.get_peak_memory() (MLX's buffers; torch is not counted).

    python benchmarks/generate.py                     # 130m shapes, 128-token prompt, 32 tokens
    python benchmarks/generate.py --models all --prompt-tokens 1024 --decode-tokens 128
"""

import argparse
import math
import platform
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_mamba
from mlx_mamba.config import ModelConfig
from mlx_mamba.models import Model

SHAPES = {
    "mamba-130m": dict(arch="mamba1", d_model=768, n_layer=24, d_state=16),
    "mamba-370m": dict(arch="mamba1", d_model=1024, n_layer=48, d_state=16),
    "mamba2-130m": dict(arch="mamba2", d_model=768, n_layer=24, d_state=128, head_dim=64),
    "mamba2-370m": dict(arch="mamba2", d_model=1024, n_layer=48, d_state=128, head_dim=64),
}
VOCAB = 50280


def make_config(name):
    shape = dict(SHAPES[name])
    if shape["arch"] == "mamba1":
        shape["dt_rank"] = math.ceil(shape["d_model"] / 16)
    return ModelConfig(vocab_size=VOCAB, **shape)


def make_tokenizer():
    """The GPT-NeoX tokenizer (from the hub) without an EOS, so that no run stops early."""
    from transformers import PreTrainedTokenizerFast

    from mlx_mamba.loader import STATE_SPACES_TOKENIZER, locate_tokenizer

    file = locate_tokenizer(STATE_SPACES_TOKENIZER) / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(file))


def mlx_lm_model(config, weights):
    """mlx-lm's model of the same shape, loaded with the same weights (same tensor names)."""
    from mlx_lm.models import mamba, mamba2

    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                  intermediate_size=config.d_inner, state_size=config.d_state,
                  num_hidden_layers=config.n_layer, conv_kernel=config.d_conv,
                  use_bias=config.bias, use_conv_bias=config.conv_bias, tie_word_embeddings=True)
    if config.arch == "mamba1":
        model = mamba.Model(mamba.ModelArgs(model_type="mamba", time_step_rank=config.dt_rank,
                                            **common))
    else:
        model = mamba2.Model(mamba2.ModelArgs(
            model_type="mamba2", num_heads=config.n_heads, head_dim=config.head_dim,
            layer_norm_epsilon=config.norm_eps, n_groups=config.n_groups,
            time_step_limit=config.dt_limit, time_step_rank="auto", **common))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


def transformers_model(config, weights):
    import torch
    import transformers

    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                  state_size=config.d_state, num_hidden_layers=config.n_layer,
                  conv_kernel=config.d_conv, expand=config.expand, use_bias=config.bias,
                  use_conv_bias=config.conv_bias, tie_word_embeddings=True)
    if config.arch == "mamba1":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            time_step_rank=config.dt_rank, intermediate_size=config.d_inner, **common))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            num_heads=config.n_heads, head_dim=config.head_dim, n_groups=config.n_groups,
            chunk_size=config.chunk_size, **common))
    state = {name: torch.from_numpy(np.array(value.swapaxes(1, 2) if "conv1d.weight" in name
                                             else value)) for name, value in weights}
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    model.tie_weights()  # the head is the embedding, which was not stored twice
    return model.eval()


# Wall-clock time is what a user sees; this process's CPU time is steadier on a shared machine
# (torch's CPU time sums its threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_stream(responses, clock):
    """(seconds to the first response, seconds after it, responses) of a response generator."""
    start = clock()
    first, count = None, 0
    for _ in responses:
        count += 1
        if first is None:
            first = clock()
    return first - start, clock() - first, count


def run_mlx(generate_fn, prompt, decode_tokens, clock):
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    to_first, after, count = time_stream(generate_fn(prompt, decode_tokens), clock)
    assert count == decode_tokens, f"{count} tokens generated, {decode_tokens} asked"
    return (len(prompt) / to_first, (count - 1) / after, mx.get_peak_memory() / 1e9)


def run_transformers(model, prompt, decode_tokens, clock):
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        start = clock()
        model(ids, use_cache=True).logits[:, -1].argmax(-1)
        prefill = clock() - start
        start = clock()
        model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                       do_sample=False)
        total = clock() - start
    return len(prompt) / prefill, (decode_tokens - 1) / max(total - prefill, 1e-9), None


def bench(name, args, tokenizer):
    config = make_config(name)
    mx.random.seed(0)
    ours = Model(config)
    mx.eval(ours.parameters())
    weights = tree_flatten(ours.parameters())
    prompt = np.random.default_rng(0).integers(1000, 30000, args.prompt_tokens).tolist()
    lines = {}

    def ours_fn(p, n):
        return mlx_mamba.stream_generate(ours, tokenizer, p, max_tokens=n)

    clock = CLOCKS[args.clock]
    runners = [("mlx-mamba", lambda p, n: run_mlx(ours_fn, p, n, clock))]
    if "mlx-lm" in args.against:
        import mlx_lm

        theirs = mlx_lm_model(config, weights)
        check = mx.array(prompt[:16])[None]
        gap = mx.abs(ours(check) - theirs(check)).max().item()
        print(f"{name}: max |logits mlx-mamba - mlx-lm| on 16 tokens = {gap:.2e}")
        runners.append(("mlx-lm", lambda p, n: run_mlx(
            lambda q, m: mlx_lm.stream_generate(theirs, tokenizer, q, max_tokens=m), p, n,
            clock)))
    if "transformers" in args.against:
        import torch

        reference = transformers_model(config, weights)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt[:16]])).logits.numpy()
        gap = np.abs(np.array(ours(mx.array(prompt[:16])[None])) - expected).max()
        print(f"{name}: max |logits mlx-mamba - transformers| on 16 tokens = {gap:.2e}")
        runners.append(("transformers (torch CPU)",
                        lambda p, n: run_transformers(reference, p, n, clock)))
    for _, runner in runners:
        runner(prompt[:16], 4)  # warm-up: first-call allocations and compilations
    results = {impl: [] for impl, _ in runners}
    for _ in range(args.repeats):  # interleaved, so that a change in machine load hits all alike
        for impl, runner in runners:
            results[impl].append(runner(prompt, args.decode_tokens))
            print(f"{name} {impl}: prefill {results[impl][-1][0]:.1f} tok/s, "
                  f"decode {results[impl][-1][1]:.2f} tok/s", flush=True)
    for impl, runs in results.items():
        lines[impl] = tuple(None if runs[0][i] is None else float(np.median([r[i] for r in runs]))
                            for i in range(3))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m"],
                        help=f"any of {', '.join(SHAPES)}, or 'all'")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="runs per line; the median is shown")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steadier when "
                             "other work shares the machine)")
    parser.add_argument("--against", nargs="*", default=["mlx-lm", "transformers"],
                        choices=["mlx-lm", "transformers"])
    args = parser.parse_args()
    names = list(SHAPES) if args.models == ["all"] else args.models
    tokenizer = make_tokenizer()
    table = {name: bench(name, args, tokenizer) for name in names}

    print(f"\n{platform.system()} {platform.machine()}, MLX {mx.__version__} "
          f"{mx.default_device()} backend (mlx_mamba ops: "
          f"{mlx_mamba.ops.resolve_backend()}), float32, prompt {args.prompt_tokens} tokens, "
          f"{args.decode_tokens} decoded, median of {args.repeats}, {args.clock} clock\n")
    print("| model | implementation | prefill tok/s | decode tok/s | peak MLX memory GB "
          "| prefill vs mlx-lm | decode vs mlx-lm |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, lines in table.items():
        base = lines.get("mlx-lm")
        for impl, (prefill, decode, memory) in lines.items():
            ratios = (f"{prefill / base[0]:.2f}x | {decode / base[1]:.2f}x" if base else "- | -")
            memory = f"{memory:.3f}" if memory is not None else "-"
            print(f"| {name} | {impl} | {prefill:.1f} | {decode:.2f} | {memory} | {ratios} |")


if __name__ == "__main__":
    main()
