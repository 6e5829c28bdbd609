"""Run by tests/test_sharding.py under `mlx.launch`: `sharded_load` of a hub repo id, pipeline
parallel, with huggingface_hub's `snapshot_download` answered from a local directory (never the
network). Each rank prints one JSON line: the files each download call brought, its layers, and
its logits' error against one process's on the local directory.

python pipeline_hub_worker.py REPO_DIR
"""

import fnmatch
import json
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import mlx_mamba  # noqa: E402
from comparing import relative_error  # noqa: E402


def main(repo):
    repo, snapshot, calls = Path(repo), Path(tempfile.mkdtemp()), []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        """The hub's: the repo's files that match allow_patterns, in a local snapshot."""
        assert repo_id == "org/tiny-hybrid" and allow_patterns is not None
        new = sorted(f.name for f in repo.iterdir() if not (snapshot / f.name).exists() and
                     any(fnmatch.fnmatch(f.name, p) for p in allow_patterns))
        for name in new:
            shutil.copy(repo / name, snapshot / name)
        calls.append(new)
        return str(snapshot)

    huggingface_hub.snapshot_download = snapshot_download
    world = mx.distributed.init()
    model, _ = mlx_mamba.sharded_load("org/tiny-hybrid", pipeline_group=world)
    one, _ = mlx_mamba.load(repo)
    ids = mx.array(np.random.default_rng(5).integers(1, 100, (2, 9)))
    error = relative_error(np.array(model(ids), np.float64), np.array(one(ids), np.float64))
    _, start, stop = model._stage
    print(json.dumps({"rank": world.rank(), "calls": calls, "layers": [start, stop],
                      "error": error}), flush=True)
    shutil.rmtree(snapshot)


if __name__ == "__main__":
    main(sys.argv[1])
