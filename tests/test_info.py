"""`python -m mlx_mamba.info`: what a checkpoint is, from its config alone. The memory figures
are checked against arithmetic on the published shapes, not against the code that prints them."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_mamba import info, sizes
from mlx_mamba.checkpoint import keeps_float32
from mlx_mamba.config import load_config
from mlx_mamba.quantize import QUANTIZED_LAYERS
from quant_models import deep  # noqa: F401 (a fixture)

REAL = Path(__file__).parent / "data" / "real_configs"
NEMOTRON = REAL / "nvidia--Nemotron-H-8B-Base-8K"
CODESTRAL = REAL / "mistralai--Mamba-Codestral-7B-v0.1"


def run(capsys, *argv):
    status = info.main(["--model", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def line(lines, start):
    return next(text for text in lines if text.startswith(start))


def test_describes_a_hybrid_checkpoint(capsys):
    status, out, err = run(capsys, NEMOTRON)
    assert status == 0 and not err
    published = json.loads((NEMOTRON / "config.json").read_text())
    # NVIDIA's own pattern characters are this package's: M Mamba2, * attention, - MLP.
    assert line(out, "layer pattern:") == f"layer pattern: {published['hybrid_override_pattern']}"
    assert "8,100,852,736" in line(out, "parameters:")
    # 4 attention layers x keys and values x 8 heads x 128 x 2 bytes x 1,000 tokens.
    assert line(out, "KV cache").startswith(f"KV cache (bfloat16): {4 * 2 * 8 * 128 * 2 * 1000 / 1e6:.2f} MB per 1,000 tokens")
    # 24 Mamba2 layers: float32 state 128 heads x 64 x 128, bfloat16 conv window 3 x (8192 + 2 x 8 x 128).
    state = 24 * (128 * 64 * 128 * 4 + 3 * (8192 + 2 * 8 * 128) * 2)
    assert line(out, "SSM state:").startswith(f"SSM state: {state / 1e6:.2f} MB per sequence, constant")


def test_a_converted_model_says_what_its_files_hold(capsys):
    # mlx-community's 4-bit Granite-4.0-H-350M: its own quantization is the 4-bit line's.
    status, out, _ = run(capsys, REAL / "mlx-community--granite-4.0-h-350m-4bit")
    four_bit = line(out, "quantized").split("4-bit ")[1].split(",")[0]
    assert status == 0 and line(out, "as converted") == f"as converted (affine 4-bit, group size 64): {four_bit}"
    assert "340,332,224" in line(out, "parameters:")


def test_a_pure_mamba_model_has_no_kv_cache(capsys):
    status, out, _ = run(capsys, CODESTRAL)
    assert status == 0
    assert line(out, "layer pattern:") == "layer pattern: " + "M" * 64
    assert line(out, "KV cache") == "KV cache: none (no attention layers)"
    assert "feed-forward:" not in "\n".join(out)


def test_weight_memory_is_the_arithmetic_of_the_shapes():
    config = load_config(CODESTRAL)
    shapes = sizes.tensor_shapes(config)
    count = {name: int(mx.prod(mx.array(shape)).item()) for name, shape in shapes.items()}
    assert sizes.weight_bytes(config, mx.float32) == 4 * sum(count.values())
    kept = sum(n for name, n in count.items() if keeps_float32(name))
    assert sizes.weight_bytes(config, mx.bfloat16) == 2 * sum(count.values()) + 2 * kept
    quantized = sum(n for name, n in count.items()
                    if name.rsplit(".", 2)[-2] in QUANTIZED_LAYERS and name.endswith("weight"))
    for bits in (8, 4, 3):
        # packed weights, plus a bfloat16 scale and bias per group of 64
        expected = 2 * sum(count.values()) + 2 * kept - 2 * quantized \
            + quantized * bits // 8 + quantized // 64 * 2 * 2
        q = {"bits": bits, "group_size": 64, "mode": "affine"}
        assert sizes.weight_bytes(config, mx.bfloat16, q) == expected


def test_a_hub_repo_downloads_only_its_config(capsys, monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        target = tmp_path / "snapshot"
        shutil.copytree(CODESTRAL, target, dirs_exist_ok=True)
        return str(target)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    status, out, err = run(capsys, "mistralai/Mamba-Codestral-7B-v0.1")
    assert status == 0 and not err
    assert calls == [("mistralai/Mamba-Codestral-7B-v0.1", ["config.json", "params.json"])]
    assert "7,285,403,648" in line(out, "parameters:")


def test_the_hub_unreachable_is_one_error_line(capsys):
    # conftest makes the hub offline: the real huggingface_hub call fails.
    status, out, err = run(capsys, "someone/no-such-model")
    assert status == 1 and not out
    assert len(err) == 1 and err[0].startswith("error: someone/no-such-model: download")


@pytest.mark.parametrize("text,expected", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"model_type": "llama", "hidden_size": 8}), "'model_type'"),
    (json.dumps({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 10**6,
                 "vocab_size": 10}), "layers"),
    (json.dumps({"model_type": "mamba2", "hidden_size": 4096, "num_hidden_layers": 64,
                 "vocab_size": 10**12}), "more than any machine holds"),
    (json.dumps({"model_type": "nemotron_h", "hidden_size": 64, "vocab_size": 10,
                 "hybrid_override_pattern": "M?M"}), "hybrid_override_pattern"),
    (json.dumps({"model_type": ["mamba"], "hidden_size": 64}), "'model_type'"),
])
def test_a_bad_config_is_one_error_line(capsys, tmp_path, text, expected):
    (tmp_path / "config.json").write_text(text)
    status, out, err = run(capsys, tmp_path)
    assert status == 1 and not out
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_a_strange_architectures_field_is_not_an_error(capsys, tmp_path):
    config = json.loads((CODESTRAL / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, architectures=3)))
    status, out, _ = run(capsys, tmp_path)
    assert status == 0 and line(out, "architecture:") == "architecture: mamba2"


def test_a_missing_directory_is_one_error_line(capsys, tmp_path):
    status, _, err = run(capsys, tmp_path / "absent")
    assert status == 1 and len(err) == 1 and "no such directory" in err[0]


DOCS = Path(__file__).parent.parent / "docs" / "info.md"


def test_the_documented_output_is_the_real_output(capsys):
    text = DOCS.read_text()
    documented = text.split("## What it prints")[1].split("```\n")[1].splitlines()
    _, out, _ = run(capsys, REAL / "ai21labs--AI21-Jamba-1.5-Mini")
    assert out[1:] == documented


def test_the_documented_flags_and_python_are_real():
    import re

    text = DOCS.read_text()
    parser_flags = {flag for action in info.build_parser()._actions for flag in action.option_strings}
    assert set(re.findall(r"`(--[a-z-]+)", text)) <= parser_flags
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(block, {})


def test_a_mixed_precision_model_shows_its_bits(capsys, deep, tmp_path):
    from safetensors.numpy import load_file

    from mlx_mamba.convert import convert

    out = tmp_path / "mixed"
    convert(deep["mamba2_deep"], out, quantize=True, quant_predicate="mixed_3_6")
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    tensors = {k: v for file in out.glob("*.safetensors") for k, v in load_file(file).items()}
    layers = [name[:-len(".scales")] for name in tensors if name.endswith(".scales")]
    high = [path for path, entry in quantization.items() if isinstance(entry, dict)]
    assert high and all(quantization[path]["bits"] == 6 for path in high)
    # Stored bits per parameter of the quantized layers, from the files: packed words, and scales
    # and biases in bfloat16 (info's figures are for bfloat16; this checkpoint's are float32),
    # over (scales x group size) parameters.
    stored = sum(tensors[f"{layer}.weight"].nbytes + 2 * tensors[f"{layer}.scales"].size
                 + 2 * tensors[f"{layer}.biases"].size for layer in layers)
    count = sum(tensors[f"{layer}.scales"].size for layer in layers) * quantization["group_size"]
    status, lines, _ = run(capsys, out)
    assert status == 0
    assert line(lines, "as converted").startswith(
        f"as converted (affine, mixed 3/6-bit, default 3-bit, group size 64): ")
    assert f", {8 * stored / count:.2f} bits per quantized weight" in line(lines, "as converted")
    assert line(lines, "  6-bit:").startswith(f"  6-bit: {len(high)} layers (embeddings, ")
    assert line(lines, "  3-bit:").startswith(f"  3-bit: {len(layers) - len(high)} layers (")


def test_the_size_check_counts_a_mixed_models_widest_bits():
    from mlx_mamba import ModelConfig
    from mlx_mamba.config import ConfigError

    # 8.2e12 parameters: 2.0 TB at 2 bits fits under the 4.4 TB bound, 8.2 TB at 8 bits does not.
    config = {"model_type": "mamba2", "hidden_size": 4096, "num_hidden_layers": 1,
              "vocab_size": 2 * 10**9, "tie_word_embeddings": True,
              "quantization": {"group_size": 64, "bits": 2, "mode": "affine"}}
    ModelConfig.from_dict(config)
    config["quantization"]["backbone.embeddings"] = {"group_size": 64, "bits": 8}
    with pytest.raises(ConfigError, match="at 8 bits"):
        ModelConfig.from_dict(config)
