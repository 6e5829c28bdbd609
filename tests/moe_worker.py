"""Run under mlx.launch: a mixture of experts with a shared expert, a latent projection and
biases, tensor parallel over the world, against the same layer whole; prints (rank 0) the
relative error and how many all_sums one call made."""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparing import relative_error  # noqa: E402

from mlx_mamba.models.moe import MoE  # noqa: E402


def main():
    world = mx.distributed.init()
    mx.random.seed(0)
    layer = MoE(16, n_experts=4, top_k=2, hidden=8, shared_hidden=8, latent=8, bias=True)
    layer.update(tree_unflatten([(name, mx.random.normal(value.shape))
                                 for name, value in tree_flatten(layer.parameters())]))
    x = mx.random.normal((2, 5, 16))
    whole = layer(x)
    layer.shard(world)
    calls = []
    all_sum = mx.distributed.all_sum

    def counted(*args, **kwargs):
        calls.append(1)
        return all_sum(*args, **kwargs)

    mx.distributed.all_sum = counted
    sharded = layer(x)
    mx.eval(sharded)  # on every rank: each takes part in the sum
    mx.distributed.all_sum = all_sum
    if world.rank() == 0:
        print(json.dumps({"world": world.size(), "error": relative_error(sharded, whole),
                          "all_sums": len(calls)}))


if __name__ == "__main__":
    main()
