"""Sequential digit classification: read an 8x8 handwritten digit one pixel at a time.

The 1,797 digits bundled with scikit-learn become sequences of 64 grey levels; a stack of Mamba
mixer blocks reads them in raster order and a linear layer classifies the pooled outputs. This
is a small, real-data cousin of sequential MNIST, and it shows the mixer blocks used on their
own, on continuous inputs, outside a language model.

    python examples/sequential_digits.py --arch mamba2
    python examples/sequential_digits.py --arch mamba1 --pool last
"""

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common import count_parameters, parser, save_loss_curve, train
from mlx_mamba import Mamba1, Mamba2


class PixelClassifier(nn.Module):
    """(B, 64) grey levels -> (B, 10) logits: pre-norm residual mixer blocks, pooled, linear."""

    def __init__(self, arch, d_model, layers, d_state, pool):
        super().__init__()
        self.pool = pool
        self.embed = nn.Linear(1, d_model)  # each pixel is one scalar input
        self.norms = [nn.RMSNorm(d_model) for _ in range(layers)]
        if arch == "mamba1":
            self.mixers = [Mamba1(d_model, d_state) for _ in range(layers)]
        else:
            self.mixers = [Mamba2(d_model, d_state, head_dim=16, chunk_size=64)
                           for _ in range(layers)]
        self.norm_f = nn.RMSNorm(d_model)
        self.classify = nn.Linear(d_model, 10)

    def __call__(self, pixels):
        h = self.embed(pixels[..., None])
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        h = self.norm_f(h)
        # The last position has seen every pixel; the mean lets each position vote.
        return self.classify(h[:, -1] if self.pool == "last" else h.mean(axis=1))


def load_digits_split(seed, test_fraction=0.2):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("this example needs scikit-learn: pip install -e '.[examples]'")
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=test_fraction,
        random_state=seed, stratify=digits.target)
    # Grey levels 0..16 scaled to zero mean and unit variance (training statistics only): with
    # raw or [0, 1] inputs, mostly zeros, the same model learns several times slower.
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std, y_train, y_test


def main():
    p = parser(__doc__.splitlines()[0], steps=500, batch_size=64, lr=3e-3, arch="mamba2")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--pool", choices=("mean", "last"), default="mean",
                   help="classify the mean of all positions or the last position")
    args = p.parse_args()
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x_train, x_test, y_train, y_test = load_digits_split(args.seed)

    model = PixelClassifier(args.arch, args.d_model, args.layers, args.d_state, args.pool)
    print(f"{args.arch}: {count_parameters(model):,} parameters; {len(x_train)} training and "
          f"{len(x_test)} test digits, 64 pixels each")

    def next_batch():
        rows = rng.integers(0, len(x_train), args.batch_size)
        return mx.array(x_train[rows]), mx.array(y_train[rows])

    def loss_fn(model, pixels, labels):
        return nn.losses.cross_entropy(model(pixels), labels).mean()

    start = time.perf_counter()
    losses = train(model, loss_fn, next_batch, args)

    predictions = model(mx.array(x_test)).argmax(axis=-1)
    accuracy = (predictions == mx.array(y_test)).mean().item()
    save_loss_curve(losses, args.out / f"sequential_digits_{args.arch}.png",
                    f"Sequential 8x8 digits, {args.arch}, {args.pool} pooling")
    print(f"wall time {time.perf_counter() - start:.0f}s")
    print(f"sequential digits ({args.arch}) test accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
