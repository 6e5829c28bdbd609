"""A fresh clone tests itself: nothing reads the development workspace beside the repository
(../shared), and no test can reach the Hugging Face hub."""

import re
from pathlib import Path

import huggingface_hub
import pytest

ROOT = Path(__file__).resolve().parents[1]
# "../shared" or a path built as ... / "shared" / ...
WORKSPACE = re.compile(r"\.\./shared\b|[\"']shared[\"']\s*/")


def test_nothing_reads_the_workspace_beside_the_clone():
    files = [ROOT / name for name in ("README.md", "pyproject.toml", "convert.py", ".ci/run")]
    files += (ROOT / "docs").glob("*.md")
    for folder in ("mlx_mamba", "tests", "examples", "benchmarks"):
        files += (ROOT / folder).rglob("*.py")
    files.remove(Path(__file__).resolve())  # it names the pattern
    readers = [f"{file.relative_to(ROOT)}:{i}" for file in files
               for i, line in enumerate(file.read_text().splitlines(), 1) if WORKSPACE.search(line)]
    assert not readers, f"these read ../shared, which a user's clone does not have: {readers}"


@pytest.mark.parametrize("line", ['DATA = ROOT.parent / "shared" / "data"',
                                  "open('../shared/data/tinyshakespeare.txt')"])
def test_the_workspace_pattern_finds_readers(line):
    assert WORKSPACE.search(line)


def test_the_hub_is_offline_in_tests():
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(OSError):
        huggingface_hub.snapshot_download("EleutherAI/gpt-neox-20b", allow_patterns=["*.json"])
