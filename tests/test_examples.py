"""Every example runs end to end (two training steps), prints its metric and saves its loss curve."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("example", ["selective_copying", "associative_recall",
                                     "sequential_digits", "shakespeare_char"])
def test_example_runs(example, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{example}.py"), "--steps", "2", "--no-compile",
         "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert any(word in last_line for word in ("accuracy", "loss")), last_line
    assert list(tmp_path.glob("*.png")), "no loss curve saved"
