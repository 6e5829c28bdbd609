import sys
from pathlib import Path

import pytest
import torch

# torch's threads and MLX's would compete for CI's two cores; one torch thread is much faster.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_checkpoint  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(flavour) -> (directory, transformers model), written once per session."""
    written = {}

    def make(flavour):
        if flavour not in written:
            directory = tmp_path_factory.mktemp(flavour)
            written[flavour] = (directory, write_checkpoint(flavour, directory))
        return written[flavour]

    return make


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared test data is missing: expected {SHARED_DATA}")
    return SHARED_DATA
