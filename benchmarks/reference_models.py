"""Reference models to measure quantization on: a small Mamba2 trained with the library's own
trainer on tinyshakespeare (benchmarks/data/tinyshakespeare.txt, the whole 1.1 MB corpus), with a
byte-level BPE tokenizer trained on the same text. Nothing reaches the network.

The text is split 90/10 by characters: the first 90% trains (tokenizer and model), the last 10%
is held out for perplexity. The model is saved, as convert.py writes models (transformers
Mamba2 form, bfloat16), to benchmarks/cache/NAME, and reused when it is already there.

    python benchmarks/reference_models.py                    # trains if not cached, prints ppl
    python benchmarks/reference_models.py --iters 2000       # longer (delete the cache first)
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

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "tinyshakespeare.txt"
CACHE = HERE / "cache"
EOS = "<|endoftext|>"
VOCAB = 512
# Small enough to train in minutes on two shared CPU cores (about 0.5M parameters).
SHAPES = {"mamba2": dict(arch="mamba2", d_model=128, n_layer=4, d_state=32, head_dim=32,
                         chunk_size=32)}


def splits():
    text = TEXT.read_text()
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


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


def reference_model(name="mamba2", iters=200, batch_size=8, length=64, learning_rate=3e-3):
    """The directory of reference model `name`, trained and saved unless already cached."""
    directory = CACHE / name
    if (directory / "config.json").is_file():
        return directory
    train_text, valid_text = splits()
    scratch = CACHE / f".{name}.tokenizer"
    scratch.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(scratch, train_text)
    train_tokens = np.array(tokenizer.encode(train_text).ids, np.int32)
    valid_tokens = np.array(tokenizer.encode(valid_text).ids, np.int32)
    mx.random.seed(0)
    model = Model(ModelConfig(vocab_size=VOCAB, eos_token_id=0, bos_token_id=0, pad_token_id=0,
                              **SHAPES[name]))
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{name}: {parameters / 1e6:.2f}M parameters, {len(train_tokens)} training tokens")
    schedule = optim.cosine_decay(learning_rate, iters, learning_rate / 10)
    valid = [next(batches(valid_tokens, batch_size, length, seed=s)) for s in range(2)]
    start = time.perf_counter()
    train(model, optim.AdamW(schedule, weight_decay=0.01),
          batches(train_tokens, batch_size, length, seed=0), iters=iters, val_batches=valid,
          steps_per_eval=max(iters // 4, 1), steps_per_report=max(iters // 12, 1))
    print(f"trained in {time.perf_counter() - start:.0f}s")
    weights = cast(dict(tree_flatten(model.parameters())), mx.bfloat16)
    save_model(directory, weights, model.config, scratch)
    for file in scratch.iterdir():
        file.unlink()
    scratch.rmdir()
    return directory


def held_out_tokens(tokenizer):
    return np.array(tokenizer.encode(splits()[1]), np.int32)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", choices=SHAPES, default="mamba2")
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()
    directory = reference_model(args.name, args.iters)
    model, tokenizer = load(directory)
    ppl, error, basis = evaluate_perplexity(model, held_out_tokens(tokenizer), 128, 8, 16)
    print(f"{directory}: held-out perplexity {ppl:.3f} ± {error:.3f} (error over {basis})")


if __name__ == "__main__":
    main()
