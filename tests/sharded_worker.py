"""Run by tests/test_sharding.py under `mlx.launch`: for each checkpoint named on the command line,
the logits (a left-padded batch, whole and then prefill + decode steps) and the greedy tokens of
the model on one process, sharded in place with `model.shard`, and loaded with `sharded_load`;
the bytes of the weights each rank holds; `batch_generate`'s seeded sampled tokens for prompts
of different lengths (left-padded), together and alone. Rank 0 prints one JSON line.

python sharded_worker.py [--batches] NAME=DIR ... -> {"world": N, "results": {NAME: {...}}}
(the batch_generate checks with --batches)
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mamba  # noqa: E402
from comparing import relative_error  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

IDS = np.random.default_rng(7).integers(1, 100, (2, 13))
MASK = np.ones_like(IDS)
MASK[1, :4] = 0  # the second row is left-padded


def outputs(model):
    """Whole-sequence logits, prefill + step logits (float64) and 8 greedy tokens."""
    ids, mask = mx.array(IDS), mx.array(MASK)
    whole = model(ids, mask=mask)
    cache = model.make_cache(2)
    parts = [model(ids[:, :9], cache, mask[:, :9])]
    parts += [model.step(ids[:, t], cache)[:, None] for t in range(9, IDS.shape[1])]
    tokens = []
    token = mx.argmax(parts[-1][:, -1], axis=-1)
    for _ in range(8):
        tokens.append(token.tolist())
        token = mx.argmax(model.step(token, cache), axis=-1)
    real = MASK.astype(bool)  # logits at padded positions mean nothing
    as64 = lambda a: np.array(a.astype(mx.float32), np.float64)[real]  # noqa: E731
    return as64(whole), as64(mx.concatenate(parts, axis=1)), tokens


PROMPTS = [[5, 17, 42, 8, 99, 3, 11], [7, 9], [60, 2, 33, 4]]


def batch_tokens(model):
    """Sampled tokens of PROMPTS decoded together, and of each alone (with the same seed)."""
    settings = dict(max_tokens=5, temp=0.8, seed=9)
    together = [r.tokens for r in mlx_mamba.batch_generate(model, None, PROMPTS, **settings)]
    alone = [mlx_mamba.batch_generate(model, None, [p], **settings)[0].tokens for p in PROMPTS]
    return together, alone


def compare_batches(model, reference):
    together, alone = batch_tokens(model)
    return {"batch_equals_alone": together == alone, "batch_equals_one_process":
            together == reference}


def weight_bytes(model):
    return sum(value.nbytes for _, value in tree_flatten(model.parameters()))


def compare(sharded, reference):
    whole, stepped, tokens = outputs(sharded)
    return {"whole": relative_error(whole, reference[0]),
            "stepped": relative_error(stepped, reference[1]),
            "tokens_equal": tokens == reference[2]}


def main(specs, batches):
    world = mx.distributed.init()
    results = {}
    for spec in specs:
        name, directory = spec.split("=", 1)
        model, _ = mlx_mamba.load(directory)
        reference = outputs(model)
        batch_reference = batch_tokens(model)[0] if batches else None
        full = {name: value.nbytes for name, value in tree_flatten(model.parameters())}
        plan = model.shard(world)
        result = {"shard": compare(model, reference)}
        # Every rank must see the same full logits: their mean over ranks is this rank's.
        logits = model(mx.array(IDS))
        result["ranks_agree"] = relative_error(
            mx.distributed.all_sum(logits, group=world) / world.size(), logits)
        shard_bytes = weight_bytes(model)
        del model, logits
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        loaded, _ = mlx_mamba.sharded_load(directory)
        result["peak"] = mx.get_peak_memory() - before
        result["sharded_load"] = compare(loaded, reference)
        if batches:
            result["batches"] = {"tensor": compare_batches(loaded, batch_reference)}
        result["same_weights"] = all(
            np.array_equal(np.array(value), np.array(dict(tree_flatten(loaded.parameters()))[k]))
            for k, value in tree_flatten(model_again(directory, world).parameters()))
        sharded = sum(full[k] for k in plan)
        held = weight_bytes(loaded)
        replicated = sum(full.values()) - sharded
        # What all ranks hold of the split tensors, beyond one copy: rows held twice.
        every_rank = mx.distributed.all_sum(mx.array(held - replicated), group=world).item()
        result["bytes"] = {"held": held, "shard": shard_bytes, "full": sum(full.values()),
                           "sharded": sharded, "replicated": replicated,
                           "read_twice": every_rank - sharded, "largest": max(full.values())}
        loaded, _ = mlx_mamba.sharded_load(directory, pipeline_group=world)
        result["pipeline"] = compare(loaded, reference)
        if batches:
            result["batches"]["pipeline"] = compare_batches(loaded, batch_reference)
        result["pipeline_bytes"] = weight_bytes(loaded)
        # In bfloat16: a pipeline rank computes in the checkpoint's dtype, not the placeholders'.
        half, _ = mlx_mamba.load(directory, dtype=mx.bfloat16)
        loaded, _ = mlx_mamba.sharded_load(directory, pipeline_group=world, dtype=mx.bfloat16)
        ids, mask = mx.array(IDS), mx.array(MASK)
        logits = loaded(ids, mask=mask)
        result["pipeline_bfloat16"] = {
            "dtype": str(logits.dtype),
            "error": relative_error(outputs(loaded)[0], outputs(half)[0])}
        results[name] = result
    if world.rank() == 0:
        print(json.dumps({"world": world.size(), "results": results}), flush=True)


def model_again(directory, world):
    model, _ = mlx_mamba.load(directory)
    model.shard(world)
    return model


if __name__ == "__main__":
    main([arg for arg in sys.argv[1:] if arg != "--batches"], "--batches" in sys.argv[1:])
