"""Fine-tuning the hybrids (Bamba, Granite 4.0-H dense and MoE, Nemotron-H): exact gradients
against torch autograd through transformers, LoRA/DoRA/QLoRA and full fine-tuning, fusing."""

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_mamba
from checkpoints import HYBRIDS
from mlx_mamba import fuse
from mlx_mamba.checkpoint import read_weights
from mlx_mamba.families import to_model_names
from mlx_mamba.convert import convert
from mlx_mamba.models.moe import ExpertLinear, QuantizedExpertLinear
from mlx_mamba.ops import causal_attention
from mlx_mamba.tuner import (AdapterError, Batch, LoRALinear, apply_adapters, checkpoint_layers,
                             load_adapters, loss_terms, save_adapters, train)
from comparing import assert_close, relative_error
from test_tuner import (logits, perturb_trainable, text_data,  # noqa: F401
                        tiny_model)

ROOT = Path(__file__).resolve().parents[1]
GRADIENT_TOLERANCE = 1e-4  # max |ours - torch| relative to the largest |torch|, per tensor
MOE = ["granite_moe", "nemotron_h", "jamba"]
LORA = {"rank": 4, "scale": 2.0}
# The projections that LoRA adapts by default in each kind of layer, where the layer has them,
# and in Zamba2's shared transformer blocks.
MAMBA2, ATTENTION = {"in_proj", "out_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
ADAPTED = {"mamba2": MAMBA2, "hybrid": MAMBA2, "attention": ATTENTION, "mlp": MLP,
           "mamba1": MAMBA2 | {"x_proj", "dt_proj"},
    "parallel": {f"mamba.{p}" for p in MAMBA2} | {f"attention.{p}" for p in ATTENTION},
           "moe": {f"shared_experts.{p}" for p in MLP}}
SHARED_BLOCK = {f"self_attn.{p}" for p in ATTENTION} | {f"feed_forward.{p}" for p in MLP}


def kind_of(name):
    """A parameter's name without its layer index: what the gradient report groups by."""
    return re.sub(r"layers\.\d+\.", "layers.*.", name)


@pytest.mark.parametrize("flavour", list(HYBRIDS))
def test_gradients_match_torch_autograd_through_transformers(checkpoint, flavour, tmp_path,
                                                             monkeypatch):
    # Blocks of 8: the 21 tokens go through the blockwise attention of training, across blocks.
    monkeypatch.setattr(causal_attention, "BLOCK", 8)
    directory, reference = checkpoint(flavour)
    model, _ = mlx_mamba.load(directory)
    rng = np.random.default_rng(0)
    # Above the chunk size of 8, so the scan crosses chunks. Not id 0: Bamba's torch embedding
    # has padding_idx 0, whose row torch never differentiates.
    ids = rng.integers(1, model.config.vocab_size, (2, 21))
    weights = rng.standard_normal((2, 21, model.config.vocab_size)).astype(np.float32)

    def loss(model):
        return (model(mx.array(ids)) * mx.array(weights)).sum()

    _, grads = nn.value_and_grad(model, loss)(model)
    grads = dict(tree_flatten(grads))
    reference.zero_grad()
    (reference(torch.tensor(ids)).logits * torch.tensor(weights)).sum().backward()
    # transformers writes the gradients as a checkpoint, under the names (and in the layouts:
    # torch's conv, Granite's packed experts, Nemotron's per-expert tensors) it writes weights
    # under; the checkpoint reader maps them to this package's parameters.
    reference.save_pretrained(tmp_path, state_dict={
        name: p.grad for name, p in reference.named_parameters()})
    expected = to_model_names(read_weights(tmp_path), model.config)

    # Nemotron's routing bias is a buffer in torch; here it is a parameter whose gradient is
    # zero, since it only moves the (not differentiable) choice of experts.
    bias = {name for name in grads if name.endswith("score_bias")}
    assert set(grads) - bias == set(expected)
    assert all(not mx.any(grads[name]).item() for name in bias)
    errors = {name: relative_error(grads[name], np.array(expected[name])) for name in expected}
    worst = {}
    for name, error in errors.items():
        worst[kind_of(name)] = max(worst.get(kind_of(name), 0.0), error)
    print(f"\n{flavour}: worst relative gradient error by parameter")
    for kind, error in sorted(worst.items()):
        print(f"  {kind}: {error:.1e}")
    names = " ".join(worst)
    assert all(part in names for part in ("in_proj", "conv1d", "A_log", "D", "dt_", "q_proj",
                                          "o_proj", "up_proj", "embeddings"))
    assert ("router" in names and ".experts." in names) == ("moe" in model.config.kinds)
    assert_close({name: grads[name] for name in expected}, expected, GRADIENT_TOLERANCE)


def repeated_batch(seed=0, rows=2, length=17, vocab=100):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
    return Batch(tokens[:, :-1], tokens[:, 1:], np.ones((rows, length), np.float32),
                 np.full(rows, length, np.int32))


def mean_loss(model, batch):
    total, count = loss_terms(model, batch)
    return (total / count).item()


def train_steps(model, batch, steps=5, learning_rate=1e-2):
    """Train on one batch `steps` times; returns the loss before and after."""
    before = mean_loss(model, batch)
    train(model, optim.Adam(learning_rate=learning_rate), itertools.repeat(batch), iters=steps,
          log=lambda *a, **k: None)
    return before, mean_loss(model, batch)


def adapted_paths(model):
    """The LoRA/DoRA layers' paths in the backbone ("layers.3.mixer.in_proj")."""
    return {name for name, m in model.backbone.named_modules() if isinstance(m, LoRALinear)}


def default_adapted_paths(model):
    """What the defaults should adapt: ADAPTED's projections of each layer's mixer and
    feed-forward and SHARED_BLOCK's of the shared blocks, where they exist (Nemotron's
    squared-ReLU MLPs have no gate_proj)."""
    expected = set()
    for i, block in enumerate(model.backbone.layers):
        for part, kind in (("mixer", model.config.layer_type(i)),
                           ("ffn", model.config.ffn_type(i))):
            expected |= {f"layers.{i}.{part}.{p}" for p in ADAPTED.get(kind, ())}
    expected |= {f"blocks.{b}.{p}" for b in range(len(model.backbone.blocks)) for p in SHARED_BLOCK}
    return expected & {name for name, _ in model.backbone.named_modules()}


@pytest.mark.parametrize("flavour", list(HYBRIDS))
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_train_save_load_and_fuse(tiny_model, flavour, kind, tmp_path):
    directory = tiny_model(flavour)
    model = mlx_mamba.load(directory)[0]
    base = np.array(logits(model))
    mx.random.seed(0)
    config = {"fine_tune_type": kind, "num_layers": -1, "lora_parameters": LORA}
    apply_adapters(model, config)
    assert relative_error(logits(model), base) < 1e-6  # a fresh adapter changes nothing

    paths = adapted_paths(model)
    assert paths == default_adapted_paths(model)
    assert any("in_proj" in p for p in paths) and any("o_proj" in p for p in paths)
    # Routed experts and routers stay frozen: only the adapters train.
    trainable = {name.rsplit(".", 1)[-1] for name, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == ({"lora_a", "lora_b", "m"} if kind == "dora" else {"lora_a", "lora_b"})

    before, after = train_steps(model, repeated_batch())
    assert after < before
    adapted = np.array(logits(model))
    assert relative_error(adapted, base) > 1e-3

    save_adapters(model, tmp_path / "adapters", config)
    reloaded = load_adapters(mlx_mamba.load(directory)[0], tmp_path / "adapters")
    assert relative_error(logits(reloaded), adapted) < 1e-6

    fuse.fuse_adapters(model)
    assert not adapted_paths(model)
    assert relative_error(logits(model), adapted) < 1e-5
    fuse.save_model(model, directory, tmp_path / "fused")
    fused, tokenizer = mlx_mamba.load(tmp_path / "fused")
    assert tokenizer is not None
    assert relative_error(logits(fused), adapted) < 1e-5


def quantized_layers(model):
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedExpertLinear))]


# The fp4/fp8 modes dequantize to bfloat16 (their scales are uint8): the fused weights of these
# float32 models are then rounded to bfloat16 like the dequantized ones.
@pytest.mark.parametrize("flavour, mode, tolerance", [("granite_moe", "affine", 1e-5),
                                                      ("nemotron_h", "mxfp4", 2e-2)])
def test_qlora_on_a_converted_quantized_hybrid_and_fuse(tiny_model, flavour, mode, tolerance,
                                                        tmp_path):
    quantized = convert(tiny_model(flavour), tmp_path / "quantized", quantize=True, q_bits=4,
                        q_group_size=32, q_mode=mode)
    model = mlx_mamba.load(quantized)[0]
    experts = [m for _, m in model.named_modules() if isinstance(m, QuantizedExpertLinear)]
    assert experts, "the routed experts should be quantized"
    mx.random.seed(0)
    config = {"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": LORA}
    apply_adapters(model, config)
    bases = [m.linear for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert any(isinstance(b, nn.QuantizedLinear) for b in bases)  # QLoRA (a few stay float)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora" not in k}
    before, after = train_steps(model, repeated_batch())
    assert after < before
    for name, value in tree_flatten(model.parameters()):
        if name in frozen:
            assert np.array_equal(np.array(value), frozen[name]), f"{name} changed"
    adapted = np.array(logits(model))
    save_adapters(model, tmp_path / "adapters", config)

    # Kept quantized: the fused projections are quantized again.
    kept = load_adapters(mlx_mamba.load(quantized)[0], tmp_path / "adapters")
    fuse.fuse_adapters(kept)
    assert quantized_layers(kept) == quantized_layers(mlx_mamba.load(quantized)[0])
    fuse.save_model(kept, quantized, tmp_path / "kept")
    reloaded = mlx_mamba.load(tmp_path / "kept")[0]
    assert relative_error(logits(reloaded), np.array(logits(kept))) < 1e-6

    # De-quantized: every layer, routed experts included, is a float layer again.
    fuse.dequantize_model(fuse.fuse_adapters(model, dequantize=True))
    assert not quantized_layers(model)
    assert any(isinstance(m, ExpertLinear) for _, m in model.named_modules())
    assert all(v.dtype in (mx.float32, mx.bfloat16) for _, v in tree_flatten(model.parameters()))
    assert relative_error(logits(model), adapted) < tolerance
    fuse.save_model(model, quantized, tmp_path / "float")
    dense = mlx_mamba.load(tmp_path / "float")[0]
    assert dense.config.quantization is None and not quantized_layers(dense)
    assert relative_error(logits(dense), np.array(logits(model))) < 1e-6


@pytest.mark.parametrize("flavour", MOE)
def test_full_fine_tuning_trains_experts_and_routers(tiny_model, flavour):
    model = mlx_mamba.load(tiny_model(flavour))[0]
    apply_adapters(model, {"fine_tune_type": "full", "num_layers": -1})
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert any(".experts." in name for name in trainable)
    assert any(name.endswith("router.weight") for name in trainable)
    assert not any(name.endswith("score_bias") for name in trainable)
    start = {name: np.array(v) for name, v in tree_flatten(model.parameters())}
    before, after = train_steps(model, repeated_batch(), learning_rate=1e-3)
    assert after < before
    now = dict(tree_flatten(model.parameters()))
    changed = {name for name in start if not np.array_equal(np.array(now[name]), start[name])}
    assert {n for n in start if ".experts." in n or "router" in n} <= changed
    assert not {n for n in start if n.endswith("score_bias")} & changed


@pytest.mark.parametrize("flavour", ["granite_moe", "falcon_h1", "zamba2"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradient_checkpointing_recomputes_mixers_and_feed_forwards(tiny_model, flavour, kind):
    model = mlx_mamba.load(tiny_model(flavour))[0]
    apply_adapters(model, {"fine_tune_type": kind, "num_layers": -1})
    perturb_trainable(model)
    batch = repeated_batch()

    def gradients():
        return nn.value_and_grad(model, lambda m: loss_terms(m, batch)[0])(model)

    loss, grads = gradients()
    checkpoint_layers(model)
    recomputed = [block[part] for block in model.backbone.layers for part in ("mixer", "ffn")
                  if part in block] + model.backbone.blocks
    assert all(getattr(type(part), "recomputed_in_backward", False) for part in recomputed)
    loss_checkpointed, grads_checkpointed = gradients()
    assert loss_checkpointed.item() == pytest.approx(loss.item(), rel=1e-6)
    grads_checkpointed = dict(tree_flatten(grads_checkpointed))
    for name, g in tree_flatten(grads):
        assert relative_error(grads_checkpointed[name], np.array(g)) < 1e-5, name


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_shared_blocks_train_with_the_layers_that_invoke_them(tiny_model, kind):
    model = mlx_mamba.load(tiny_model("zamba2"))[0]
    # Layers 4 (hybrid, the third invocation: shared block 0) and 5 (mamba).
    apply_adapters(model, {"fine_tune_type": kind, "num_layers": 2})
    trainable = {name for name, _ in tree_flatten(model.backbone.trainable_parameters())}
    assert {name.split(".")[0] + name.split(".")[1] for name in trainable} == {
        "layers4", "layers5", "blocks0"}
    if kind == "full":
        assert any(name.startswith("layers.4.adapters.") for name in trainable)
        assert any(name.startswith("layers.4.linear.") for name in trainable)


def test_given_keys_apply_wherever_a_layer_has_them(tiny_model):
    model = mlx_mamba.load(tiny_model("nemotron_h"))[0]
    apply_adapters(model, {"num_layers": -1, "train_ssm_params": True, "lora_parameters": {
        "keys": ["o_proj", "up_proj", "shared_experts.down_proj", "router"]}})
    kinds = model.config.layer_types  # mamba2, moe, attention, mlp, mamba2, moe
    assert adapted_paths(model) == {f"layers.{path}" for path in (
        "1.mixer.shared_experts.up_proj", "1.mixer.shared_experts.down_proj", "1.mixer.router",
        "2.mixer.o_proj", "3.mixer.up_proj", "5.mixer.shared_experts.up_proj",
        "5.mixer.shared_experts.down_proj", "5.mixer.router")}
    # train_ssm_params: the Mamba mixers' own parameters only.
    trainable = {name for name, _ in tree_flatten(model.trainable_parameters())
                 if "lora" not in name}
    mamba = {i for i, kind in enumerate(kinds) if kind == "mamba2"}
    assert {int(name.split(".")[2]) for name in trainable} == mamba
    # A LoRA router still routes: its adapted weight, through the same code path.
    perturbed = {k: v + 0.05 for k, v in tree_flatten(model.trainable_parameters())
                 if k.endswith("lora_b")}
    model.load_weights(list(perturbed.items()), strict=False)
    adapted = np.array(logits(model))
    fuse.fuse_adapters(model)
    assert relative_error(logits(model), adapted) < 1e-5


@pytest.mark.parametrize("config, message", [
    ({"lora_parameters": {"keys": ["experts.up_proj"]}},
     "LoRA key 'experts.up_proj': no adapted layer has such a linear projection (they have "
     "down_proj, in_proj, k_proj, o_proj, out_proj, q_proj, router, up_proj, v_proj)"),
    ({"lora_parameters": {"keys": ["in_proj", "conv1d"]}}, "LoRA key 'conv1d': no adapted"),
    ({"lora_parameters": {"keys": "in_proj"}},
     "lora_parameters.keys 'in_proj': expected a list of projection names"),
])
def test_bad_lora_keys_name_the_key(tiny_model, config, message):
    model = mlx_mamba.load(tiny_model("nemotron_h"))[0]
    with pytest.raises(AdapterError) as error:
        apply_adapters(model, dict(config, num_layers=-1))
    assert message in str(error.value)
    assert dict(tree_flatten(model.trainable_parameters())), "checked only after freezing"


def test_full_fine_tuning_refuses_quantized_experts(tiny_model):
    model = mlx_mamba.load(tiny_model("granite_moe"))[0]
    nn.quantize(model, 32, 4, class_predicate=lambda _, m: isinstance(m, ExpertLinear)
                and m.weight.shape[-1] % 32 == 0)
    assert any(isinstance(m, QuantizedExpertLinear) for _, m in model.named_modules())
    with pytest.raises(AdapterError, match="full fine-tuning needs a float model"):
        apply_adapters(model, {"fine_tune_type": "full", "num_layers": -1})


def test_cli_fine_tunes_and_fuses_a_hybrid(tiny_model, text_data, tmp_path):
    model_dir, adapters = tiny_model("nemotron_h"), tmp_path / "adapters"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    def run(module, *args):
        result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    out = run("mlx_mamba.lora", "--model", model_dir, "--train", "--data", text_data,
              "--iters", 2, "--batch-size", 2, "--lora-rank", 4, "--learning-rate", 1e-2,
              "--grad-checkpoint", "--train-ssm-params", "--adapter-path", adapters)
    assert "Iter 2: Train loss" in out and (adapters / "adapters.safetensors").is_file()
    run("mlx_mamba.fuse", "--model", model_dir, "--adapter-path", adapters,
        "--save-path", tmp_path / "fused")
    trained = load_adapters(mlx_mamba.load(model_dir)[0], adapters)
    fused = mlx_mamba.load(tmp_path / "fused")[0]
    assert relative_error(logits(fused), np.array(logits(trained))) < 1e-5


@pytest.mark.parametrize("config, message", [
    ({"num_layers": "all"}, "num_layers 'all': expected a positive integer, or -1 for all"),
    ({"num_layers": 2.5}, "num_layers 2.5: expected a positive integer"),
    ({"num_layers": 7}, "num_layers 7: the model has 6 layers (use -1 for all)"),
    ({"lora_parameters": [8]}, "lora_parameters [8]: expected an object"),
    ({"lora_parameters": {"rank": True}}, "lora_parameters.rank True: expected a positive integer"),
    ({"lora_parameters": {"scale": "big"}}, "lora_parameters.scale 'big': expected a finite number"),
    ({"lora_parameters": {"dropout": "0.1"}}, "lora_parameters.dropout '0.1': expected a probability"),
])
def test_bad_adapter_settings_name_the_setting(tiny_model, config, message):
    model = mlx_mamba.load(tiny_model("nemotron_h"))[0]
    with pytest.raises(AdapterError) as error:
        apply_adapters(model, config)
    assert message in str(error.value)


def test_an_adapter_config_that_is_not_an_object_is_one_error(tiny_model, tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="adapter_config.json: the adapter config is a list: expected an object"):
        load_adapters(mlx_mamba.load(tiny_model("nemotron_h"))[0], tmp_path)
