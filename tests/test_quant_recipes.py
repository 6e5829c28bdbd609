"""Mixed-precision recipes: each quantizes exactly the layers it names at the bits it names,
as written in config.json (mlx-lm's layout) and as loaded, by us and by mlx-lm."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from comparing import relative_error
from quant_models import DEEP, deep  # noqa: F401 (a fixture)

from mlx_mamba.convert import convert
from mlx_mamba.loader import load_model
from mlx_mamba.quant_recipes import RECIPES
from mlx_mamba.quantize import quantized_bits

# The recipes' layer pattern over eight layers: the first and last eighth, every third between.
HIGH_LAYERS = {0, 3, 6, 7}
IDS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]]


def expected_bits(path, low, high):
    name, parts = path.rsplit(".", 1)[-1], path.split(".")
    if name in ("embeddings", "lm_head", "x_proj", "dt_proj"):
        return high
    if name in ("in_proj", "out_proj") and int(parts[2]) in HIGH_LAYERS:
        return high
    return low


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("flavour", sorted(DEEP))
def test_recipe_quantizes_the_layers_it_names(deep, tmp_path, flavour, recipe):
    low, high = RECIPES[recipe]
    out = convert(deep[flavour], tmp_path / "out", quantize=True, quant_predicate=recipe)
    written = json.loads((out / "config.json").read_text())["quantization"]
    model = load_model(out)
    loaded = quantized_bits(model)
    stored = mx.load(str(out / "model.safetensors"))
    quantized = {n[: -len(".scales")] for n in stored if n.endswith(".scales")}
    assert set(loaded) == quantized and len(quantized) == 8 * (4 if "1" in flavour else 2) + \
        (1 if "2" in flavour else 2)
    assert written["bits"] == low and written["group_size"] == 64
    for path in quantized:
        bits = expected_bits(path, low, high)
        assert written.get(path, written)["bits"] == bits, path
        assert (path in written) == (bits != low), path
        assert loaded[path] == bits, path
        # The packed weight holds `bits` per input: 32 // bits per uint32.
        in_size = 64 * (2 if path.endswith(("out_proj", "x_proj")) else 1)
        assert stored[f"{path}.weight"].shape[-1] == in_size * bits // 32, path
    assert set(written) - {"group_size", "bits", "mode"} <= quantized


@pytest.mark.parametrize("recipe", ["mixed_3_6", "mixed_2_6"])
def test_mlx_lm_reads_our_mixed_mamba2(deep, tmp_path, recipe):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    out = convert(deep["mamba2_deep"], tmp_path / "out", quantize=True, quant_predicate=recipe)
    theirs, _ = mlx_lm_load_model(out)
    ours = load_model(out)
    low, high = RECIPES[recipe]
    their_bits = {p: m.bits for p, m in theirs.named_modules() if hasattr(m, "bits")}
    assert their_bits == quantized_bits(ours)
    assert relative_error(np.array(theirs(mx.array(IDS))), np.array(ours(mx.array(IDS)))) < 1e-5


def test_recipe_on_a_hybrid(checkpoint, tmp_path):
    out = convert(checkpoint("granite_dense")[0], tmp_path / "out", quantize=True,
                  q_group_size=32, quant_predicate="mixed_3_6")
    bits = quantized_bits(load_model(out))
    # Four layers: layer 3 is the last eighth, layer 2 the "every third" one. (The MLPs'
    # down_proj, 20 wide, fits no group of 32: it stays in full precision.)
    assert {p for p, b in bits.items() if b == 6} == {
        "backbone.embeddings", "lm_head", "backbone.layers.2.mixer.in_proj",
        "backbone.layers.2.mixer.out_proj", "backbone.layers.3.mixer.v_proj",
        "backbone.layers.3.mixer.o_proj"}
    assert set(bits.values()) == {3, 6} and len(bits) == 22


def test_predicate_function(deep, tmp_path):
    def predicate(path, module):
        return {"bits": 8, "group_size": 64} if path.endswith("out_proj") else True

    out = convert(deep["mamba2_deep"], tmp_path / "out", quantize=True, q_bits=2,
                  quant_predicate=predicate)
    bits = quantized_bits(load_model(out))
    assert bits and all(b == (8 if p.endswith("out_proj") else 2) for p, b in bits.items())


def run_convert(*args):
    return subprocess.run([sys.executable, "convert.py", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_command_line(deep, tmp_path):
    done = run_convert("--hf-path", deep["mamba2_deep"], "--mlx-path", tmp_path / "out", "-q",
                       "--quant-predicate", "mixed_4_6")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 4
    for args in (["--quant-predicate", "mixed_3_6"], ["-q", "--quant-predicate", "mixed_9_9"],
                 ["-q", "--q-bits", "4", "--quant-predicate", "mixed_3_6"]):
        done = run_convert("--hf-path", deep["mamba2_deep"], "--mlx-path", tmp_path / "bad", *args)
        assert done.returncode in (1, 2) and done.stderr.startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "bad").exists()
