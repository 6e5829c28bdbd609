"""Config parsing from every flavour, and errors that name the field."""

import json
import math

import pytest

from mlx_mamba.config import ConfigError, ModelConfig, load_config

ORIGINAL_MAMBA1 = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
                   "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                   "pad_vocab_size_multiple": 8}
ORIGINAL_MAMBA2 = {"d_model": 1024, "d_intermediate": 0, "n_layer": 48, "vocab_size": 50277,
                   "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
                   "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                   "pad_vocab_size_multiple": 16, "tie_embeddings": True}


def test_original_mamba1_defaults():
    c = ModelConfig.from_dict(ORIGINAL_MAMBA1)
    assert (c.arch, c.vocab_size, c.d_state, c.d_conv, c.expand, c.dt_rank) == \
        ("mamba1", 50280, 16, 4, 2, 48)
    assert c.tie_embeddings and c.model_type == "mamba"


def test_original_mamba2_defaults():
    c = ModelConfig.from_dict(ORIGINAL_MAMBA2)
    assert (c.arch, c.vocab_size, c.d_state, c.head_dim, c.n_groups, c.chunk_size) == \
        ("mamba2", 50288, 128, 64, 1, 256)
    assert c.n_heads == 32 and c.dt_limit == (0.0, math.inf)


def test_transformers_round_trip():
    for c in (ModelConfig.from_dict(ORIGINAL_MAMBA1), ModelConfig.from_dict(ORIGINAL_MAMBA2)):
        assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_transformers_infinity_and_falcon():
    c = ModelConfig.from_dict({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2,
                               "vocab_size": 10, "num_heads": 2, "head_dim": 64, "n_groups": 2,
                               "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert c.dt_limit == (0.0, math.inf)
    f = ModelConfig.from_dict({"model_type": "falcon_mamba", "hidden_size": 64,
                               "num_hidden_layers": 2, "vocab_size": 10})
    assert f.mixer_rms_eps == 1e-6 and f.model_type == "falcon_mamba"


@pytest.mark.parametrize("config,field", [
    ({"model_type": "llama", "hidden_size": 8}, "model_type"),
    ({"model_type": "mamba", "num_hidden_layers": 2, "vocab_size": 10}, "hidden_size"),
    ({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10,
      "intermediate_size": 100}, "intermediate_size"),
    ({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10,
      "num_heads": 3, "head_dim": 64}, "num_heads"),
    ({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10,
      "num_heads": 4, "head_dim": 32, "n_groups": 3}, "n_groups"),
    (dict(ORIGINAL_MAMBA1, ssm_cfg={"layer": "Mamba4"}), "ssm_cfg.layer"),
    (dict(ORIGINAL_MAMBA2, d_intermediate=512), "d_intermediate"),
    (dict(ORIGINAL_MAMBA2, attn_layer_idx=[3]), "attn_layer_idx"),
    (dict(ORIGINAL_MAMBA1, ssm_cfg={"frobnicate": 1}), "ssm_cfg.frobnicate"),
    ({"hello": 1}, "model_type"),
])
def test_errors_name_the_field(config, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(config)


def test_load_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "missing")


# Wrong types and ranges in config.json: caught where the file is read, naming the field.
MAMBA2_HF = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10,
             "num_heads": 2, "head_dim": 64, "n_groups": 1}


@pytest.mark.parametrize("changes,field", [
    ({"model_type": "mamba", "time_step_rank": "big"}, "time_step_rank"),
    ({"n_groups": 0}, "n_groups"),
    ({"head_dim": 0}, "head_dim"),
    ({"chunk_size": "16"}, "chunk_size"),
    ({"chunk_size": 1.5}, "chunk_size"),
    ({"chunk_size": True}, "chunk_size"),
    ({"time_step_limit": [0.0, 1.0, 2.0]}, "time_step_limit"),
    ({"time_step_limit": [0.0, "x"]}, "time_step_limit"),
    ({"quantization": {"group_size": 64, "bits": 7}}, "quantization"),
    ({"quantization": {"bits": 4}}, "quantization"),
    ({"quantization": "4bit"}, "quantization"),
    ({"layer_norm_epsilon": -1}, "layer_norm_epsilon"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_field_types_and_ranges_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict(dict(MAMBA2_HF, **changes))


@pytest.mark.parametrize("changes,field", [
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"num_hidden_layers": 10**6}, "n_layer"),
    ({"num_hidden_layers": 5000, "hidden_size": 16384, "num_heads": 512}, "n_layer"),
])
def test_a_config_too_large_for_any_machine_fails_fast(changes, field):
    # Checked from the sizes alone, before any array exists: this runs in milliseconds.
    with pytest.raises(ConfigError, match=f"'{field}'.*(GB|layers)"):
        ModelConfig.from_dict(dict(MAMBA2_HF, **changes))
