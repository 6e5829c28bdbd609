"""Hostile inputs: `.bin` checkpoints whose pickle lies about its tensors, and token ids outside
the vocabulary. The archives are built by hand, opcode by opcode, the way torch.save lays them
out (archive/data.pkl, archive/data/KEY), so that each test tells exactly one lie."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from mlx_mamba import lora
from mlx_mamba.checkpoint import CheckpointError, load_torch_bin
from mlx_mamba.generate import (GenerationError, batch_generate, generate, main as generate_main,
                                stream_generate)
from mlx_mamba.prompt_cache import (PromptCache, PromptCacheError, load_prompt_cache,
                                    make_prompt_cache, save_prompt_cache)
from mlx_mamba.token_ids import TokenIdError, check_token_ids
from mlx_mamba.tuner.datasets import DataError, load_split

ROOT = Path(__file__).resolve().parents[1]


def _value(x):
    """The opcodes that push `x` (an int, bool, float, str, tuple, list or None)."""
    return pickle.dumps(x, protocol=2)[2:-1]  # without PROTO and STOP


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def storage(key="0", count=12, storage_type="FloatStorage", location="cpu"):
    """A persistent id as torch.save writes it: ("storage", type, key, location, elements)."""
    return (pickle.MARK + _value("storage") + _global("torch", storage_type) + _value(key)
            + _value(location) + _value(count) + pickle.TUPLE + pickle.BINPERSID)


def tensor(offset=0, size=(3, 4), stride=(4, 1), pid=None):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    return (_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
            + (storage() if pid is None else pid) + _value(offset) + _value(size)
            + _value(stride) + pickle.NEWFALSE + _global("collections", "OrderedDict")
            + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)


def state_dict(**items):
    """An OrderedDict of name -> the opcodes of its value."""
    body = b"".join(_value(name) + value for name, value in items.items())
    return (pickle.PROTO + b"\x02" + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
            + pickle.REDUCE + pickle.MARK + body + pickle.SETITEMS + pickle.STOP)


ELEVEN = np.arange(12, dtype=np.float32)  # the default storage "0": 12 float32


def write_bin(path, pickled, storages=None, compression=zipfile.ZIP_STORED):
    """A torch zip checkpoint: the pickle and its storages ({key: bytes})."""
    storages = {"0": ELEVEN.tobytes()} if storages is None else storages
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


def test_hand_built_archive_is_what_torch_reads(tmp_path):
    """The builder itself: torch loads its output, and so do we, to the same values."""
    torch = pytest.importorskip("torch")
    file = write_bin(tmp_path / "ok.bin", state_dict(w=tensor(0, (2, 4), (4, 1)),
                                                  t=tensor(8, (2, 2), (1, 2))))
    theirs = torch.load(file, weights_only=True)
    ours = load_torch_bin(file)
    assert list(ours) == ["w", "t"]
    for name in ours:
        assert np.array_equal(np.array(ours[name]), theirs[name].numpy()), name


def _lie(name, pickled, message, storages=None, tensor_named=True):
    return pytest.param(pickled, storages, message, tensor_named, id=name)


# One lie each; the storage "0" really holds 12 float32 unless said otherwise.
LIES = [
    _lie("size_beyond_storage", state_dict(w=tensor(0, (4, 4), (4, 1))),
         "reach element 15 of a storage of 12"),
    _lie("offset_beyond_storage", state_dict(w=tensor(1000, (8,), (1,))),
         "reach element 1007 of a storage of 12"),
    _lie("offset_at_the_end", state_dict(w=tensor(12, (1,), (1,))),
         "reach element 12 of a storage of 12"),
    _lie("stride_beyond_storage", state_dict(w=tensor(0, (3, 4), (5, 1))),
         "reach element 13 of a storage of 12"),
    # (5 - 1) * 2**62 is 0 in int64 arithmetic: a check in C types would pass it.
    _lie("stride_wrapping_int64", state_dict(w=tensor(0, (5,), (2**62,))),
         f"reach element {4 * 2**62} of a storage of 12"),
    _lie("negative_size", state_dict(w=tensor(0, (-1, 4), (4, 1))), "are not all integers >= 0"),
    _lie("negative_stride", state_dict(w=tensor(11, (3,), (-1,))), "are not all integers >= 0"),
    _lie("negative_offset", state_dict(w=tensor(-4, (4,), (1,))), "are not all integers >= 0"),
    _lie("offset_2_63", state_dict(w=tensor(2**63, (1,), (1,))), "are not all integers >= 0"),
    _lie("stride_2_63", state_dict(w=tensor(0, (1, 2), (2**63, 1))), "are not all integers >= 0"),
    _lie("size_2_31", state_dict(w=tensor(0, (2**31,), (0,))), "(sizes below 2**31"),
    _lie("float_offset", state_dict(w=tensor(0.0, (12,), (1,))), "are not all integers >= 0"),
    _lie("bool_size", state_dict(w=tensor(0, (True, 12), (12, 1))), "are not all integers >= 0"),
    _lie("string_stride", state_dict(w=tensor(0, (12,), ("1",))), "are not all integers >= 0"),
    _lie("none_size", state_dict(w=tensor(0, None, (1,))), "are not tuples"),
    _lie("list_size", state_dict(w=tensor(0, [12], (1,))), "are not tuples"),
    _lie("size_stride_lengths_differ", state_dict(w=tensor(0, (3, 4), (4,))),
         "of the same length"),
    _lie("too_many_dimensions", state_dict(w=tensor(0, (1,) * 33, (1,) * 33)),
         "at most 32"),
    _lie("bytes_not_a_multiple_of_itemsize", state_dict(w=tensor()),
         "storage 'archive/data/0' holds 46 bytes; the pickle declares 12 FloatStorage "
         "elements (48 bytes)", storages={"0": ELEVEN.tobytes()[:46]}),
    _lie("element_count_beyond_bytes", state_dict(w=tensor(pid=storage(count=1000))),
         "holds 48 bytes; the pickle declares 1000 FloatStorage elements (4000 bytes)"),
    _lie("element_count_below_bytes", state_dict(w=tensor(0, (2,), (1,), storage(count=2))),
         "holds 48 bytes; the pickle declares 2 FloatStorage elements (8 bytes)"),
    _lie("bfloat16_bytes_odd", state_dict(w=tensor(0, (2,), (1,), storage(
        count=2, storage_type="BFloat16Storage"))), "holds 5 bytes",
         storages={"0": b"\0" * 5}),
    _lie("missing_storage_file", state_dict(w=tensor(pid=storage(key="7"))),
         "its storage 'archive/data/7' is missing from the archive"),
    _lie("storage_key_not_a_string", state_dict(w=tensor(pid=storage(key=0))),
         "not a torch storage reference"),
    _lie("negative_element_count", state_dict(w=tensor(pid=storage(count=-12))),
         "not a torch storage reference"),
    _lie("pid_not_a_storage", state_dict(w=tensor(pid=pickle.MARK + _value("module")
                                                  + _value("0") + pickle.TUPLE
                                                  + pickle.BINPERSID)),
         "not a torch storage reference"),
    _lie("storage_not_a_persistent_id", state_dict(w=tensor(pid=_value(("storage", "0")))),
         "not a torch storage reference"),
    _lie("storage_declared_twice", state_dict(
        w=tensor(0, (4,), (1,)),
        v=tensor(4, (4,), (1,), storage(count=12, storage_type="IntStorage"))),
         "storage '0' is declared as 12 IntStorage elements here, 12 FloatStorage before",
         tensor_named="v"),
    _lie("unknown_storage_type", state_dict(w=tensor(pid=storage(storage_type="UntypedStorage"))),
         "refusing to load 'torch.UntypedStorage'", tensor_named=False),
    _lie("not_a_tensor", state_dict(w=_value(3)), "not a tensor (int)"),
    _lie("a_bare_storage", state_dict(w=storage()), "not a tensor (_Storage)"),
    _lie("tensor_name_not_a_string", state_dict().replace(
        pickle.MARK + pickle.SETITEMS, pickle.MARK + _value(5) + tensor() + pickle.SETITEMS),
         "a tensor name is 5, not a string", tensor_named=False),
    _lie("overlapping_views", state_dict(w=tensor(0, (12,), (1,)), v=tensor(1, (11,), (1,))),
         "the tensors read so far view 92 bytes of storages that hold 48", tensor_named="v"),
    # 4 GiB from one float: refused before anything is allocated.
    _lie("broadcast_view", state_dict(w=tensor(0, (2**30,), (0,))),
         "view 4294967296 bytes of storages that hold 48"),
    _lie("pickle_sets_attributes_on_a_storage_type",
         (pickle.PROTO + b"\x02" + _global("torch", "FloatStorage") + _value({"dtype": "O"})
          + pickle.BUILD + pickle.STOP), "data.pkl does not unpickle", tensor_named=False),
    _lie("rebuild_with_missing_arguments",
         (pickle.PROTO + b"\x02" + _global("torch._utils", "_rebuild_tensor_v2")
          + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP),
         "data.pkl does not unpickle (TypeError", tensor_named=False),
]


@pytest.mark.parametrize("pickled, storages, message, tensor_named", LIES)
def test_lying_header_is_refused(pickled, storages, message, tensor_named, tmp_path):
    file = write_bin(tmp_path / "pytorch_model.bin", pickled, storages)
    with pytest.raises(CheckpointError) as refused:
        load_torch_bin(file)
    text = str(refused.value)
    name = tensor_named if isinstance(tensor_named, str) else "w"
    where = f"{file}: tensor {name!r}: " if tensor_named else f"{file}: "
    assert text.startswith(where), text
    assert message in text
    assert "\n" not in text


def _declare_size(file, entry, size):
    """Patch the uncompressed size that the central directory declares for `entry`."""
    data = bytearray(file.read_bytes())
    header = data.rindex(entry.encode()) - 46  # the central directory comes last
    assert data[header:header + 4] == b"PK\x01\x02"
    data[header + 24:header + 28] = size.to_bytes(4, "little")
    file.write_bytes(bytes(data))


def test_entry_larger_than_the_file_is_refused_before_reading(tmp_path):
    count = 1 << 20  # 4 MiB declared for a file of 1 KiB
    file = write_bin(tmp_path / "x.bin", state_dict(w=tensor(0, (count,), (1,),
                                                             storage(count=count))))
    _declare_size(file, "archive/data/0", 4 * count)
    with pytest.raises(CheckpointError, match=r"x.bin: archive/data/0 claims 4194304 bytes, "
                                              r"more than the whole file \(\d+\)"):
        load_torch_bin(file)


def test_compressed_entries_are_refused(tmp_path):
    """A compressed entry could expand far beyond the file (a zip bomb); torch never writes one."""
    file = write_bin(tmp_path / "x.bin", state_dict(w=tensor()), compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"x.bin: archive/\S+ is compressed"):
        load_torch_bin(file)


def test_damaged_storage_bytes_fail_the_crc(tmp_path):
    file = write_bin(tmp_path / "x.bin", state_dict(w=tensor()))
    file.write_bytes(file.read_bytes().replace(ELEVEN.tobytes(), ELEVEN[::-1].tobytes()))
    with pytest.raises(CheckpointError, match="x.bin: archive/data/0 is damaged .*CRC"):
        load_torch_bin(file)


def test_big_endian_checkpoint_is_refused(tmp_path):
    file = tmp_path / "x.bin"
    with zipfile.ZipFile(file, "w") as archive:
        archive.writestr("archive/data.pkl", state_dict(w=tensor()))
        archive.writestr("archive/byteorder", "big")
        archive.writestr("archive/data/0", ELEVEN.byteswap().tobytes())
    with pytest.raises(CheckpointError, match="x.bin: saved on a big-endian machine"):
        load_torch_bin(file)


def test_tied_tensors_share_one_read(tmp_path):
    """Identical views (a tied embedding and head) are not overlap: read once, both returned."""
    file = write_bin(tmp_path / "x.bin", state_dict(embedding=tensor(), head=tensor(),
                                                    empty=tensor(5, (0, 2**30), (2**62, 1))))
    loaded = load_torch_bin(file)
    assert loaded["embedding"] is loaded["head"]
    assert np.array_equal(np.array(loaded["head"]), ELEVEN.reshape(3, 4))
    assert loaded["empty"].shape == (0, 2**30)


def _original_with_bin(checkpoint, directory, pickled):
    """An original state-spaces directory (config.json) whose pytorch_model.bin is `pickled`."""
    directory.mkdir()
    source = checkpoint("mamba1_original")[0]
    (directory / "config.json").write_bytes((source / "config.json").read_bytes())
    write_bin(directory / "pytorch_model.bin", state_dict(**{
        "backbone.embedding.weight": pickled}))
    return directory


@pytest.mark.parametrize("command", [
    [str(ROOT / "convert.py"), "--hf-path", "{source}", "--mlx-path", "{out}",
     "--tokenizer", "{tokenizer}"],
    ["-m", "mlx_mamba.generate", "--model", "{source}", "--prompt", "hi",
     "--tokenizer", "{tokenizer}"],
], ids=["convert", "generate"])
def test_command_lines_refuse_with_one_error_line(command, checkpoint, tokenizer_file, tmp_path):
    source = _original_with_bin(checkpoint, tmp_path / "hostile", tensor(1000, (8,), (1,)))
    out = tmp_path / "out"
    args = [a.format(source=source, out=out, tokenizer=tokenizer_file) for a in command]
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"error: {source / 'pytorch_model.bin'}: tensor 'backbone.embedding.weight': size (8,), "
        "stride (1,) and offset 1000 reach element 1007 of a storage of 12"]
    assert run.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


# ---- token ids -------------------------------------------------------------------------------

VOCAB = 100  # the tiny checkpoints'


def outside(token, position):
    return f"token id {token} is outside the model's vocabulary (0..99) at position {position}"


@pytest.mark.parametrize("ids", [
    [3, 0, 99], (3, 0, 99), [np.int64(3), np.uint8(0), 99], np.array([3, 0, 99], np.int32),
    mx.array([3, 0, 99], dtype=mx.uint16), mx.array([3, 0, 99]), np.array([3, 0, 99])[::1],
], ids=["list", "tuple", "numpy_scalars", "numpy", "mlx_uint16", "mlx_int32", "numpy_view"])
def test_token_ids_in_every_accepted_form(ids):
    checked = check_token_ids(ids, VOCAB)
    assert checked == [3, 0, 99] and all(type(t) is int for t in checked)


@pytest.mark.parametrize("ids, message", [
    ([1, 100], outside(100, 1)),
    ([-1], outside(-1, 0)),
    ([2**63], outside(2**63, 0)),
    (np.array([5, -3]), outside(-3, 1)),
    (mx.array([5, 2**31 - 1]), outside(2**31 - 1, 1)),
    ([1, True], "the token at position 1 is a bool, not an integer id"),
    ([np.bool_(True)], "the token at position 0 is a bool, not an integer id"),
    ([1.0], "the token at position 0 is a float, not an integer id"),
    ([np.float32(1)], "the token at position 0 is a float32"),
    (["1"], "the token at position 0 is a str"),
    ([[1, 2]], "the token at position 0 is a list"),
    ([None], "the token at position 0 is a NoneType"),
    (np.array([[1, 2]]), "must be a 1-D integer array, not a int64 array of shape (1, 2)"),
    (np.array([1.0]), "not a float64 array"),
    (mx.array([True]), "not a mlx.core.bool array"),
    (mx.array([1.5]), "not a mlx.core.float32 array"),
    (7, "must be a list of ints or a 1-D integer array, not a int"),
    (iter([1]), "not a list_iterator"),
    (None, "not a NoneType"),
])
def test_bad_token_ids_are_refused(ids, message):
    with pytest.raises(TokenIdError) as refused:
        check_token_ids(ids, VOCAB)
    assert message in str(refused.value)


class CharTokenizer:
    """Characters as ids (ord - 32): "é" is 201, beyond the tiny vocabulary."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - 32 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return mlx_mamba.load(checkpoint("mamba2")[0])[0]


def _bad_cache(model):
    good = make_prompt_cache(model, [1, 2])
    return PromptCache(good.layers, [1, 10**6])


# Every library entry point that takes token ids: (call, error type, message).
ENTRY_POINTS = {
    "generate": (lambda m: generate(m, CharTokenizer(), [1, 100]), GenerationError,
                 "the prompt: " + outside(100, 1)),
    "generate_text": (lambda m: generate(m, CharTokenizer(), "café"), GenerationError,
                      "the prompt: " + outside(201, 3) + ": is this the model's tokenizer?"),
    "generate_bool": (lambda m: generate(m, CharTokenizer(), [True]), GenerationError,
                      "the prompt: the token at position 0 is a bool"),
    "generate_batch_as_one": (lambda m: generate(m, CharTokenizer(), mx.array([[1, 2]])),
                              GenerationError, "must be a 1-D integer array"),
    "stream_generate": (lambda m: next(stream_generate(m, CharTokenizer(), np.array([5, -1]))),
                        GenerationError, "the prompt: " + outside(-1, 1)),
    "stream_generate_cache": (
        lambda m: next(stream_generate(m, CharTokenizer(), [3], prompt_cache=_bad_cache(m))),
        TokenIdError, outside(1000000, 1)),
    "batch_generate": (lambda m: batch_generate(m, CharTokenizer(), [[1], [2, 2**40]]),
                       GenerationError, "prompt 1: " + outside(2**40, 1)),
    "make_prompt_cache": (lambda m: make_prompt_cache(m, [1, 2.0]), TokenIdError,
                          "the token at position 1 is a float"),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_checks_token_ids(name, tiny):
    call, error, message = ENTRY_POINTS[name]
    with pytest.raises(error) as refused:
        call(tiny)
    assert message in str(refused.value)


def _rewrite_tokens(file, tokens):
    """The prompt cache `file` with its `tokens` array replaced (metadata kept)."""
    arrays, metadata = mx.load(str(file), return_metadata=True)
    arrays["tokens"] = tokens
    metadata["token_count"] = str(tokens.size)
    mx.save_safetensors(str(file), arrays, metadata=metadata)
    return file


@pytest.mark.parametrize("tokens, message", [
    (mx.array([1, 2, 100], dtype=mx.int32), outside(100, 2)),
    (mx.array([1, -2, 3], dtype=mx.int32), outside(-2, 1)),
    (mx.array([1.0, 2.0, 3.0]), "not a mlx.core.float32 array"),
    (mx.array([[1, 2, 3]]), "of shape (1, 3)"),
])
def test_hostile_prompt_cache_tokens_are_refused(tokens, message, tiny, tmp_path):
    file = tmp_path / "cache.safetensors"
    save_prompt_cache(file, make_prompt_cache(tiny, [1, 2, 3]), tiny)
    _rewrite_tokens(file, tokens)
    with pytest.raises(PromptCacheError) as refused:
        load_prompt_cache(file, tiny)
    assert str(refused.value).startswith(f"{file}: damaged prompt cache (")
    assert message in str(refused.value)


@pytest.mark.parametrize("encode, line, message", [
    (lambda text: [ord(c) - 32 for c in text], 2, outside(201, 3)),
    (lambda text: [ord(c) - 110 for c in text], 1, outside(-8, 0)),
    (lambda text: [float(ord(c) - 32) for c in text], 1, "position 0 is a float"),
], ids=["beyond", "negative", "float"])
def test_training_data_token_ids_are_checked(encode, line, message, tmp_path):
    tokenizer = CharTokenizer()
    tokenizer.encode = lambda text, add_special_tokens=True: encode(text)
    (tmp_path / "train.jsonl").write_text('{"text": "fine"}\n{"text": "café"}\n')
    with pytest.raises(DataError) as refused:
        load_split(tmp_path, "train", tokenizer, 64, vocab_size=VOCAB)
    text = str(refused.value)
    assert text.startswith(f"{tmp_path / 'train.jsonl'}:{line}: ") and message in text
    assert text.endswith("is the tokenizer the model's own?")


# ---- command lines: one error line -------------------------------------------------------------

@pytest.fixture(scope="module")
def word_model(checkpoint, tmp_path_factory):
    """The tiny Mamba1 (vocabulary 100) with a word-level tokenizer of 150 words "w0".."w149":
    "w120" encodes to an id that the model does not have."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("words") / "model"
    shutil.copytree(checkpoint("mamba1")[0], directory)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(150)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "w0", "unk_token": "w0"}))
    return directory


def _one_error_line(main, argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_generate_cli_refuses_foreign_ids(word_model, capsys):
    err = _one_error_line(generate_main, ["--model", str(word_model), "--prompt", "w1 w120"],
                          capsys)
    assert "the prompt: " + outside(120, 1) in err


def test_generate_cli_refuses_a_hostile_prompt_cache(word_model, tmp_path, capsys):
    model = mlx_mamba.load(word_model)[0]
    file = tmp_path / "cache.safetensors"
    save_prompt_cache(file, make_prompt_cache(model, [1, 2]), model)
    _rewrite_tokens(file, mx.array([1, 2**30], dtype=mx.int32))
    err = _one_error_line(generate_main, ["--model", str(word_model), "--prompt", "w1",
                                              "--prompt-cache-file", str(file)], capsys)
    assert f"{file}: damaged prompt cache (" + outside(2**30, 1) in err


def test_lora_cli_refuses_foreign_ids_in_the_data(word_model, tmp_path, capsys):
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "w1 w2"}\n{"text": "w3 w120"}\n')
    err = _one_error_line(lora.main, ["--model", str(word_model), "--train", "--data",
                                      str(tmp_path), "--iters", "1",
                                      "--adapter-path", str(tmp_path / "adapters")], capsys)
    assert f"{tmp_path / 'train.jsonl'}:2: " + outside(120, 1) in err
    assert not (tmp_path / "adapters").exists()
