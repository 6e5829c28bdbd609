"""Selective copying (Mamba paper, section 4.1.1): remember the tokens scattered among noise.

Each sequence is a region of `--length` positions, mostly the noise token, with `--tokens` data
tokens at random positions; then `--tokens` marker tokens, at which the model must output the
data tokens in their order. Because the gaps between data tokens vary, a fixed (time-invariant)
convolution or recurrence cannot solve it: the model has to decide from each input whether to
store it, which is what the input-dependent Δ, B and C of a selective SSM allow. The defaults
are a miniature that trains in minutes on a CPU; the paper's version copies 16 tokens out of
4096 positions (raise `--length` and `--tokens` on a GPU, with many more steps).

    python examples/selective_copying.py --arch mamba2
    python examples/selective_copying.py --arch mamba1
"""

import time

import mlx.core as mx
import numpy as np

from common import answers_loss, count_parameters, parser, save_loss_curve, small_model, train

NOISE, MARKER, FIRST_DATA = 0, 1, 2


def make_batch(rng, batch, length, tokens, vocab):
    """inputs (batch, length + tokens), targets (batch, tokens): the data tokens in order."""
    data = rng.integers(FIRST_DATA, FIRST_DATA + vocab, (batch, tokens))
    # `tokens` distinct positions per row, sorted so that the targets follow the input order.
    positions = np.sort(np.argsort(rng.random((batch, length)), axis=1)[:, :tokens], axis=1)
    region = np.full((batch, length), NOISE)
    np.put_along_axis(region, positions, data, axis=1)
    inputs = np.concatenate([region, np.full((batch, tokens), MARKER)], axis=1)
    return mx.array(inputs), mx.array(data)


def main():
    p = parser(__doc__.splitlines()[0], steps=800, batch_size=32, lr=3e-3, arch="mamba2")
    p.add_argument("--length", type=int, default=32, help="positions in the noisy region")
    p.add_argument("--tokens", type=int, default=4, help="data tokens to copy")
    p.add_argument("--vocab", type=int, default=8, help="distinct data tokens")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    args = p.parse_args()
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    model = small_model(args, FIRST_DATA + args.vocab, args.d_state)
    print(f"{args.arch}: {count_parameters(model):,} parameters; sequences of "
          f"{args.length + args.tokens} tokens, {args.tokens} to copy")

    start = time.perf_counter()
    losses = train(model, answers_loss(args.tokens),
                   lambda: make_batch(rng, args.batch_size, args.length, args.tokens, args.vocab),
                   args)

    inputs, targets = make_batch(np.random.default_rng(args.seed + 1), 500, args.length,
                                 args.tokens, args.vocab)
    predictions = model(inputs)[:, -args.tokens:].argmax(axis=-1)
    correct = predictions == targets
    token_accuracy = correct.mean().item()
    sequence_accuracy = correct.all(axis=1).mean().item()
    save_loss_curve(losses, args.out / f"selective_copying_{args.arch}.png",
                    f"Selective copying, {args.arch}")
    print(f"wall time {time.perf_counter() - start:.0f}s; whole sequences right: "
          f"{sequence_accuracy:.3f}")
    print(f"selective copying ({args.arch}) accuracy on copied tokens: {token_accuracy:.3f}")


if __name__ == "__main__":
    main()
