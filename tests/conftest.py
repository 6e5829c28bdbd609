import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# No test reaches the Hugging Face hub or sees what this machine has cached from it: every hub
# call fails as offline, here and in the command lines the tests start (tests that exercise the
# hub replace huggingface_hub.snapshot_download). Set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="mlx-mamba-tests-hub-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)
# lm-eval's tasks read their data through `datasets`, whose cache goes there too.
os.environ["HF_DATASETS_CACHE"] = os.path.join(os.environ["HF_HUB_CACHE"], "datasets")
# The kernel tests judge the kernels themselves: the first-use check would quietly replace a
# broken kernel by the reference path (tests/test_kernel_fallback.py turns it back on).
os.environ["MLX_MAMBA_KERNEL_CHECK"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

# torch's threads and MLX's would compete for CI's two cores; one torch thread is much faster.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_checkpoint  # noqa: E402
from corpus import write_byte_level_tokenizer  # noqa: E402


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
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE tokenizer.json in the manner of GPT-NeoX's, trained once per session."""
    return write_byte_level_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
