"""`mlx_mamba.load` on real files: originals without running pickled code, the hub path, dtypes,
and errors that name the file or tensor."""

import io
import pickle
import shutil
import zipfile

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from comparing import relative_error
from mlx_mamba.checkpoint import CheckpointError, load_torch_bin
from mlx_mamba.loader import STATE_SPACES_TOKENIZER, TOKENIZER_PATTERNS, DownloadError


class _Exploit:
    def __reduce__(self):
        return (shutil.rmtree, ("/definitely/not/here",))


def test_torch_bin_refuses_code(tmp_path):
    buffer = io.BytesIO()
    pickle.dump({"weight": _Exploit()}, buffer)
    file = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(file, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
    with pytest.raises(CheckpointError, match="refusing to load 'shutil.rmtree'"):
        load_torch_bin(file)


def test_torch_bin_reads_strided_and_half_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.randn(4, 6)
    # Views of separate storages: overlapping views are refused (see test_security.py).
    tensors = {"t": base.t(), "row": torch.randn(4, 6)[2], "half": base.half(),
               "bf16": base.bfloat16()}
    torch.save(tensors, tmp_path / "x.bin")
    loaded = load_torch_bin(tmp_path / "x.bin")
    for name, tensor in tensors.items():
        expected = tensor.float().numpy()
        assert np.array_equal(np.array(loaded[name].astype(mx.float32)), expected), name
    assert loaded["bf16"].dtype == mx.bfloat16 and loaded["half"].dtype == mx.float16


def test_hub_repo_id_goes_through_snapshot_download(checkpoint, monkeypatch):
    directory, _ = checkpoint("mamba2")
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(directory)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    model, tokenizer = mlx_mamba.load("state-spaces/mamba2-tiny")
    assert calls and calls[0][0] == "state-spaces/mamba2-tiny"
    assert "model*.safetensors" in calls[0][1] and "pytorch_model*.bin" not in calls[0][1]
    assert model.config.arch == "mamba2" and tokenizer is None


def test_dtype_keeps_ssm_parameters_float32(checkpoint):
    directory, _ = checkpoint("mamba1")
    model, _ = mlx_mamba.load(directory, dtype=mx.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == mx.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == mx.float32
    reference, _ = mlx_mamba.load(directory)
    ids = mx.array([[1, 2, 3, 4, 5, 6]])
    low, high = model(ids).astype(mx.float32), reference(ids)
    assert relative_error(low, high) < 0.05


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        mlx_mamba.load(tmp_path / "nope")


def test_wrong_shape_names_the_tensor(checkpoint, tmp_path):
    directory, _ = checkpoint("mamba1")
    target = tmp_path / "broken"
    shutil.copytree(directory, target)
    weights = mx.load(str(target / "model.safetensors"))
    weights["backbone.layers.1.mixer.D"] = mx.zeros((3,))
    mx.save_safetensors(str(target / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=r"backbone.layers.1.mixer.D.*\(3,\).*\(64,\)"):
        mlx_mamba.load(target)


# ---- tokenizers: the model's own, or one passed as a directory, a tokenizer.json or a repo id

TEXT = "To be, or not to be: that is the question."


@pytest.fixture
def tokenizer_dir(tokenizer_file, tmp_path):
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    shutil.copyfile(tokenizer_file, directory / "tokenizer.json")
    return directory


def fake_hub(monkeypatch, directory):
    """Every snapshot_download serves `directory`; returns the (repo_id, allow_patterns) asked."""
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(directory)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls


def test_tokenizer_argument_takes_a_file_a_directory_or_a_repo(checkpoint, tokenizer_file,
                                                               tokenizer_dir, monkeypatch):
    from tokenizers import Tokenizer

    directory, _ = checkpoint("mamba2")  # ships no tokenizer
    calls = fake_hub(monkeypatch, tokenizer_dir)
    expected = Tokenizer.from_file(str(tokenizer_file)).encode(TEXT).ids
    for tokenizer in (tokenizer_file, str(tokenizer_file), tokenizer_dir, "someone/tokenizer"):
        model, loaded = mlx_mamba.load(directory, tokenizer=tokenizer)
        assert loaded.encode(TEXT) == expected, tokenizer
        # A bare tokenizer.json names no end-of-sequence token: the config's is taken.
        assert loaded.eos_token_id == model.config.eos_token_id == 2, tokenizer
    assert calls == [("someone/tokenizer", TOKENIZER_PATTERNS)]  # no weights fetched


def test_original_directory_gets_the_gpt_neox_tokenizer_from_the_hub(checkpoint, tokenizer_dir,
                                                                     monkeypatch):
    calls = fake_hub(monkeypatch, tokenizer_dir)
    _, tokenizer = mlx_mamba.load(checkpoint("mamba1_original")[0])
    assert calls == [(STATE_SPACES_TOKENIZER, TOKENIZER_PATTERNS)]
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_original_directory_offline_says_how_to_pass_a_tokenizer(checkpoint):
    # The tests' hub is offline (conftest.py), as a user's may be.
    source, _ = checkpoint("mamba1_original")
    with pytest.raises(DownloadError) as error:
        mlx_mamba.load(source)
    message = str(error.value)
    assert message.startswith(f"{source}: a state-spaces checkpoint ships no tokenizer, and "
                              f"{STATE_SPACES_TOKENIZER}: download from the Hugging Face hub")
    assert "pass one as tokenizer= (Python) or --tokenizer (command line)" in message


@pytest.mark.parametrize("name, error, message", [
    ("missing.json", FileNotFoundError, "no such tokenizer file"),
    ("junk.json", CheckpointError, "not a readable tokenizer"),
    ("junk", CheckpointError, "not a readable tokenizer"),
    ("empty", FileNotFoundError, "holds no tokenizer"),
    ("missing", FileNotFoundError, "no such directory"),
])
def test_bad_tokenizer_argument_names_it(name, error, message, checkpoint, tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(error) as raised:
        mlx_mamba.load(checkpoint("mamba2")[0], tokenizer=tmp_path / name)
    assert str(raised.value).startswith(f"{tmp_path / name}: {message}")
