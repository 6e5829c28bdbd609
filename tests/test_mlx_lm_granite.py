"""Granite 4.0-H quantized files shared with mlx-lm both ways: what mlx-lm writes (mlx-community's
quantizations: its module names, the router at 8 bits) loads here, and what convert writes
quantized loads in mlx-lm, each with the other library's logits."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.utils import quantize_model, save_config, save_model

from comparing import relative_error
from mlx_mamba.convert import convert
from mlx_mamba.loader import load_model
from mlx_mamba.quantize import quantized_bits

IDS = [[1, 5, 7, 3, 9, 2, 8, 4, 6, 1]]
KINDS = {"linear_attention": "mamba", "full_attention": "attention"}


@pytest.fixture
def hub_copy(checkpoint, tmp_path):
    """hub_copy(kind) -> a tiny Granite whose config.json says what the hub's do (the layer kinds
    by their old names, no positions), which mlx-lm 0.32 needs."""
    def make(kind):
        directory = tmp_path / "source"
        shutil.copytree(checkpoint(f"granite_{kind}_hub")[0], directory)
        config = json.loads((directory / "config.json").read_text())
        config["layer_types"] = [KINDS[t] for t in config["layer_types"]]
        config["position_embedding_type"] = "nope"
        (directory / "config.json").write_text(json.dumps(config))
        return directory
    return make


def logits(model):
    return np.array(model(mx.array(IDS)))


def their_bits(model):
    """The bits of mlx-lm's quantized layers but the router, which stays in float here."""
    return sorted(m.bits for p, m in model.named_modules()
                  if hasattr(m, "bits") and not p.endswith("router.layer"))


def our_bits(model):
    """The bits of our quantized layers, the MoE shared expert's gate and up counted once, as
    mlx-lm packs them into one layer."""
    return sorted(b for p, b in quantized_bits(model).items()
                  if not p.endswith("shared_experts.up_proj"))


@pytest.mark.parametrize("recipe", [None, "mixed_3_6"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_mlx_lm_quantization_loads_here(hub_copy, tmp_path, kind, recipe):
    source, out = hub_copy(kind), tmp_path / "out"
    theirs, config = mlx_lm_load_model(source)
    predicate = recipe and mixed_quant_predicate_builder(recipe, theirs, 32)
    theirs, config = quantize_model(theirs, config, 32, 4, quant_predicate=predicate)
    save_model(out, theirs)
    save_config(config, out / "config.json")
    stored = mx.load(str(out / "model.safetensors"))
    mlp = "block_sparse_moe.switch_mlp" if kind == "moe" else "mlp"
    assert f"model.layers.0.{mlp}.gate_proj.scales" in stored  # mlx-lm's names, not ours
    if kind == "moe":
        assert "model.layers.0.block_sparse_moe.router.layer.scales" in stored
    ours = load_model(out)
    assert relative_error(logits(ours), logits(theirs)) < 1e-5
    # Mixed: the per-module entries under mlx-lm's paths reached our layers.
    assert our_bits(ours) == their_bits(theirs)
    assert (len(set(quantized_bits(ours).values())) > 1) == bool(recipe)


@pytest.mark.parametrize("recipe", [None, "mixed_3_6"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_our_quantization_loads_in_mlx_lm(hub_copy, tmp_path, kind, recipe):
    out = convert(hub_copy(kind), tmp_path / "out", quantize=True, q_group_size=32,
                  quant_predicate=recipe)
    ours, (theirs, _) = load_model(out), mlx_lm_load_model(out)
    assert our_bits(ours) == their_bits(theirs)
    assert (len(set(quantized_bits(ours).values())) > 1) == bool(recipe)
    assert relative_error(logits(theirs), logits(ours)) < 1e-5
