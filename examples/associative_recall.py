"""Associative recall: read key-value pairs, then answer query keys with their values.

A sequence is `k1 v1 k2 v2 ... kn vn q1 ... qm`: distinct keys with random values, then m of
those keys again in random order; at each query the model must output the value that followed
that key. Attention solves this by looking back; a recurrent model must already hold every pair
in its fixed-size state, so recall measures how much a state holds and how selectively it is
written. This is the multi-query form (MQAR, Arora et al. 2023) that the Mamba2 paper uses:
several queries per sequence give more training signal than one; `--queries 1` is the classic
single-query task. The comparisons to make: the state size, Mamba2's larger state (d_state 64,
shared by all heads) against Mamba1's (d_state 16 per channel); and the state update, Mamba-3's
trapezoidal, rotated update against Mamba2's at the same d_state and width.

    python examples/associative_recall.py --arch mamba2
    python examples/associative_recall.py --arch mamba1
    python examples/associative_recall.py --arch mamba3
"""

import time

import mlx.core as mx
import numpy as np

from common import answers_loss, count_parameters, parser, save_loss_curve, small_model, train


def make_batch(rng, batch, pairs, queries, keys, values):
    """inputs (batch, 2 * pairs + queries), targets (batch, queries). Keys are ids [0, keys),
    values the ids after them."""
    key_ids = np.argsort(rng.random((batch, keys)), axis=1)[:, :pairs]  # distinct per row
    value_ids = keys + rng.integers(0, values, (batch, pairs))
    context = np.stack([key_ids, value_ids], axis=2).reshape(batch, 2 * pairs)
    asked = np.argsort(rng.random((batch, pairs)), axis=1)[:, :queries]  # which pairs, in order
    inputs = np.concatenate([context, np.take_along_axis(key_ids, asked, axis=1)], axis=1)
    return mx.array(inputs), mx.array(np.take_along_axis(value_ids, asked, axis=1))


def main():
    p = parser(__doc__.splitlines()[0], steps=600, batch_size=64, lr=3e-3, arch="mamba2",
               archs=("mamba1", "mamba2", "mamba3"))
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence")
    p.add_argument("--queries", type=int, default=4, help="queries per sequence (at most --pairs)")
    p.add_argument("--keys", type=int, default=16, help="distinct keys")
    p.add_argument("--values", type=int, default=16, help="distinct values")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-state", type=int, default=None,
                   help="SSM state size (default: 16 for mamba1, 64 for mamba2 and mamba3)")
    args = p.parse_args()
    if not 1 <= args.queries <= args.pairs <= args.keys:
        p.error("expected 1 <= --queries <= --pairs <= --keys")
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    d_state = args.d_state or (16 if args.arch == "mamba1" else 64)

    model = small_model(args, args.keys + args.values, d_state)
    print(f"{args.arch}: {count_parameters(model):,} parameters, d_state {d_state}; "
          f"{args.pairs} pairs and {args.queries} queries per sequence")

    start = time.perf_counter()
    losses = train(model, answers_loss(args.queries),
                   lambda: make_batch(rng, args.batch_size, args.pairs, args.queries, args.keys,
                                      args.values),
                   args)

    inputs, targets = make_batch(np.random.default_rng(args.seed + 1), 1000, args.pairs,
                                 args.queries, args.keys, args.values)
    predictions = model(inputs)[:, -args.queries:].argmax(axis=-1)
    accuracy = (predictions == targets).mean().item()
    save_loss_curve(losses, args.out / f"associative_recall_{args.arch}.png",
                    f"Associative recall, {args.arch}")
    print(f"wall time {time.perf_counter() - start:.0f}s; chance is {1 / args.values:.3f}")
    print(f"associative recall ({args.arch}) accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
