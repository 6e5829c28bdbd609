"""Reference models to measure quantization on, trained with the library's own trainer on
tinyshakespeare (benchmarks/data/tinyshakespeare.txt, the whole 1.1 MB corpus) with a byte-level
BPE tokenizer trained on the same text. Nothing reaches the network.

- `mamba2`: a pure Mamba2 model (transformers Mamba2 form, which mlx-lm also loads);
- `hybrid`: Granite 4.0-H's layout (transformers `granitemoehybrid`, dense): Mamba2 layers with
  one attention layer (no positions), each followed by a gated MLP; mlx-lm loads it too.

The text is split by characters: the first 85% trains (tokenizer and model), the next 5% is the
validation text of the stopping rule, the last 10% is held out for perplexity (quant_quality).

Stopping rule: the validation loss is evaluated every `--eval-every` steps; training stops when
the best validation loss has not improved by more than `--min-improvement` (relative) over
`--patience` evaluations, or at `--max-iters`, or after `--max-minutes`. The weights of the best
evaluation are kept. Learning rate: linear warmup, then constant (a decaying schedule would need
the stopping step in advance).

The model is saved as convert.py writes models (bfloat16) to benchmarks/cache/NAME, with
`training.json` (shape, parameters, stopping rule, why it stopped, the validation curve and the
held-out perplexity in bfloat16), and reused when it is already there.

    python benchmarks/reference_models.py --name mamba2     # trains if not cached, prints ppl
    python benchmarks/reference_models.py --name hybrid --max-minutes 35
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlx_mamba import ModelConfig
from mlx_mamba.convert import save_model
from mlx_mamba.loader import cast, load
from mlx_mamba.models import Model
from mlx_mamba.perplexity import evaluate_perplexity
from mlx_mamba.tuner import train
from mlx_mamba.tuner.datasets import Batch
from mlx_mamba.tuner.trainer import evaluate

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "tinyshakespeare.txt"
CACHE = HERE / "cache"
EOS = "<|endoftext|>"
VOCAB = 512
# Sized to flatten within about 35 minutes on two shared CPU cores (MLX CPU backend), where a
# training step of 8 x 128 tokens of a 1-2M-parameter model takes seconds: see
# docs/quantization-quality.md for the measured throughput and why not 20-40M parameters.
MAMBA = dict(state_size=32, head_dim=32, chunk_size=32, expand=2, conv_kernel=4)
CONFIGS = {
    "mamba2": dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"], vocab_size=VOCAB,
                   hidden_size=192, num_hidden_layers=4, num_heads=12, n_groups=1,
                   tie_word_embeddings=True, **MAMBA),
    "hybrid": dict(model_type="granitemoehybrid", architectures=["GraniteMoeHybridForCausalLM"],
                   vocab_size=VOCAB, hidden_size=192, num_hidden_layers=4,
                   layer_types=["mamba", "mamba", "attention", "mamba"],
                   num_attention_heads=6, num_key_value_heads=2, attention_bias=False,
                   max_position_embeddings=4096, position_embedding_type="nope",
                   rms_norm_eps=1e-5, embedding_multiplier=1.0, attention_multiplier=1 / 32 ** 0.5,
                   logits_scaling=1.0, residual_multiplier=1.0, num_local_experts=0,
                   num_experts_per_tok=0, intermediate_size=256, shared_intermediate_size=256,
                   hidden_act="silu", mamba_n_heads=12, mamba_d_head=32, mamba_n_groups=1,
                   mamba_d_state=32, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=32,
                   mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=[0.001, 100.0],
                   tie_word_embeddings=True),
}


def splits():
    """(training, validation, held-out) text."""
    text = TEXT.read_text()
    a, b = int(0.85 * len(text)), int(0.9 * len(text))
    return text[:a], text[a:b], text[b:]


def write_tokenizer(directory, text):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS}))
    return tokenizer


def batches(tokens, batch_size, length, seed):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - length - 1, batch_size)
        rows = np.stack([tokens[s:s + length + 1] for s in starts])
        yield Batch(rows[:, :-1], rows[:, 1:], np.ones((batch_size, length), np.float32),
                    np.full(batch_size, length, np.int32))


def consecutive(tokens, batch_size, length):
    """`tokens` cut into whole batches of consecutive sequences (the validation set)."""
    rows = len(tokens) // (length + 1) // batch_size * batch_size
    seqs = tokens[:rows * (length + 1)].reshape(rows, length + 1)
    return [Batch(s[:, :-1], s[:, 1:], np.ones((batch_size, length), np.float32),
                  np.full(batch_size, length, np.int32))
            for s in np.split(seqs, rows // batch_size)]


def train_until_flat(model, train_batches, valid, *, learning_rate, warmup, eval_every, patience,
                     min_improvement, max_iters, max_minutes, log=print):
    """Train `model` with the library's trainer, `eval_every` steps at a time, until the stopping
    rule fires; leaves the weights of the best evaluation in `model` and returns the record."""
    schedule = optim.join_schedules(
        [optim.linear_schedule(learning_rate / warmup, learning_rate, warmup),
         lambda step: learning_rate], [warmup])
    optimizer = optim.AdamW(schedule, weight_decay=0.01)
    curve = [(0, evaluate(model, valid))]
    best, best_step, best_weights = curve[0][1], 0, dict(tree_flatten(model.parameters()))
    since_best, start, reason = 0, time.perf_counter(), None
    log(f"step 0: validation loss {best:.4f}", flush=True)
    while reason is None:
        train(model, optimizer, train_batches, iters=eval_every, steps_per_report=eval_every,
              log=lambda *a, **k: None)
        step, loss = curve[-1][0] + eval_every, evaluate(model, valid)
        curve.append((step, loss))
        minutes = (time.perf_counter() - start) / 60
        if loss < best * (1 - min_improvement):
            since_best = 0
        else:
            since_best += 1
        if loss < best:
            best, best_step = loss, step
            best_weights = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
        log(f"step {step}: validation loss {loss:.4f} (best {best:.4f} at {best_step}), "
            f"{minutes:.1f} min", flush=True)
        if since_best >= patience:
            reason = (f"flat: the best validation loss improved by no more than "
                      f"{100 * min_improvement:g}% over {patience} evaluations")
        elif step >= max_iters:
            reason = f"max iterations ({max_iters}) reached, still improving"
        elif minutes >= max_minutes:
            reason = f"time limit ({max_minutes} min) reached, still improving"
    model.load_weights(list(best_weights.items()))
    return dict(stopped=reason, steps=curve[-1][0], best_step=best_step,
                best_validation_loss=best, minutes=round((time.perf_counter() - start) / 60, 1),
                curve=curve)


def reference_model(name="mamba2", cache=CACHE, **options):
    """The directory of reference model `name` under `cache`, trained and saved unless already
    there."""
    directory = Path(cache) / name
    if (directory / "config.json").is_file():
        return directory
    o = dict(batch_size=8, length=128, learning_rate=3e-3, warmup=20, eval_every=25, patience=4,
             min_improvement=0.005, max_iters=3000, max_minutes=35.0, valid_batches=8)
    o.update(options)
    train_text, valid_text, _ = splits()
    scratch = Path(cache) / f".{name}.tokenizer"
    scratch.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(scratch, train_text)
    train_tokens = np.array(tokenizer.encode(train_text).ids, np.int32)
    valid_tokens = np.array(tokenizer.encode(valid_text).ids, np.int32)
    mx.random.seed(0)
    config = ModelConfig.from_dict(dict(CONFIGS[name], eos_token_id=0, bos_token_id=0,
                                        pad_token_id=0))
    model = Model(config)
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    valid = consecutive(valid_tokens, o["batch_size"], o["length"])[:o["valid_batches"]]
    print(f"{name}: {parameters / 1e6:.2f}M parameters, {len(train_tokens)} training tokens, "
          f"{len(valid) * o['batch_size'] * o['length']} validation tokens", flush=True)
    record = train_until_flat(
        model, batches(train_tokens, o["batch_size"], o["length"], seed=0), valid,
        **{k: o[k] for k in ("learning_rate", "warmup", "eval_every", "patience",
                             "min_improvement", "max_iters", "max_minutes")})
    print(f"{name}: {record['stopped']} at step {record['steps']} ({record['minutes']} min)")
    weights = cast(dict(tree_flatten(model.parameters())), mx.bfloat16)
    record = dict(name=name, parameters=parameters, training_tokens=len(train_tokens),
                  options=o, device=str(mx.default_device()), **record)

    def extras(staging):
        (staging / "training.json").write_text(json.dumps(record, indent=1))

    save_model(directory, weights, model.config, scratch, extras=extras)
    for file in scratch.iterdir():
        file.unlink()
    scratch.rmdir()
    record["held_out_perplexity"] = held_out_perplexity(directory)
    (directory / "training.json").write_text(json.dumps(record, indent=1))
    return directory


def held_out_tokens(tokenizer):
    return np.array(tokenizer.encode(splits()[2]), np.int32)


def held_out_perplexity(directory, sequence_length=128, num_samples=32):
    """(perplexity, standard error) of the saved (bfloat16) model on the held-out text."""
    model, tokenizer = load(directory)
    ppl, error, _ = evaluate_perplexity(model, held_out_tokens(tokenizer), sequence_length, 8,
                                        num_samples)
    return round(ppl, 4), round(error, 4)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", choices=CONFIGS, default="mamba2")
    p.add_argument("--max-minutes", type=float, default=35.0)
    p.add_argument("--max-iters", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--min-improvement", type=float, default=0.005)
    args = p.parse_args()
    directory = reference_model(args.name, max_minutes=args.max_minutes,
                                max_iters=args.max_iters, eval_every=args.eval_every,
                                patience=args.patience, min_improvement=args.min_improvement)
    record = json.loads((directory / "training.json").read_text())
    ppl, error = record["held_out_perplexity"]
    print(f"{directory}: {record['parameters'] / 1e6:.2f}M parameters, {record['stopped']} at "
          f"step {record['steps']}; held-out perplexity {ppl:.3f} ± {error:.3f}")


if __name__ == "__main__":
    main()
