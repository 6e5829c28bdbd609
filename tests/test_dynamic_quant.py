"""dynamic_quant: the measured sensitivity is the KL of the model with that one layer quantized
(recomputed in float64 here), and the bits chosen meet the budget within 0.05 bpw, as reported
and as stored."""

import json
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from comparing import relative_error
from corpus import shakespeare_lines
from quant_models import deep  # noqa: F401 (a fixture)
from tuning import write_tokenizer

from mlx_mamba.dynamic_quant import dynamic_quantization, layer_sensitivity
from mlx_mamba.loader import load_model
from mlx_mamba.quantize import bits_per_weight, quantize_model, quantized_bits

TOKENS = np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int32)


def kl_float64(teacher, student):
    def log_softmax(x):
        x = np.array(x.astype(mx.float32), np.float64)
        x -= x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    t, s = log_softmax(teacher), log_softmax(student)
    return float((np.exp(t) * (t - s)).sum(-1).mean())


def test_sensitivity_is_the_kl_of_one_quantized_layer(deep):
    model = load_model(deep["mamba2_deep"])
    sensitivity = layer_sensitivity(model, TOKENS, bits=(2, 8))
    assert len(sensitivity) == 8 * 2 + 1  # in_proj, out_proj per layer; the tied embedding
    reference = model(mx.array(TOKENS))
    path = "backbone.layers.3.mixer.out_proj"
    for bits in (2, 8):
        single = load_model(deep["mamba2_deep"])  # only `path` quantized
        mixer = single.backbone.layers[3].mixer
        mixer.out_proj = mixer.out_proj.to_quantized(group_size=64, bits=bits)
        expected = kl_float64(reference, single(mx.array(TOKENS)))
        # float32 sums: an absolute floor where 8 bits leave a KL of order 1e-6
        assert abs(sensitivity[path][bits] - expected) <= 1e-3 * expected + 2e-7, bits
    # More bits, less damage, for every layer.
    assert all(s[8] < s[2] for s in sensitivity.values())


@pytest.mark.parametrize("target", [3.5, 4.5, 6.3])
def test_meets_the_budget(deep, target):
    model = load_model(deep["mamba2_deep"])
    quantization, bpw = dynamic_quantization(model, TOKENS, target)
    quantize_model(model, quantization)
    # float32 scales and biases: one more bit per weight at group 64.
    assert target - 0.05 <= bpw <= target
    assert relative_error(bits_per_weight(model), bpw) < 1e-9
    assert len(set(quantized_bits(model).values())) > 1


def test_one_measured_table_serves_every_budget(deep):
    model = load_model(deep["mamba2_deep"])
    table = layer_sensitivity(model, TOKENS)
    for target in (3.5, 4.5):
        measured = dynamic_quantization(model, TOKENS, target)
        # No tokens: had they been used, the model would fail on them.
        assert dynamic_quantization(model, None, target, sensitivity=table) == measured
    quantization, _ = dynamic_quantization(model, None, 3.5, sensitivity=table)
    assert quantization != dynamic_quantization(model, None, 4.5, sensitivity=table)[0]


@pytest.fixture(scope="module")
def with_tokenizer(deep):
    write_tokenizer(deep["mamba2_deep"])
    return deep["mamba2_deep"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "mlx_mamba.dynamic_quant", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_command_line(with_tokenizer, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(shakespeare_lines(60, skip=3000)))
    done = run("--model", with_tokenizer, "--mlx-path", tmp_path / "out", "--target-bpw", 4.0,
               "--data", text, "--sequence-length", 32, "--num-samples", 2)
    assert done.returncode == 0, done.stderr
    reported = float(re.search(r"^([\d.]+) bits per weight$", done.stdout, re.M)[1])
    model = load_model(tmp_path / "out")
    assert abs(bits_per_weight(model) - reported) < 1e-3 and 3.95 <= reported <= 4.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert {p for p in config if "." in p} and (tmp_path / "out" / "tokenizer.json").is_file()
    # Without data: calibration text sampled from the model.
    done = run("--model", with_tokenizer, "--mlx-path", tmp_path / "self", "--target-bpw", 5,
               "--sequence-length", 16, "--num-samples", 2)
    assert done.returncode == 0, done.stderr
    done = run("--model", with_tokenizer, "--mlx-path", tmp_path / "bad", "--target-bpw", 2.5,
               "--data", text)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
        "error: --target-bpw 2.5: the fewest bits"), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "bad").exists()
