"""Sharded inference on local processes: tensor and pipeline parallel against one process.

For 1, 2 (and 4) processes started by `mlx.launch --backend ring` on 127.0.0.1: each rank's peak
MLX memory and weight bytes, the bytes each decoded token puts through the group per layer
against the minimum (one hidden vector per layer), prefill and decode tokens per second.

Local processes on one machine share its cores and memory bandwidth: they cannot be faster than
one process here, and on this project's 2-core CPU they are slower. What decides the speed on
two Macs over Thunderbolt is the communication volume per token, which the table gives.

    python benchmarks/sharded.py                       # 1 and 2 processes
    python benchmarks/sharded.py --processes 1 2 4 --layers 8 --width 1024
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_mamba  # noqa: E402
from mlx_mamba.config import ModelConfig  # noqa: E402
from mlx_mamba.convert import save_model  # noqa: E402
from mlx_mamba.loader import build_model  # noqa: E402


def write_model(directory, width, layers):
    """A Granite 4.0-H-like hybrid (Mamba2 with one group, one attention layer in four, a
    gated MLP), random weights in bfloat16."""
    kinds = ["attention" if i % 4 == 1 else "mamba" for i in range(layers)]
    config = ModelConfig.from_dict(dict(
        model_type="granitemoehybrid", hidden_size=width, num_hidden_layers=layers,
        layer_types=kinds, num_attention_heads=width // 64, num_key_value_heads=4,
        num_local_experts=0, intermediate_size=2 * width, shared_intermediate_size=2 * width,
        mamba_n_heads=2 * width // 64, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1,
        mamba_chunk_size=256, position_embedding_type="nope", vocab_size=32000,
        tie_word_embeddings=True))
    model = build_model(config)
    weights = {k: (0.02 * mx.random.normal(v.shape)).astype(mx.bfloat16)
               for k, v in tree_flatten(model.parameters())}
    save_model(directory, weights, config)


def counting(sizes):
    """Wrap the distributed calls so that each adds its payload's bytes to `sizes`."""
    for name in ("all_sum", "send"):
        original = getattr(mx.distributed, name)

        def counted(x, *args, _original=original, **kwargs):
            sizes.append(x.nbytes)
            return _original(x, *args, **kwargs)

        setattr(mx.distributed, name, counted)


def worker(directory, mode, prompt_tokens, decode_tokens):
    world = mx.distributed.init()
    mx.reset_peak_memory()
    if world.size() == 1:
        model, _ = mlx_mamba.load(directory)
    elif mode == "pipeline":
        model, _ = mlx_mamba.sharded_load(directory, pipeline_group=world)
    else:
        model, _ = mlx_mamba.sharded_load(directory, world)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt = mx.random.randint(0, 32000, (1, prompt_tokens), key=mx.random.key(0))
    cache = model.make_cache(1)
    start = time.perf_counter()
    token = mx.argmax(model(prompt, cache)[:, -1], axis=-1)
    mx.eval(token)
    prefill = time.perf_counter() - start
    sizes = []
    counting(sizes)
    start = time.perf_counter()
    for step in range(decode_tokens):
        token = mx.argmax(model.step(token, cache), axis=-1)
        mx.eval(token)
        if step == 0:
            per_token = sum(sizes)
    decode = time.perf_counter() - start
    ranks = mx.distributed.all_gather(mx.array([[mx.get_peak_memory(), weights]], mx.float32),
                                      group=world) if world.size() > 1 else \
        mx.array([[mx.get_peak_memory(), weights]], mx.float32)
    mx.eval(ranks)  # on every rank: a collective that one rank skips waits forever
    if world.rank() == 0:
        c = model.config
        print(json.dumps({
            "processes": world.size(), "mode": mode if world.size() > 1 else "one process",
            "peak_gb": [round(p / 1e9, 3) for p, _ in ranks.tolist()],
            "weights_gb": [round(w / 1e9, 3) for _, w in ranks.tolist()],
            "bytes_per_token_per_layer": per_token / c.n_layer,
            "minimum_per_layer": c.d_model * 2,
            "prefill_tps": prompt_tokens / prefill, "decode_tps": decode_tokens / decode}),
            flush=True)


def launch(directory, processes, mode, args, port):
    command = [sys.executable, __file__, "--worker", str(directory), "--mode", mode,
               "--prompt-tokens", str(args.prompt_tokens),
               "--decode-tokens", str(args.decode_tokens)]
    if processes > 1:
        command = ["mlx.launch", "--backend", "ring", "--hosts", "127.0.0.1", "-n",
                   str(processes), "--starting-port", str(port), "--", *command]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"error: {' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return json.loads(lines[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="tensor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.mode, args.prompt_tokens, args.decode_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "model"
        write_model(directory, args.width, args.layers)
        print(f"Granite 4.0-H-like hybrid, width {args.width}, {args.layers} layers, bfloat16; "
              f"prompt {args.prompt_tokens}, decode {args.decode_tokens} tokens; "
              f"{mx.default_device()}")
        print("| processes | mode | peak GB per rank | weights GB per rank | bytes/token/layer "
              "(minimum) | prefill tok/s | decode tok/s |")
        print("|---|---|---|---|---|---|---|")
        port = 48600
        for processes in args.processes:
            for mode in (["tensor", "pipeline"] if processes > 1 else ["tensor"]):
                r = launch(directory, processes, mode, args, port)
                port += 10
                print(f"| {processes} | {r['mode']} | {r['peak_gb']} | {r['weights_gb']} | "
                      f"{r['bytes_per_token_per_layer']:.0f} ({r['minimum_per_layer']}) | "
                      f"{r['prefill_tps']:.1f} | {r['decode_tps']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
