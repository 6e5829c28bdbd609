"""A character-level Mamba2 language model on Shakespeare: train, validate, then write.

The model is the library's `Model` with a small config; the vocabulary is the file's distinct
characters. Validation loss is reported in nats and in bits per character (bpc), the unit the
character-level literature uses. Sampling uses the library's `generate`, which runs the
recurrent form: the prompt is read in parallel into a cache, then one `model.step` per new
character at constant cost. Any tokenizer with encode, decode and eos_token_id will do.

    python examples/shakespeare_char.py
    python examples/shakespeare_char.py --steps 2000 --d-model 128 --layers 4   # larger, longer
    python examples/shakespeare_char.py --data input.txt   # the whole tinyshakespeare (1.1 MB)

The text is the repository's excerpt of tinyshakespeare, its first 200,000 characters (the
whole corpus is karpathy/char-rnn's data/tinyshakespeare/input.txt; see tests/data/README.md).
"""

import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common import CharTokenizer, count_parameters, parser, save_loss_curve, train
from mlx_mamba import Model, ModelConfig, generate

DEFAULT_DATA = (Path(__file__).resolve().parents[1] / "tests" / "data"
                / "tinyshakespeare-excerpt.txt")


def main():
    p = parser(__doc__.splitlines()[0], steps=600, batch_size=16, lr=3e-3)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-state", type=int, default=32)
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-tokens", type=int, default=300, help="characters to sample")
    p.add_argument("--temp", type=float, default=0.8)
    args = p.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"error: {args.data}: no such file; pass --data PATH (a text file)")
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    text = args.data.read_text()
    tokenizer = CharTokenizer(text)
    unknown = set(args.prompt) - set(tokenizer.chars)
    if unknown:
        p.error(f"--prompt has characters that are not in the text: {''.join(sorted(unknown))!r}")
    data = np.array(tokenizer.encode(text), dtype=np.int32)
    split = int(0.9 * len(data))  # the last 10% of the plays is held out
    train_data, val_data = data[:split], data[split:]

    config = ModelConfig(arch="mamba2", d_model=args.d_model, n_layer=args.layers,
                         vocab_size=len(tokenizer.chars), d_state=args.d_state, head_dim=16,
                         chunk_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = Model(config)
    print(f"mamba2: {count_parameters(model):,} parameters; {len(tokenizer.chars)} characters; "
          f"{len(train_data):,} training and {len(val_data):,} validation characters")

    def windows(source, starts):
        # Inputs and next-character targets, each (len(starts), seq_len).
        chunk = np.stack([source[s:s + args.seq_len + 1] for s in starts])
        return mx.array(chunk[:, :-1]), mx.array(chunk[:, 1:])

    def next_batch():
        return windows(train_data, rng.integers(0, len(train_data) - args.seq_len - 1,
                                                args.batch_size))

    def loss_fn(model, inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets).mean()

    start = time.perf_counter()
    losses = train(model, loss_fn, next_batch, args)

    # Validation: 256 consecutive windows from the start of the held-out text, the same every run.
    starts = np.arange(min(256, (len(val_data) - 1) // args.seq_len)) * args.seq_len
    val_loss = np.mean([loss_fn(model, *windows(val_data, batch)).item()
                        for batch in np.array_split(starts, 8)])
    save_loss_curve(losses, args.out / "shakespeare_char.png",
                    "Character-level Mamba2, tinyshakespeare",
                    extra={"validation": [(args.steps, val_loss)]})
    print(f"wall time {time.perf_counter() - start:.0f}s")
    print("-" * 40)
    text = generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens, temp=args.temp,
                    seed=args.seed)
    print(args.prompt + text)
    print("-" * 40)
    print(f"shakespeare_char validation loss: {val_loss:.3f} nats, "
          f"{val_loss / math.log(2):.3f} bits/char")


if __name__ == "__main__":
    main()
