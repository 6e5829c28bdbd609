"""DWQ: training the scales and biases lowers the distillation loss (the KL from the float
model), on the training tokens and on held-out ones, and moves nothing else."""

import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from corpus import shakespeare_lines
from quant_models import deep  # noqa: F401 (a fixture)
from tuning import write_tokenizer

from mlx_mamba.dwq import distill, mean_kl
from mlx_mamba.loader import load_model
from mlx_mamba.quantize import quantize_model

TOKENS = np.random.default_rng(0).integers(0, 100, (10, 24)).astype(np.int32)


def test_distillation_lowers_the_kl(deep):
    teacher = load_model(deep["mamba2_deep"])
    student = load_model(deep["mamba2_deep"])
    quantize_model(student, {"group_size": 64, "bits": 2, "mode": "affine"})
    before = dict(tree_flatten(student.parameters()))
    train, valid = TOKENS[:8], TOKENS[8:]
    held_out = mean_kl(student, teacher, valid)
    losses = distill(student, teacher, train, iters=30, batch_size=4, learning_rate=1e-3)
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses
    assert mean_kl(student, teacher, valid) < held_out
    after = dict(tree_flatten(student.parameters()))
    moved = {k for k in before if not mx.array_equal(before[k], after[k])}
    assert moved and all(k.endswith((".scales", ".biases")) for k in moved), moved


def test_command_line(deep, tmp_path):
    write_tokenizer(deep["mamba2_deep"])
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(shakespeare_lines(200, skip=3000)))
    done = subprocess.run(
        [sys.executable, "-m", "mlx_mamba.dwq", "--model", deep["mamba2_deep"], "--mlx-path",
         tmp_path / "out", "--data", text, "--q-bits", "2", "--iters", "20", "--learning-rate",
         "1e-3", "--sequence-length", "32", "--num-samples", "16"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = (float(x) for x in re.findall(r"Held-out KL \w+: ([\d.]+)", done.stdout))
    assert after < before
    assert load_model(tmp_path / "out").config.quantization["bits"] == 2
