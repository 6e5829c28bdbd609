"""Speculative decoding on models that learned the same text: acceptance, model passes per
token and decode speed against plain decoding and against mlx-lm's, plus prompt lookup.

A target and a small draft (both Mamba2, character-level) are trained with the library's own
trainer (mlx_mamba.tuner) on the repository's Shakespeare excerpt, once: the weights are cached
in --cache and reused. Then, from the same held-out prompts, the target decodes greedily: plainly
(mlx-mamba, and mlx-lm's generate_step on the same weights), with the draft proposing K tokens
per round, and with prompt lookup on a copy-heavy prompt (a passage, then its start again). Every
speculative text is checked to equal the plain one. Speeds are generated tokens over the whole
call's time (the prompt is short), medians over --repeats.

On MLX's CPU backend a forward over K+1 tokens costs about K+1 times one token's (compute
bound), so the measured speed-up is small or below one. On a bandwidth-bound device (Apple GPU),
a pass costs about the time to read its weights whatever the token count (K+1 <= ~16), so the
speed-up that the measured acceptance implies is estimated as

    speed-up = (tokens per model pass) / (1 + (K + 1) * c)

c = draft weight bytes / target weight bytes (the draft runs K + 1 steps per round); c = 0 for
prompt lookup. An estimate, not a measurement.

    python benchmarks/speculative.py                      # small sizes (2 shared CPU cores)
    python benchmarks/speculative.py --target-d-model 512 --target-layers 8 \\
        --draft-d-model 128 --draft-layers 2 --iters 2000   # the issue's sizes
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mlx_mamba
from mlx_mamba import ModelConfig
from mlx_mamba.tuner.datasets import Example, iterate_batches
from mlx_mamba.tuner.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "tinyshakespeare-excerpt.txt"
sys.path.insert(0, str(ROOT / "examples"))
from common import CharTokenizer  # noqa: E402  (examples/common.py: the character tokenizer)


def config(d_model, layers, vocab):
    return ModelConfig(arch="mamba2", d_model=d_model, n_layer=layers, vocab_size=vocab,
                       d_state=32, head_dim=32, chunk_size=64, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)


def trained(name, d_model, layers, ids, vocab, args):
    """A model trained on `ids` with the library's trainer, or its cached weights."""
    model = mlx_mamba.Model(config(d_model, layers, vocab))
    file = args.cache / f"{name}-d{d_model}-l{layers}-i{args.iters}-s{args.seq_len}.safetensors"
    if file.exists():
        model.load_weights(str(file))
        print(f"{name}: cached weights {file}", flush=True)
    else:
        mx.random.seed(len(name))
        model = mlx_mamba.Model(config(d_model, layers, vocab))
        rng = np.random.default_rng(0)
        starts = rng.integers(0, len(ids) - args.seq_len - 1, 20000)
        examples = [Example(ids[s:s + args.seq_len + 1],
                            np.arange(args.seq_len + 1) > 0) for s in starts]
        schedule = optim.cosine_decay(args.lr, args.iters, args.lr / 10)
        start = time.perf_counter()
        train(model, optim.AdamW(schedule), iterate_batches(examples, args.batch_size),
              iters=args.iters, steps_per_report=max(args.iters // 5, 1))
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
        args.cache.mkdir(parents=True, exist_ok=True)
        model.save_weights(str(file))
    mx.eval(model.parameters())
    model.eval()
    return model


def weight_bytes(model):
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def timed(run):
    """(tokens, seconds) of run() -> iterable of token ids."""
    mx.synchronize()
    start = time.perf_counter()
    tokens = list(run())
    return tokens, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-d-model", type=int, default=128)
    p.add_argument("--target-layers", type=int, default=3)
    p.add_argument("--draft-d-model", type=int, default=32)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--iters", type=int, default=200, help="training steps of each model")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-draft-tokens", type=int, nargs="+", default=[2, 3, 4, 6])
    p.add_argument("--prompt-lookup", type=int, default=4, help="longest n-gram looked up")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts")
    p.add_argument("--repeats", type=int, default=1, help="runs per line; the median is shown")
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache" / "speculative")
    args = p.parse_args()

    text = DATA.read_text()
    tokenizer = CharTokenizer(text)
    ids = np.array(tokenizer.encode(text), np.int32)
    split = int(0.9 * len(ids))
    vocab = len(tokenizer.chars)
    target = trained("target", args.target_d_model, args.target_layers, ids[:split], vocab, args)
    draft = trained("draft", args.draft_d_model, args.draft_layers, ids[:split], vocab, args)
    c = weight_bytes(draft) / weight_bytes(target)
    print(f"target {args.target_layers}x{args.target_d_model} ({weight_bytes(target) / 1e6:.1f} MB)"
          f", draft {args.draft_layers}x{args.draft_d_model} ({weight_bytes(draft) / 1e6:.2f} MB)"
          f": c = {c:.4f}; {mx.default_device()}, {args.decode_tokens} tokens per run")

    held_out = ids[split:]
    prompts = [held_out[i * 1000:i * 1000 + 64].tolist() for i in range(args.prompts)]
    passage = held_out[-400:].tolist()
    copying = [passage + passage[:80]]  # a passage, then its start again: copy-heavy

    def ours(prompt, **kwargs):
        responses = []

        def run():
            for r in mlx_mamba.stream_generate(target, None, prompt, max_tokens=args.decode_tokens,
                                               **kwargs):
                responses.append(r)
                yield r.token
        tokens, seconds = timed(run)
        return tokens, seconds, responses[-1].draft_stats

    def mlx_lm_plain(prompt, theirs):
        from mlx_lm.generate import generate_step

        steps = generate_step(mx.array(prompt), theirs, max_tokens=args.decode_tokens)
        tokens, seconds = timed(lambda: (int(t) for t, _ in steps))
        return tokens, seconds, None

    sys.path.insert(0, str(Path(__file__).parent))
    from generate import mlx_lm_model  # benchmarks/generate.py: the same weights in mlx-lm

    theirs = mlx_lm_model(target.config, tree_flatten(target.parameters()))
    lines = [("plain, mlx-lm", prompts, lambda q: mlx_lm_plain(q, theirs), 0)]
    lines.append(("plain, mlx-mamba", prompts, lambda q: ours(q), 0))
    for k in args.num_draft_tokens:
        lines.append((f"draft model, K={k}", prompts,
                      lambda q, k=k: ours(q, draft_model=draft, num_draft_tokens=k), k))
    lines.append(("copy task: plain, mlx-lm", copying, lambda q: mlx_lm_plain(q, theirs), 0))
    lines.append(("copy task: plain", copying, lambda q: ours(q), 0))
    for k in args.num_draft_tokens:
        lines.append((f"copy task: prompt lookup {args.prompt_lookup}, K={k}", copying,
                      lambda q, k=k: ours(q, prompt_lookup=args.prompt_lookup,
                                          num_draft_tokens=k), -k))
    plain_text = {}
    rows = []
    for name, inputs, run, k in lines:
        run(inputs[0][:8])  # warm-up
        speeds, proposed, accepted, passes, generated = [], 0, 0, 0, 0
        for prompt in inputs:
            runs = [run(prompt) for _ in range(args.repeats)]
            tokens, _, stats = runs[0]
            key = tuple(prompt)
            if name.endswith("mlx-mamba") or name == "copy task: plain":
                plain_text[key] = tokens
            elif key in plain_text:
                assert tokens == plain_text[key], f"{name}: not the plain text"
            speeds.append(statistics.median(len(t) / s for t, s, _ in runs))
            generated += len(tokens)
            if stats is not None:
                proposed, accepted, passes = (proposed + stats.proposed,
                                              accepted + stats.accepted, passes + stats.passes)
        per_token = passes / generated if stats is not None else 1.0
        estimate = (1 / per_token) / (1 + (abs(k) + 1) * c) if k > 0 else 1 / per_token
        rows.append((name, statistics.median(speeds), accepted / proposed if proposed else None,
                     per_token, estimate))
        print(f"{name}: {rows[-1][1]:.1f} tok/s", flush=True)

    base = {name: tps for name, tps, *_ in rows}
    print("\n| decoding | tok/s (CPU) | vs plain | vs mlx-lm | acceptance | model passes per "
          "token | bandwidth-bound speed-up (estimate) |\n|---|---|---|---|---|---|---|")
    for name, tps, acceptance, per_token, estimate in rows:
        copy = "copy task: " if name.startswith("copy") else ""
        plain, theirs_tps = base[f"{copy}plain" if copy else "plain, mlx-mamba"], \
            base[f"{copy}plain, mlx-lm"]
        print(f"| {name} | {tps:.1f} | {tps / plain:.2f}x | {tps / theirs_tps:.2f}x | "
              f"{'-' if acceptance is None else f'{100 * acceptance:.0f}%'} | {per_token:.3f} | "
              f"{'-' if per_token == 1.0 else f'{estimate:.2f}x'} |")
    print("\nEvery speculative text equals the plain one (checked). Estimate: (tokens per pass) / "
          "(1 + (K+1) c) with a draft, tokens per pass with prompt lookup.")


if __name__ == "__main__":
    main()
