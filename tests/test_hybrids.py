"""Hybrid checkpoints (Bamba, Granite 4.0-H dense and MoE, Nemotron-H, Jamba): the same model stack as
pure Mamba, checked against transformers (logits, greedy generation, quantized weights) and
against itself (whole forward = cache = step, padded batches = rows alone, resumed prompt caches),
and every bad config or checkpoint gets one error line naming the field."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

import mlx_mamba
from checkpoints import HYBRIDS
from comparing import IdTokenizer, relative_error
from mlx_mamba.cache import KVCache, LayerCaches, MambaCache
from mlx_mamba.config import ModelConfig
from mlx_mamba.convert import convert, save_model
from mlx_mamba.fuse import dequantize_model
from mlx_mamba.generate import batch_generate, stream_generate
from mlx_mamba.prompt_cache import (load_prompt_cache, make_prompt_cache, prefill,
                                    save_prompt_cache)

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = sorted(HYBRIDS)
IDS = np.random.RandomState(0).randint(0, 100, (3, 29))


@pytest.fixture(scope="module", params=FAMILIES)
def hybrid(request, checkpoint):
    """(flavour, directory, transformers model, our model)."""
    directory, reference = checkpoint(request.param)
    return request.param, directory, reference, mlx_mamba.load(directory)[0]


def test_caches_follow_the_layer_kinds(hybrid):
    _, _, _, model = hybrid
    kinds = {MambaCache: ("mamba1", "mamba2"), KVCache: ("attention",),
             LayerCaches: ("parallel", "hybrid"), type(None): ("mlp", "moe")}
    for i, cache in enumerate(model.make_cache(2)):
        assert model.config.layer_type(i) in kinds[type(cache)]
    assert {"attention", "parallel", "hybrid"} & set(model.config.layer_types)


def test_whole_forward_equals_cache_equals_step(hybrid):
    _, _, _, model = hybrid
    ids = mx.array(IDS)
    whole = model(ids)
    cache = model.make_cache(3)
    pieces = [model(ids[:, a:b], cache) for a, b in ((0, 5), (5, 16), (16, 25))]
    pieces += [model.step(ids[:, t], cache)[:, None] for t in range(25, 29)]
    assert relative_error(mx.concatenate(pieces, axis=1), whole) < 1e-5
    kv = [c.attention if isinstance(c, LayerCaches) else c for c in cache]
    assert all(c.length == 29 for c in kv if isinstance(c, KVCache))


def test_greedy_generation_equals_transformers(hybrid):
    _, _, reference, model = hybrid
    prompt = IDS[0, :7].tolist()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    ours = [r.token for r in stream_generate(model, IdTokenizer(), prompt, max_tokens=12)]
    assert ours == expected


def test_padded_batch_equals_each_row_alone(hybrid):
    # Left padding must reach neither the Mamba state nor the attention keys, and each row's
    # RoPE positions start at its first real token.
    _, _, _, model = hybrid
    prompts = [IDS[0, :3].tolist(), IDS[1, :11].tolist(), IDS[2, :6].tolist()]
    together = batch_generate(model, IdTokenizer(), prompts, max_tokens=6, prefill_step_size=4)
    for prompt, result in zip(prompts, together):
        alone = [r.token for r in stream_generate(model, IdTokenizer(), prompt, max_tokens=6)]
        assert result.tokens == alone


def test_left_padding_over_a_cache_that_holds_state_is_exact(hybrid):
    # Rows share a cache that already holds 4 tokens each, then get 1, 6 and 3 more (padded to
    # 6): every row's next logits equal those of the row run alone.
    _, _, _, model = hybrid
    prefixes = [IDS[r, :4].tolist() for r in range(3)]
    tails = [IDS[0, 4:5].tolist(), IDS[1, 4:10].tolist(), IDS[2, 4:7].tolist()]
    cache = model.make_cache(3)
    prefill(model, prefixes, cache, step_size=3)
    prefill(model, tails, cache, step_size=4)
    batched = model.step(mx.array([int(IDS[r, 20]) for r in range(3)]), cache)
    for r in range(3):
        alone = model.make_cache(1)
        prefill(model, [prefixes[r] + tails[r]], alone)
        expected = model.step(mx.array([int(IDS[r, 20])]), alone)
        assert relative_error(batched[r:r + 1], expected) < 1e-5


def test_saved_prompt_cache_resumes_exactly(hybrid, tmp_path):
    _, _, _, model = hybrid
    tokens = IDS[0].tolist()
    whole = make_prompt_cache(model, tokens)
    save_prompt_cache(tmp_path / "cache.safetensors", make_prompt_cache(model, tokens[:13]), model)
    resumed = make_prompt_cache(model, tokens[13:],
                                load_prompt_cache(tmp_path / "cache.safetensors", model))
    token = mx.array(tokens[-1:])
    assert relative_error(model.step(token, resumed.layers), model.step(token, whole.layers)) < 1e-5


def test_a_prompt_cache_of_another_family_is_refused(checkpoint, tmp_path):
    bamba = mlx_mamba.load(checkpoint("bamba")[0])[0]
    granite = mlx_mamba.load(checkpoint("granite_dense")[0])[0]
    save_prompt_cache(tmp_path / "c.safetensors", make_prompt_cache(bamba, [1, 2, 3]), bamba)
    with pytest.raises(ValueError, match="another configuration"):
        load_prompt_cache(tmp_path / "c.safetensors", granite)


@pytest.mark.parametrize("fields", [
    {},  # transformers' defaults: Jamba v0.1's layout
    dict(num_hidden_layers=9, attn_layer_period=4, attn_layer_offset=0, expert_layer_period=3,
         expert_layer_offset=2, num_experts=5),
    dict(num_hidden_layers=6, num_experts=1),  # one expert: MLPs everywhere
])
def test_jamba_layer_order_is_transformers(fields):
    source = transformers.JambaConfig(**fields)
    config = ModelConfig.from_dict(dict(source.to_dict(), mamba_dt_rank="auto"))
    assert [{"mamba1": "mamba", "attention": "attention"}[k] for k in config.layer_types] == \
        source.layers_block_type
    assert [{"moe": source.num_experts, "mlp": 1}[k] for k in config.ffn_types] == \
        [n if n > 1 else 1 for n in source.layers_num_experts]
    assert config.dt_rank == -(-source.hidden_size // 16) == source.mamba_dt_rank


def _transformers_with(weights_dir, source, tmp_path):
    """transformers' model of `source`'s family holding the float weights saved in weights_dir."""
    target = tmp_path / "torch_layout"
    shutil.copytree(weights_dir, target)
    weights = {k: np.array(v.astype(mx.float32))
               for k, v in mx.load(str(target / "model.safetensors")).items()}
    weights = {k: v.transpose(0, 2, 1) if k.endswith("conv1d.weight") else v
               for k, v in weights.items()}
    from safetensors.numpy import save_file

    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(target).eval()


@pytest.mark.parametrize("flavour", ["granite_moe", "nemotron_h", "bamba", "falcon_h1", "zamba2",
                                     "jamba"])
@pytest.mark.parametrize("mode", ["affine", "mxfp4", "nvfp4", "mxfp8"])
def test_quantized_equals_transformers_on_the_dequantized_weights(flavour, mode, checkpoint,
                                                                  tmp_path):
    source, _ = checkpoint(flavour)
    quantized_dir = convert(source, tmp_path / "q", quantize=True, q_mode=mode,
                            q_group_size=32 if mode == "affine" else None)
    model = mlx_mamba.load(quantized_dir)[0]
    config = json.loads((quantized_dir / "config.json").read_text())
    assert config["quantization"]["mode"] == mode
    quantized = [p for p, m in model.named_modules() if hasattr(m, "scales")]
    assert any("experts" in p for p in quantized) or "moe" not in model.config.kinds
    assert not any("router" in p for p in quantized)
    ours = model(mx.array(IDS)).astype(mx.float32)

    dequantize_model(model)
    save_model(tmp_path / "dq", dict(tree_flatten(model.parameters())), model.config)
    reference = _transformers_with(tmp_path / "dq", source, tmp_path)
    with torch.no_grad():
        theirs = reference(torch.tensor(IDS)).logits.numpy()
    assert relative_error(ours, theirs) < 2e-4


# ---- bad configs and checkpoints: one error line, nothing written ---------------------------

def run_convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def _edited(source, tmp_path, edit_config=None, drop=None):
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    if drop:
        weights = mx.load(str(target / "model.safetensors"))
        mx.save_safetensors(str(target / "model.safetensors"),
                            {k: v for k, v in weights.items() if drop not in k},
                            metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("flavour,edit,drop,message", [
    ("nemotron_h", lambda c: c.update(layers_block_type=["linear_attention", "banana"] * 3),
     None, "layers_block_type.*banana"),
    ("nemotron_h", lambda c: (c.pop("layers_block_type"), c.update(hybrid_override_pattern="M*X-EM")),
     None, "hybrid_override_pattern.*'X'"),
    ("granite_dense", lambda c: c.update(layer_types=["mamba", "transformer", "mamba", "mamba"]),
     None, "layer_types.*transformer"),
    ("bamba", lambda c: c.update(mamba_d_head=24), None, "mamba_d_head"),
    ("bamba", lambda c: c.update(num_key_value_heads=3), None, "num_key_value_heads"),
    ("granite_moe", lambda c: c.update(num_experts_per_tok=5), None, "num_experts_per_tok"),
    ("nemotron_h", lambda c: c.update(num_experts_per_tok=9), None, "num_experts_per_tok"),
    ("nemotron_h", lambda c: c.update(n_group=3), None, "n_group"),
    ("nemotron_h", None, "mixer.experts.3.", "experts"),
    ("granite_moe", None, "block_sparse_moe.input_linear", "block_sparse_moe.input_linear"),
    ("bamba", lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     None, "rope_type"),
    ("falcon_h1", lambda c: c.update(ssm_multipliers=[1.0, 2.0]), None, "ssm_multipliers"),
    ("falcon_h1", lambda c: c.update(mamba_d_ssm=48), None, "mamba_d_ssm"),
    ("falcon_h1", lambda c: c.update(key_multiplier="big"), None, "key_multiplier"),
    ("zamba2", lambda c: c.update(num_key_value_heads=2), None, "num_key_value_heads"),
    ("zamba2", lambda c: c.update(layers_block_type=["mamba", "shared"] * 3), None,
     "layers_block_type.*shared"),
    ("zamba2", None, "linear_q_adapter_list.2.", "linear_q_adapter_list.2"),
    ("jamba", lambda c: c.update(attn_layer_period=0), None, "attn_layer_period"),
    ("jamba", lambda c: c.update(expert_layer_offset=2), None, "expert_layer_offset"),
    ("jamba", lambda c: c.update(num_experts_per_tok=5), None, "num_experts_per_tok"),
    ("jamba", lambda c: c.update(mamba_dt_rank="full"), None, "mamba_dt_rank"),
    ("jamba", None, "feed_forward.experts.2.up_proj",
     r"missing tensor 'model\.layers\.3\.feed_forward\.experts\.2\.up_proj\.weight'"),
    ("jamba", lambda c: c.update(num_experts=1), None,
     r"unexpected tensor 'model\.layers\.[13]\.feed_forward\.experts\.0\..*no mixture-of-experts"),
    ("jamba", None, "mamba.dt_layernorm", "model.layers.0.mamba.dt_layernorm.weight"),
])


def test_bad_hybrid_checkpoints_get_one_error_line(flavour, edit, drop, message, checkpoint,
                                                   tmp_path):
    source = _edited(checkpoint(flavour)[0], tmp_path, edit, drop)
    result = run_convert("--hf-path", source, "--mlx-path", tmp_path / "out")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_zamba2_blocks_are_shared_in_memory_and_on_disk(checkpoint, tmp_path):
    source, _ = checkpoint("zamba2")
    model = mlx_mamba.load(source)[0]
    names = [n for n, _ in tree_flatten(model.parameters())]
    assert sum(n.endswith("self_attn.q_proj.weight") for n in names) == 2  # two blocks, 3 uses
    assert sum(n.endswith("adapters.q.down.weight") for n in names) == 3  # one per invocation
    written = mx.load(str(convert(source, tmp_path / "out") / "model.safetensors"))
    assert sum(n.endswith("self_attn.q_proj.weight") for n in written) == 2


def test_zamba2_block_copies_that_differ_are_refused(checkpoint, tmp_path):
    # A checkpoint storing a block again at a later invocation, with other values, is not a
    # model with shared blocks: refused rather than silently using the first copy.
    source = _edited(checkpoint("zamba2")[0], tmp_path)
    weights = dict(mx.load(str(source / "model.safetensors")))
    first = "model.layers.1.shared_transformer.self_attn.q_proj.weight"
    weights[first.replace("layers.1.", "layers.4.")] = weights[first] + 1
    mx.save_safetensors(str(source / "model.safetensors"), weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.4.shared_transformer.*not shared"):
        mlx_mamba.load(source)


def test_bfloat16_runs_close_to_float32(hybrid):
    # Every layer kind runs in bfloat16 on this backend too (MoE included: CPU gather_mm takes
    # float32 only, so experts compute in float32 there), within bfloat16's rounding.
    _, directory, _, model = hybrid
    half = mlx_mamba.load(directory, dtype=mx.bfloat16)[0]
    ids = mx.array(IDS[:, :12])
    assert relative_error(half(ids).astype(mx.float32), model(ids)) < 5e-2


def test_pure_mamba_prompt_caches_keep_their_identity():
    # The fields added for the hybrids are recorded only when set, so a prompt cache saved by the
    # release before them (whose hash for this config was 9c6b0744ee132e7d) still loads.
    from mlx_mamba.config import ModelConfig
    from mlx_mamba.prompt_cache import config_hash

    config = ModelConfig.from_dict({"model_type": "mamba2", "hidden_size": 64, "vocab_size": 10,
                                    "num_hidden_layers": 2, "num_heads": 2, "head_dim": 64,
                                    "n_groups": 1})
    assert config_hash(config) == "9c6b0744ee132e7d"


def test_nemotron_h_attention_head_size_as_the_hub_spells_it(checkpoint):
    # Hub configs spell it attention_head_dim; with neither spelling transformers takes 128,
    # not hidden_size / heads (Nemotron-H-4B: hidden 3072 and 32 heads, yet heads of 128).
    from mlx_mamba.config import ModelConfig

    source = json.loads((checkpoint("nemotron_h")[0] / "config.json").read_text())
    hub = {k: v for k, v in source.items() if k != "head_dim"}
    assert ModelConfig.from_dict(dict(hub, attention_head_dim=8)).attn_head_dim == 8
    assert ModelConfig.from_dict(hub).attn_head_dim == 128
    assert transformers.NemotronHConfig().head_dim == 128
    written = ModelConfig.from_dict(dict(hub, attention_head_dim=8)).to_dict()
    assert "attention_head_dim" in written and "head_dim" not in written  # written back as read
