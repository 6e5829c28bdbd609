"""Perplexity of a model on held-out text, with its standard error.

    python -m mlx_mamba.perplexity --model M --data FILE_OR_DIR [--sequence-length N]
        [--batch-size B] [--num-samples K]

Data: a text file (tokenized whole), or a directory with test.jsonl (else valid.jsonl) in the
tuner's formats, whose records are tokenized as for training and joined end to end. The tokens
are cut into K sequences of N tokens; each sequence's first token is context only, so a
sequence gives N - 1 token losses.

The loss is the tuner's next-token cross-entropy, in float32. A sequence is fed in chunks of
tokens that continue its recurrent state (`model(ids, cache)`), so the logits held at once are
(B, chunk, V) however long N is: memory stays bounded.

Standard error: by the delta method, exp(mean) x SE(mean), with SE(mean) over the per-sequence
mean losses (tokens of one sequence are correlated, so per-token errors would understate it);
with a single sequence, over its per-token losses, as mlx-lm does.
"""

import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError
from .token_ids import TokenIdError, check_token_ids
from .tuner.datasets import DataError, read_jsonl, tokenize

LOGITS_BYTES = 1 << 28  # float32 logits held at once: chunks are sized to stay under this


def read_tokens(data, tokenizer, vocab_size):
    """The token ids (1-D int32) of a text file or of a data directory's test/valid.jsonl."""
    data = Path(data).expanduser()
    if data.is_dir():
        file = next((data / f"{s}.jsonl" for s in ("test", "valid")
                     if (data / f"{s}.jsonl").is_file()), None)
        if file is None:
            raise DataError(f"{data}: holds neither test.jsonl nor valid.jsonl")
        tokens = [t for n, record in read_jsonl(file)
                  for t in tokenize(record, tokenizer, f"{file}:{n}")[0]]
    elif data.is_file():
        try:
            text = data.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{data}: not UTF-8 text (byte {e.start + 1})") from None
        file, tokens = data, tokenizer.encode(text)
    else:
        raise DataError(f"{data}: no such file or directory")
    try:
        return np.array(check_token_ids(tokens, vocab_size), np.int32)
    except TokenIdError as e:
        raise DataError(f"{file}: {e}: is the tokenizer the model's own?") from None


def make_sequences(tokens, sequence_length, num_samples=-1):
    """The first `num_samples` (-1: all) whole sequences of `sequence_length` tokens: (K, N)."""
    count = len(tokens) // sequence_length
    if count == 0:
        raise DataError(f"the data has {len(tokens)} tokens, fewer than one sequence of "
                        f"--sequence-length {sequence_length}")
    if num_samples > 0:
        count = min(count, num_samples)
    return tokens[:count * sequence_length].reshape(count, sequence_length)


def token_losses(model, sequences, batch_size=8, chunk_size=None, progress=None):
    """The next-token losses (K, N - 1) in float64 of the (K, N) int `sequences`.

    chunk_size: tokens per forward call (None: as many as keep the logits under LOGITS_BYTES).
    progress(n): called after each chunk with the number of losses it gave.
    """
    sequences = np.asarray(sequences)
    vocab = model.config.vocab_size
    if chunk_size is None:
        chunk_size = max(1, LOGITS_BYTES // (4 * vocab * batch_size))
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = mx.array(sequences[start:start + batch_size])
        inputs, targets = batch[:, :-1], batch[:, 1:]
        cache = model.make_cache(batch_size=len(batch))
        for t in range(0, inputs.shape[1], chunk_size):
            logits = model(inputs[:, t:t + chunk_size], cache=cache)
            losses = nn.losses.cross_entropy(logits.astype(mx.float32),
                                             targets[:, t:t + chunk_size])
            mx.eval(losses, [c.state for c in cache if c is not None])
            out.append((start, t, np.array(losses, np.float64)))
            if progress is not None:
                progress(losses.size)
    model.train(was_training)
    result = np.empty((len(sequences), sequences.shape[1] - 1), np.float64)
    for start, t, losses in out:
        result[start:start + len(losses), t:t + losses.shape[1]] = losses
    return result


def perplexity_of(losses):
    """(perplexity, standard error, what the error is over) of (K, T) token losses."""
    losses = np.asarray(losses, np.float64)
    mean = losses.mean()
    samples = losses.mean(axis=1) if len(losses) > 1 else losses.ravel()
    basis = "sequences" if len(losses) > 1 else "tokens"
    error = samples.std(ddof=1) / math.sqrt(len(samples)) if len(samples) > 1 else math.nan
    ppl = math.exp(mean)
    return ppl, ppl * error, basis


def evaluate_perplexity(model, tokens, sequence_length=512, batch_size=8, num_samples=-1,
                        chunk_size=None, show_progress=False):
    """(perplexity, standard error, basis) of `model` on the 1-D token ids `tokens`."""
    sequences = make_sequences(np.asarray(tokens), sequence_length, num_samples)
    if not show_progress:
        return perplexity_of(token_losses(model, sequences, batch_size, chunk_size))
    from tqdm import tqdm

    with tqdm(total=sequences.shape[0] * (sequence_length - 1), unit="tok",
              desc="Perplexity", file=sys.stderr) as bar:
        losses = token_losses(model, sequences, batch_size, chunk_size, bar.update)
    return perplexity_of(losses)


def parser():
    p = cli.ArgumentParser(prog="python -m mlx_mamba.perplexity",
                           description="Perplexity of a model on held-out text.")
    cli.add_model_arguments(p)
    p.add_argument("--data", required=True, help="A text file, or a directory with test.jsonl "
                   "(else valid.jsonl) of {text}, {prompt, completion} or {messages} records")
    p.add_argument("--sequence-length", type=cli.integer(2), default=512,
                   help="Tokens per sequence")
    p.add_argument("--batch-size", type=cli.integer(1), default=8, help="Sequences per batch")
    p.add_argument("--num-samples", type=cli.integer(-1), default=256,
                   help="Sequences to evaluate; -1 for all the data holds")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.num_samples == 0:
        parser().error("--num-samples 0: expected a positive count or -1")

    def command():
        from .loader import load

        model, tokenizer = load(args.model, tokenizer=args.tokenizer)
        if tokenizer is None:
            raise DataError(f"{args.model}: the model has no tokenizer; pass --tokenizer")
        tokens = read_tokens(args.data, tokenizer, model.config.vocab_size)
        if len(tokens) < args.sequence_length:
            raise DataError(f"{args.data}: {len(tokens)} tokens, fewer than one sequence of "
                            f"--sequence-length {args.sequence_length}")
        ppl, error, basis = evaluate_perplexity(
            model, tokens, args.sequence_length, args.batch_size, args.num_samples,
            show_progress=True)
        print(f"Perplexity: {ppl:.3f} ± {error:.3f}")
        print(f"(standard error over {basis}; {len(tokens)} tokens read)")

    status = cli.run(command, (DataError, ConfigError, CheckpointError, OSError))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
