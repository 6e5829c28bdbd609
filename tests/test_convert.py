"""convert.py: every flavour to MLX safetensors with transformers' logits; quantization, dtypes,
shards, tokenizers, the hub (monkeypatched) and every bad input a user can cause."""

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_mamba
from checkpoints import FLAVOURS, VOCAB, write_checkpoint
from comparing import relative_error
from corpus import SHAKESPEARE
from mlx_mamba import convert as convert_module
from mlx_mamba.checkpoint import read_weights
from mlx_mamba.convert import convert, main

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 2e-4  # float32 logits, relative to their scale, as in test_parity.py
IDS = np.random.default_rng(1).integers(0, VOCAB, size=(2, 37))


def reference_logits(torch_model):
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.numpy()


def our_logits(directory):
    model, _ = mlx_mamba.load(directory)
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def leftovers(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.endswith(".partial")]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer_file):
    """A directory holding a tokenizer.json, as the hub's EleutherAI/gpt-neox-20b does."""
    directory = tmp_path_factory.mktemp("gpt-neox-20b")
    shutil.copyfile(tokenizer_file, directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def codestral(checkpoint, tmp_path_factory):
    """Mistral's Mamba-Codestral layout, made from the tiny untied n_groups=2 Mamba2: params.json
    and consolidated.safetensors with mistral_inference's names (`model.` + mamba_ssm's, so
    `model.backbone.embedding.weight`; conv kernels (C, 1, K)). The real params.json omits the
    sizes that keep mamba_ssm's defaults (d_state 128, head_dim 64, chunk 256); this tiny one must
    state its own. Its tokenizer is added by `codestral_tokenizer`."""
    source, reference = checkpoint("mamba2_groups_untied")
    directory = tmp_path_factory.mktemp("codestral")
    weights = mx.load(str(source / "model.safetensors"))
    mx.save_safetensors(str(directory / "consolidated.safetensors"), {
        "model." + name.replace("backbone.embeddings.", "backbone.embedding."): value
        for name, value in weights.items()})
    kw = FLAVOURS["mamba2_groups_untied"][1]
    (directory / "params.json").write_text(json.dumps({
        "dim": kw["hidden_size"], "n_layers": kw["num_hidden_layers"], "vocab_size": VOCAB,
        "n_groups": kw["n_groups"], "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": False,
        "model_type": "mamba", "d_state": kw["state_size"], "head_dim": kw["head_dim"],
        "chunk_size": kw["chunk_size"]}))
    return directory, reference


@pytest.fixture
def codestral_tokenizer(codestral, tmp_path):
    """The Codestral layout with a sentencepiece tokenizer.model.v3 (BPE, <unk> <s> </s> = 0 1 2,
    as Mistral's), trained on the repository's Shakespeare excerpt."""
    import sentencepiece

    directory = tmp_path / "codestral"
    shutil.copytree(codestral[0], directory)
    sentencepiece.SentencePieceTrainer.train(
        input=str(SHAKESPEARE), model_prefix=str(directory / "sp"),
        vocab_size=VOCAB, model_type="bpe", input_sentence_size=20000, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (directory / "sp.model").rename(directory / "tokenizer.model.v3")
    (directory / "sp.vocab").unlink()
    return directory


# Every flavour through the real entry point, in a subprocess.
@pytest.mark.parametrize("flavour", sorted(FLAVOURS) + ["codestral"])
def test_every_flavour_converts_to_transformers_logits(flavour, checkpoint, codestral,
                                                      tokenizer_dir, tmp_path):
    source, reference = codestral if flavour == "codestral" else checkpoint(flavour)
    out = tmp_path / "out"
    args = ["--hf-path", source, "--mlx-path", out]
    if FLAVOURS.get(flavour, ("", "", ""))[2] == "original":
        args += ["--tokenizer", tokenizer_dir]  # the hub fetch is tested below, monkeypatched
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr

    error = relative_error(our_logits(out), reference_logits(reference))
    print(f"{flavour}: relative logit error {error:.2e}")
    assert error < TOLERANCE
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == reference.config.model_type
    assert "quantization" not in config
    # Names are the transformers checkpoint's, the conv kernel in MLX's (C, K, 1) layout.
    written = mx.load(str(out / "model.safetensors"))
    original = FLAVOURS.get(flavour, ("", "", ""))[2] == "original"
    names = reference.state_dict() if original or flavour == "codestral" else read_weights(source)
    expected = {n for n in names if not n.startswith("lm_head.")
                or not config["tie_word_embeddings"]}
    assert set(written) == expected
    convs = [v for n, v in written.items() if n.endswith("conv1d.weight")]
    assert convs and all(conv.shape[1:] == (4, 1) for conv in convs)
    assert leftovers(tmp_path) == []


def test_original_checkpoint_gets_the_gpt_neox_tokenizer(checkpoint, tokenizer_dir, tmp_path,
                                                         monkeypatch, tokenizer_file):
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tokenizer_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source, _ = checkpoint("mamba2_original")
    convert(source, tmp_path / "out")
    assert calls == [(convert_module.STATE_SPACES_TOKENIZER, calls[0][1])]
    assert not any(p.endswith((".bin", ".safetensors")) for p in calls[0][1])
    _, tokenizer = mlx_mamba.load(tmp_path / "out")
    from tokenizers import Tokenizer

    text = "To be, or not to be: that is the question."
    expected = Tokenizer.from_file(str(tokenizer_file)).encode(text)
    assert tokenizer.encode(text) == expected.ids


def test_codestral_tokenizer_becomes_a_transformers_tokenizer(codestral_tokenizer, tmp_path):
    import sentencepiece

    source = codestral_tokenizer
    convert(source, tmp_path / "out")
    _, tokenizer = mlx_mamba.load(tmp_path / "out")
    text = "My lord, the king is coming."
    expected = sentencepiece.SentencePieceProcessor(
        model_file=str(source / "tokenizer.model.v3")).encode(text)
    assert tokenizer.encode(text) == [1] + expected  # Mistral prepends <s> (id 1)
    assert (tmp_path / "out" / "tokenizer.model.v3").is_file()


def test_tokenizer_option_overrides_the_source(checkpoint, tokenizer_dir, tmp_path):
    source, _ = checkpoint("mamba1")
    convert(source, tmp_path / "out", tokenizer=tokenizer_dir)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (tokenizer_dir / "tokenizer.json").read_bytes()


def test_tokenizer_option_takes_a_tokenizer_json_file(checkpoint, tokenizer_file, tmp_path):
    source, _ = checkpoint("mamba1_original")
    convert(source, tmp_path / "out", tokenizer=tokenizer_file)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    _, tokenizer = mlx_mamba.load(tmp_path / "out")
    assert tokenizer.eos_token_id == 0  # a bare tokenizer.json names none: the config's


@pytest.mark.parametrize("name, message", [("missing.json", "no such tokenizer file"),
                                           ("junk.json", "not a readable tokenizer"),
                                           ("empty", "holds no tokenizer")])
def test_bad_tokenizer_option_fails_before_any_output(name, message, checkpoint, tmp_path,
                                                      capsys):
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    err = fails_cleanly(["--hf-path", checkpoint("mamba1_original")[0], "--mlx-path",
                         tmp_path / "out", "--tokenizer", tmp_path / name], capsys)
    assert f"{tmp_path / name}: {message}" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_original_checkpoint_offline_says_how_to_pass_a_tokenizer(checkpoint, tmp_path, capsys):
    # The tests' hub is offline (conftest.py), as a user's may be.
    source, _ = checkpoint("mamba1_original")
    err = fails_cleanly(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert f"{source}: a state-spaces checkpoint ships no tokenizer" in err
    assert convert_module.STATE_SPACES_TOKENIZER in err and "--tokenizer" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_hub_source_fetches_config_tokenizer_and_one_weight_format(checkpoint, tmp_path,
                                                                   monkeypatch):
    # A repo holding both safetensors and a .bin: only the safetensors may be downloaded.
    source, reference = checkpoint("mamba1")
    repo = tmp_path / "repo"
    shutil.copytree(source, repo)
    shutil.copyfile(checkpoint("mamba1_original")[0] / "pytorch_model.bin",
                    repo / "pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(repo, tmp_path / "fetched"))
    convert("someone/mamba-tiny", tmp_path / "out")
    assert not (tmp_path / "fetched" / "pytorch_model.bin").exists()
    assert (tmp_path / "fetched" / "model.safetensors").exists()
    assert relative_error(our_logits(tmp_path / "out"), reference_logits(reference)) < TOLERANCE


def test_hub_source_with_only_a_bin(checkpoint, tokenizer_dir, tmp_path, monkeypatch):
    source, reference = checkpoint("mamba1_original")
    fetched = tmp_path / "fetched"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(source, fetched))
    convert("state-spaces/mamba-tiny", tmp_path / "out", tokenizer=tokenizer_dir)
    assert (fetched / "pytorch_model.bin").exists()
    assert relative_error(our_logits(tmp_path / "out"), reference_logits(reference)) < TOLERANCE


def fake_hub(repo, cache):
    """snapshot_download serving the files of `repo` that match allow_patterns into `cache`."""
    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        cache.mkdir(exist_ok=True)
        for file in repo.iterdir():
            if any(Path(file.name).match(p) for p in allow_patterns):
                shutil.copyfile(file, cache / file.name)
        return str(cache)

    return snapshot_download


def test_upload_repo(checkpoint, tmp_path, monkeypatch):
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: uploads.append(repo))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda folder_path, repo_id, **kw: uploads.append((folder_path, repo_id)))
    source, _ = checkpoint("mamba2")
    main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "-q",
          "--q-group-size", "32", "--upload-repo", "me/mamba2-4bit"])
    assert uploads == ["me/mamba2-4bit", (str(tmp_path / "out"), "me/mamba2-4bit")]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: mlx" in card and "me/mamba2-4bit" in card


def test_shards_above_the_threshold(checkpoint, tmp_path):
    source, reference = checkpoint("mamba2_groups_untied")
    convert(source, tmp_path / "out", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("model*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    stored = {name: shard for shard in shards for name in mx.load(str(tmp_path / "out" / shard))}
    assert index["weight_map"] == dict(sorted(stored.items()))
    assert relative_error(our_logits(tmp_path / "out"), reference_logits(reference)) < TOLERANCE


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_dtype_keeps_the_sensitive_parameters_in_float32(checkpoint, tmp_path, dtype, tolerance):
    source, reference = checkpoint("mamba2_groups_untied")
    convert(source, tmp_path / "out", dtype=dtype)
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    for name, value in stored.items():
        kept = name.endswith(("A_log", ".D", "dt_bias", "norm.weight", "norm_f.weight"))
        assert value.dtype == (mx.float32 if kept else getattr(mx, dtype)), name
    error = relative_error(our_logits(tmp_path / "out"), reference_logits(reference))
    print(f"{dtype}: relative logit error {error:.2e}")
    assert error < tolerance


# Quantization. A Mamba1 whose every projection fits a group of 64 (dt_rank 64), so that the
# sizes below are exact.
QUANT_FLAVOUR = ("MambaForCausalLM", dict(hidden_size=64, num_hidden_layers=2, state_size=16,
                                          expand=2, conv_kernel=4, time_step_rank=64,
                                          vocab_size=VOCAB * 4), "hf")
QUANTIZED = ("in_proj", "x_proj", "dt_proj", "out_proj", "embeddings")


@pytest.fixture(scope="module")
def quant_checkpoint(tmp_path_factory):
    """(checkpoint, its float32 conversion, transformers model)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(FLAVOURS, "mamba1_quant", QUANT_FLAVOUR)
        directory = tmp_path_factory.mktemp("mamba1_quant")
        reference = write_checkpoint("mamba1_quant", directory / "source")
    return directory / "source", convert(directory / "source", directory / "float"), reference


def expected_bytes(float_weights, group_size, bits, scale_bytes, with_biases):
    """Bytes of the quantized tensors, from the float ones: packed weights plus one scale (and,
    for affine, one bias) per group."""
    total = 0
    for name, value in float_weights.items():
        if name.endswith(".weight") and name.split(".")[-2] in QUANTIZED:
            groups = value.size // group_size
            total += value.size * bits // 8 + groups * scale_bytes * (2 if with_biases else 1)
        else:
            total += value.nbytes
    return total


def data_bytes(file):
    """The size of a safetensors file less its header: what its tensors take."""
    with open(file, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return file.stat().st_size - 8 - header


def dequantized_reference(reference, stored, quantization):
    """A copy of the transformers model holding our quantized weights, dequantized."""
    model = copy.deepcopy(reference)
    dequantized = {}
    for name in stored:
        if name.endswith(".scales"):
            layer = name[: -len(".scales")]
            weight = mx.dequantize(stored[f"{layer}.weight"], stored[name],
                                   stored.get(f"{layer}.biases"), quantization["group_size"],
                                   quantization["bits"], quantization["mode"])
            dequantized[f"{layer}.weight"] = torch.from_numpy(np.array(weight.astype(mx.float32)))
    missing, unexpected = model.load_state_dict(dequantized, strict=False)
    assert not unexpected
    return model


# (mode, bits, group, bound on the relative logit error against the float model: about 3x what
# this random model shows; a wrong quantization gives errors of order 1)
QUANT_CASES = [("affine", 8, 64, 5e-2), ("affine", 4, 64, 0.5), ("mxfp4", 4, 32, 0.8),
               ("nvfp4", 4, 16, 0.8), ("mxfp8", 8, 32, 0.3)]


@pytest.mark.parametrize("mode, bits, group_size, bound", QUANT_CASES)
def test_quantized_output(quant_checkpoint, tmp_path, mode, bits, group_size, bound):
    source, float_out, reference = quant_checkpoint
    out = tmp_path / "quantized"
    convert(source, out, quantize=True, q_bits=bits, q_group_size=group_size, q_mode=mode)

    config = json.loads((out / "config.json").read_text())
    quantization = {"group_size": group_size, "bits": bits, "mode": mode}
    assert config["quantization"] == quantization
    stored = mx.load(str(out / "model.safetensors"))
    quantized = {n.rsplit(".", 2)[-2] for n in stored if n.endswith(".scales")}
    assert quantized == set(QUANTIZED)
    float_weights = mx.load(str(float_out / "model.safetensors"))
    affine = mode == "affine"
    expected = expected_bytes(float_weights, group_size, bits, 4 if affine else 1, affine)
    assert data_bytes(out / "model.safetensors") == expected
    ratio = expected / data_bytes(float_out / "model.safetensors")

    # Loaded back, the quantized model computes exactly what the float model computes with the
    # dequantized weights; against the original weights it carries the quantization error.
    logits = our_logits(out)
    exact = relative_error(logits, reference_logits(dequantized_reference(reference, stored,
                                                                          quantization)))
    error = relative_error(logits, reference_logits(reference))
    print(f"{mode} {bits}-bit group {group_size}: relative logit error {error:.2e} "
          f"({exact:.1e} against the dequantized weights), weights {ratio:.3f} of float32")
    assert exact < TOLERANCE
    assert error < bound


def test_layer_not_fitting_the_group_stays_in_full_precision(checkpoint, tmp_path, capsys):
    source, reference = checkpoint("mamba1_untied")  # dt_rank 4: dt_proj cannot be grouped by 32
    convert(source, tmp_path / "out", quantize=True, q_group_size=32)
    assert "backbone.layers.*.mixer.dt_proj (2 layers) stays in full precision: its input " \
           "size 4 is not a multiple of the group size 32" in capsys.readouterr().out
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert "backbone.layers.0.mixer.dt_proj.scales" not in stored
    assert "backbone.layers.0.mixer.in_proj.scales" in stored and "lm_head.scales" in stored
    assert relative_error(our_logits(tmp_path / "out"), reference_logits(reference)) < 0.2
    model, _ = mlx_mamba.load(tmp_path / "out")
    assert model.make_cache()[0].conv.dtype == mx.float32  # the model's dtype, not the packing's


@pytest.mark.parametrize("flavour", ["mamba1_untied", "mamba2"])
def test_mlx_lm_loads_our_output(checkpoint, tmp_path, flavour):
    from mlx_lm.utils import load_model

    source, reference = checkpoint(flavour)
    convert(source, tmp_path / "out", quantize=True, q_group_size=32)
    model, _ = load_model(tmp_path / "out")
    ours = our_logits(tmp_path / "out")
    assert relative_error(np.array(model(mx.array(IDS))), ours) < 1e-5


# Bad input: one line naming the culprit, exit 1, nothing written, no partial directory.
def copy_of(checkpoint, flavour, tmp_path):
    directory = tmp_path / "source"
    shutil.copytree(checkpoint(flavour)[0], directory)
    return directory


def truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def no_config(c, t):
    d = copy_of(c, "mamba2", t)
    (d / "config.json").unlink()
    return d, "source: no config.json or params.json"


def truncated_safetensors(c, t):
    d = copy_of(c, "mamba2", t)
    truncate(d / "model.safetensors")
    return d, "model.safetensors: not a readable safetensors file"


def corrupt_bin(c, t):
    d = copy_of(c, "mamba1_original", t)
    (d / "pytorch_model.bin").write_bytes(os.urandom(4096))
    return d, "pytorch_model.bin: not a zip archive"


def truncated_bin(c, t):
    d = copy_of(c, "mamba1_original", t)
    truncate(d / "pytorch_model.bin", 0.7)
    return d, "pytorch_model.bin: not a zip archive"


def missing_shard(c, t):
    d = copy_of(c, "mamba1_sharded", t)
    (d / "model-00002-of-00005.safetensors").unlink()
    return d, "model-00002-of-00005.safetensors: shard listed in model.safetensors.index.json"


def wrong_shape(c, t):
    d = copy_of(c, "mamba2", t)
    edit_config(d, state_size=16)
    return d, "source: tensor 'backbone.layers.0.mixer.in_proj.weight' has shape (148, 32), the " \
              "config implies (164, 32)"


def unknown_architecture(c, t):
    d = copy_of(c, "mamba2", t)
    edit_config(d, model_type="llama")
    return d, "field 'model_type' is 'llama'"


def bad_config_field(c, t):
    d = copy_of(c, "mamba1_original", t)
    edit_config(d, ssm_cfg={"layer": "Mamba4"})
    return d, "field 'ssm_cfg.layer' is 'Mamba4'"


def missing_directory(c, t):
    return t / "nowhere", "nowhere: no such directory"


BAD_SOURCES = [missing_directory, no_config, truncated_safetensors, corrupt_bin, truncated_bin,
               missing_shard, wrong_shape, unknown_architecture, bad_config_field]


def fails_cleanly(argv, capsys, code=1):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == code
    err = capsys.readouterr().err  # progress bars may come first, on lines of their own
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and err.count("error") == 1 and "Traceback" not in err
    return last


@pytest.mark.parametrize("make", BAD_SOURCES, ids=lambda f: f.__name__)
def test_bad_source_fails_with_one_line(make, checkpoint, tmp_path, capsys):
    source, message = make(checkpoint, tmp_path)
    err = fails_cleanly(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert message in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_malicious_pickle_is_refused_and_not_run(tmp_path, capsys, checkpoint):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    source = copy_of(checkpoint, "mamba1_original", tmp_path)
    with zipfile.ZipFile(source / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": Payload()}, protocol=2))
    err = fails_cleanly(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert "pytorch_model.bin: refusing to load" in err and "system" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_existing_output_is_never_touched(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = fails_cleanly(["--hf-path", checkpoint("mamba2")[0], "--mlx-path", out], capsys)
    assert f"{out}: already exists" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep me" and leftovers(tmp_path) == []


def test_interrupted_run_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", interrupt)
    out = tmp_path / "new" / "parents" / "out"
    err = fails_cleanly(["--hf-path", checkpoint("mamba2")[0], "--mlx-path", out], capsys,
                        code=130)
    assert "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # the parents made for it are gone too


@pytest.mark.parametrize("flags, message", [
    (["-q", "--q-mode", "mxfp4", "--q-group-size", "64"],
     "--q-group-size 64: --q-mode mxfp4 takes 32"),
    (["-q", "--q-bits", "8", "--q-mode", "nvfp4"], "--q-bits 8: --q-mode nvfp4 takes 4"),
    (["-q", "--q-group-size", "16"], "--q-group-size 16: --q-mode affine takes 32|64|128"),
    (["-q", "--q-group-size", "48"], "--q-group-size 48: --q-mode affine takes 32|64|128"),
    (["-q", "--q-bits", "7"], "--q-bits 7: --q-mode affine takes 2|3|4|5|6|8"),
    (["-q", "--q-mode", "mxfp8", "--q-bits", "4"], "--q-bits 4: --q-mode mxfp8 takes 8"),
])
def test_bad_quantization_flags(flags, message, checkpoint, tmp_path, capsys):
    err = fails_cleanly(["--hf-path", checkpoint("mamba2")[0], "--mlx-path", tmp_path / "out",
                         *flags], capsys)
    assert message in err and not (tmp_path / "out").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("--hf-path", tmp_path / "missing", "--mlx-path", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'missing'}: no such directory (and not a repo " \
                            "id 'org/name')\n"


def test_codestral_tokenizer_without_protobuf_fails_before_any_work(codestral_tokenizer, tmp_path,
                                                                    capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "google.protobuf" else find_spec(name, *a))
    err = fails_cleanly(["--hf-path", codestral_tokenizer, "--mlx-path", tmp_path / "out"], capsys)
    assert "tokenizer.model.v3: converting it needs protobuf" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
