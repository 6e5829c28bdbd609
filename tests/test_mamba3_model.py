"""Mamba-3 language models: a state-spaces original directory (ssm_cfg.layer "Mamba3") loads and
matches a float64 loop; it converts (quantized too), generates, batches, resumes a prompt cache,
trains LoRA adapters (with gradient checkpointing too) and fuses them."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

import float64_reference as ref
import mlx_mamba
from comparing import relative_error
from mlx_mamba import fuse
from mlx_mamba.config import ConfigError, ModelConfig
from mlx_mamba.convert import convert
from mlx_mamba.generate import batch_generate, stream_generate
from mlx_mamba.prompt_cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_mamba.ops import mamba3 as mamba3_scan
from mlx_mamba.tuner import LoRALinear, apply_adapters, checkpoint_layers, loss_terms, losses
from test_long_sequences import loss_and_gradients, plain_loss_terms
from test_tuner import perturb_trainable, random_batch
from tuning import write_tokenizer

VOCAB, PADDED_VOCAB, D_MODEL, LAYERS = 100, 104, 32, 2
SSM_CFGS = {
    "siso": dict(layer="Mamba3", d_state=16, expand=2, headdim=16, ngroups=2, chunk_size=8,
                 A_floor=0.05, A_activation="softplus"),
    "mimo": dict(layer="Mamba3", d_state=16, expand=2, headdim=16, ngroups=1, chunk_size=8,
                 is_mimo=True, mimo_rank=2, rope_fraction=1.0, is_outproj_norm=True),
}


def random_weights(model, seed):
    """Official names (the embedding as originals spell it) -> float64 arrays."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            array = 1 + 0.1 * rng.normal(size=value.shape)
        elif name.endswith(("in_proj.weight", "out_proj.weight")):
            array = rng.normal(size=value.shape) / np.sqrt(value.shape[1])
        elif name.endswith("embeddings.weight"):
            array = rng.normal(size=value.shape)
        else:
            array = 0.5 * rng.normal(size=value.shape)
        weights[name.replace("backbone.embeddings.", "backbone.embedding.")] = array
    return weights


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """flavour -> (directory, float64 weights) of a state-spaces original Mamba-3 checkpoint."""
    written = {}
    for seed, (flavour, ssm_cfg) in enumerate(SSM_CFGS.items()):
        directory = tmp_path_factory.mktemp(f"mamba3_{flavour}")
        config = {"d_model": D_MODEL, "d_intermediate": 0, "n_layer": LAYERS, "vocab_size": VOCAB,
                  "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True,
                  "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
        (directory / "config.json").write_text(json.dumps(config))
        weights = random_weights(mlx_mamba.Model(ModelConfig.from_dict(config)), seed)
        torch.save({k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()},
                   directory / "pytorch_model.bin")
        write_tokenizer(directory)
        written[flavour] = directory, weights
    return written


def reference_logits(weights, ssm_cfg, ids):
    """The original LM in float64: embedding, pre-norm residual Mamba-3 layers, tied head."""
    def rms_norm(x, weight):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * weight

    embedding = weights["backbone.embedding.weight"]
    residual = embedding[np.asarray(ids)]
    for i in range(LAYERS):
        prefix = f"backbone.layers.{i}."
        mixer = {k[len(prefix + "mixer."):]: v for k, v in weights.items()
                 if k.startswith(prefix + "mixer.")}
        out, _ = ref.mamba3(mixer, rms_norm(residual, weights[prefix + "norm.weight"]),
                            ssm_cfg["d_state"], ssm_cfg["headdim"], ssm_cfg["ngroups"],
                            ssm_cfg.get("rope_fraction", 0.5), ssm_cfg.get("A_floor", 1e-4),
                            ssm_cfg.get("is_mimo", False), ssm_cfg.get("mimo_rank", 1),
                            ssm_cfg.get("is_outproj_norm", False),
                            A_activation=ssm_cfg.get("A_activation", "heavy_tail"))
        residual = residual + out
    return rms_norm(residual, weights["backbone.norm_f.weight"]) @ embedding.T


IDS = np.random.default_rng(5).integers(0, VOCAB, (2, 19))


@pytest.mark.parametrize("flavour", list(SSM_CFGS))
def test_original_loads_and_matches_float64(originals, flavour):
    directory, weights = originals[flavour]
    model, tokenizer = mlx_mamba.load(directory)
    assert type(model.backbone.layers[0].mixer).__name__ == "Mamba3"
    expected = reference_logits(weights, SSM_CFGS[flavour], IDS)
    assert relative_error(model(mx.array(IDS)), expected) < 1e-4
    # Prefill over the cache, then one token at a time.
    cache = model.make_cache(2)
    parts = [model(mx.array(IDS[:, :11]), cache)]
    parts += [model.step(mx.array(IDS[:, t]), cache)[:, None] for t in range(11, 19)]
    assert relative_error(mx.concatenate(parts, axis=1), expected) < 1e-4


@pytest.mark.parametrize("flavour", list(SSM_CFGS))
def test_convert_plain_and_quantized(originals, flavour, tmp_path):
    directory, weights = originals[flavour]
    expected = reference_logits(weights, SSM_CFGS[flavour], IDS)
    plain = convert(directory, tmp_path / "plain")
    model, _ = mlx_mamba.load(plain)
    assert model.config.arch == "mamba3"
    assert relative_error(model(mx.array(IDS)), expected) < 1e-4
    half, _ = mlx_mamba.load(convert(directory, tmp_path / "bf16", dtype="bfloat16"))
    mixer = half.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == mx.bfloat16
    # The small per-head parameters stay float32, as the official module keeps them.
    assert {v.dtype for k, v in tree_flatten(mixer.parameters())
            if k.endswith(("B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "D", "dt_bias"))} \
        == {mx.float32}
    assert relative_error(half(mx.array(IDS)).astype(mx.float32), expected) < 0.03
    quantized = convert(directory, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    model, _ = mlx_mamba.load(quantized)
    mixer = model.backbone.layers[0].mixer
    assert type(mixer.in_proj).__name__ == type(mixer.out_proj).__name__ == "QuantizedLinear"
    logits = model(mx.array(IDS))
    assert relative_error(logits, expected) < 0.1  # 8-bit rounding of every projection
    fuse.dequantize_model(model)  # the quantized layers compute exactly with their own weights
    assert relative_error(logits, np.array(model(mx.array(IDS)), np.float64)) < 1e-5
    # mxfp4 leaves no float weight in a layer: the model computes in what the embedding gives.
    fp4, _ = mlx_mamba.load(convert(directory, tmp_path / "fp4", quantize=True, q_mode="mxfp4"))
    logits = fp4(mx.array(IDS))
    assert logits.dtype == mx.bfloat16 and bool(mx.all(mx.isfinite(logits)))


def test_generation_batches_and_prompt_cache(originals, tmp_path):
    model, tokenizer = mlx_mamba.load(originals["mimo"][0])
    prompts = ["To be, or not", "Friends", "Now is the winter of"]
    alone = [[r.token for r in stream_generate(model, tokenizer, p, max_tokens=8)]
             for p in prompts]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=8, prefill_step_size=4)
    assert [r.tokens for r in batch] == [a[:len(r.tokens)] for r, a in zip(batch, alone)]
    assert mlx_mamba.generate(model, tokenizer, prompts[0], max_tokens=8)

    ids = tokenizer.encode(prompts[2])
    file = tmp_path / "prompt.safetensors"
    save_prompt_cache(file, make_prompt_cache(model, ids[:3], step_size=2), model, "tiny")
    resumed = make_prompt_cache(model, ids[3:], load_prompt_cache(file, model))
    whole = make_prompt_cache(model, ids)
    for a, b in zip(resumed.layers, whole.layers):
        for x, y in zip(a.state, b.state):
            assert relative_error(x, y, floor=1.0) < 1e-5


@pytest.mark.parametrize("flavour", list(SSM_CFGS))
def test_lora_on_the_projections_trains_and_fuses(originals, flavour):
    model, _ = mlx_mamba.load(originals[flavour][0])
    apply_adapters(model, {"fine_tune_type": "lora", "num_layers": -1, "train_ssm_params": True,
                           "lora_parameters": {"rank": 4, "scale": 2.0}})
    adapted = {name.split(".")[-1] for name, m in model.named_modules()
               if isinstance(m, LoRALinear)}
    assert adapted == {"in_proj", "out_proj"}
    rng = np.random.default_rng(1)
    # A trained adapter in one step: fresh LoRA updates are zero, which would hide mistakes.
    model.update(tree_map(lambda v: v + mx.array(0.05 * rng.normal(size=v.shape), v.dtype),
                          model.trainable_parameters()))
    ids = mx.array(IDS)

    def loss(model):
        logits = model(ids[:, :-1]).astype(mx.float32)
        return mx.mean(-mx.take_along_axis(logits - mx.logsumexp(logits, -1, keepdims=True),
                                           ids[:, 1:, None], -1))

    _, grads = nn.value_and_grad(model, loss)(model)
    flat = dict(tree_flatten(grads))
    assert all(float(mx.abs(g).max()) > 0 for g in flat.values())
    ssm = {"D", "dt_bias", "B_bias", "C_bias"} | ({"mimo_x", "mimo_z", "mimo_o"}
                                                  if flavour == "mimo" else set())
    assert {n.split("mixer.")[1] for n in flat if "lora" not in n} == ssm
    before = model(ids)
    fuse.fuse_adapters(model)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert relative_error(model(ids), np.array(before, np.float64)) < 1e-5


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("flavour", list(SSM_CFGS))
def test_grad_checkpoint_gives_the_loss_and_gradients_without_it(originals, monkeypatch, flavour,
                                                                  kind):
    """--grad-checkpoint (each layer recomputed in the backward pass) with the chunked loss and
    the segmented scan: the loss and every gradient of whole logits without checkpointing."""
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 5 * PADDED_VOCAB)  # 5 tokens a chunk
    monkeypatch.setattr(mamba3_scan, "SEGMENT_ROWS", 8)  # across segments, not a whole number
    model, _ = mlx_mamba.load(originals[flavour][0])
    apply_adapters(model, {"fine_tune_type": kind, "num_layers": -1, "train_ssm_params": True,
                           "lora_parameters": {"rank": 4, "scale": 2.0}})
    perturb_trainable(model)
    batch = random_batch()
    expected_loss, expected = loss_and_gradients(model, batch, plain_loss_terms)
    checkpoint_layers(model)
    loss, grads = loss_and_gradients(model, batch, loss_terms)
    assert relative_error(loss, expected_loss) < 1e-6
    assert sorted(grads) == sorted(expected) and any("mixer" in name for name in grads)
    for name, value in expected.items():
        error = relative_error(grads[name], np.array(value))
        assert error < 1e-5, f"{name}: relative error {error:.1e}"


@pytest.mark.parametrize("change, field", [
    (dict(rope_fraction=0.25), "ssm_cfg.rope_fraction"), (dict(d_state=15), "ssm_cfg.d_state"),
    (dict(d_state=2), "ssm_cfg.d_state"),
    (dict(is_mimo="yes"), "ssm_cfg.is_mimo"), (dict(bias=True), "ssm_cfg.bias"),
    (dict(conv_dim=3), "ssm_cfg.conv_dim"), (dict(A_floor=-1.0), "ssm_cfg.A_floor"),
    (dict(layer="Mamba4"), "ssm_cfg.layer"), (dict(A_activation="exp"), "ssm_cfg.A_activation"),
    (dict(A_activation=1), "ssm_cfg.A_activation"),
    (dict(is_mimo=True, mimo_rank=10 ** 8), "mimo_rank")])
def test_bad_mamba3_configs_name_the_field(change, field):
    config = {"d_model": D_MODEL, "n_layer": 1, "vocab_size": VOCAB,
              "ssm_cfg": {**SSM_CFGS["siso"], **change}}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(config)
