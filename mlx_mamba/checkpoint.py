"""Reading foreign checkpoints: safetensors (single or sharded) and PyTorch `.bin` zips.

`.bin` files are read by a restricted unpickler that only rebuilds tensors: pickled code is never
executed and torch is not needed. (No maintained library reads torch's zip format without
torch; `torch.load(weights_only=True)` needs torch, which conversion must not require.)
"""

import io
import json
import math
import pickle
import reprlib
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file or tensor."""


# Parameters that stay float32 whatever dtype the rest of the model uses.
FLOAT32_PARAMETERS = ("A_log", "D", "dt_bias", "norm.weight", "norm_f.weight", "router.weight",
                      "score_bias", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")


# Weight files in order of preference: transformers safetensors, Mistral's, then torch's.
WEIGHT_PATTERNS = ("model*.safetensors", "consolidated*.safetensors", "pytorch_model*.bin")


def keeps_float32(name):
    return name.endswith(FLOAT32_PARAMETERS)


def weight_files(path):
    """The weight files of a checkpoint directory, in load order."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path / missing[0]}: shard listed in {index_name} is missing")
            return [path / s for s in shards]
    for pattern in WEIGHT_PATTERNS:
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{path}: no weights (model.safetensors, consolidated.safetensors or "
                          "pytorch_model.bin)")


def read_weights(path):
    """All tensors of a checkpoint directory, under the names the files use."""
    weights = {}
    for file in weight_files(path):
        weights.update(read_file(file))
    return weights


def read_file(file):
    file = Path(file)
    if file.suffix == ".safetensors":
        try:
            return mx.load(str(file))
        except Exception as e:  # MLX raises a bare RuntimeError/ValueError on a damaged file
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return load_torch_bin(file)


# bfloat16 has no numpy dtype: its bits travel as this marked uint16 view until they reach MLX.
_BFloat16Bits = np.dtype([("bfloat16", np.uint16)])

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _BFloat16Bits, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
MAX_DIMS = 32  # numpy 1's limit; no checkpoint comes near it

# Quotes names and sizes taken from a file: a hostile one can make them huge.
_quote = reprlib.Repr()
_quote.maxstring, _quote.maxlong, _quote.maxtuple = 160, 40, 8


# What the pickle builds. Nothing is read from the archive while it runs: `_TorchZip.tensor`
# checks each claim against its storage afterwards, when the tensor's name is known.
# Tuples, so that the pickle's BUILD opcode cannot change them.

class _StorageType(NamedTuple):  # `torch.FloatStorage` and the like
    name: str


class _Storage(NamedTuple):
    pid: object  # torch's persistent id: ("storage", _StorageType, key, location, elements)


class _Tensor(NamedTuple):
    storage: object
    offset: object
    size: object
    stride: object


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class _TensorUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
    }

    def __init__(self, data, file):
        super().__init__(data)
        self.file = file

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise CheckpointError(f"{self.file}: refusing to load "
                              f"{_quote.repr(f'{module}.{name}')}: only tensors are read from "
                              ".bin files")

    def persistent_load(self, pid):
        return _Storage(pid)


def _is_count(value, limit=2**63):
    """A non-negative integer below `limit` (int64, as torch stores them); bools are not."""
    return type(value) is int and 0 <= value < limit


def _is_storage_pid(pid):
    return (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and type(pid[2]) is str
            and type(pid[3]) is str and _is_count(pid[4]))


class _TorchZip:
    """The entries of a torch.save zip, read only once a tensor that needs them is checked.

    Memory stays within about twice the file's size: entries must be stored uncompressed (as
    torch.save writes them) so that none is larger than the file, and the tensors together may
    not hold more bytes than their storages (overlapping views would multiply the data).
    """

    def __init__(self, archive, prefix, file):
        self.archive, self.prefix, self.file = archive, prefix, file
        self.file_size = file.stat().st_size
        self.storages = {}  # key -> (pid, flat array)
        self.tensors = {}  # (key, offset, size, stride) -> mx.array: a tied tensor is read once
        self.storage_bytes = self.tensor_bytes = 0

    def read(self, name):
        info = self.archive.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.file}: {name} is compressed; torch.save stores entries "
                                  "uncompressed, so the file was repacked: save it again with "
                                  "torch.save")
        if info.file_size > self.file_size:
            raise CheckpointError(f"{self.file}: {name} claims {info.file_size} bytes, more than "
                                  f"the whole file ({self.file_size})")
        try:
            return self.archive.read(info)
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, ValueError,
                OSError) as e:  # what zipfile raises for damaged headers, flags, CRCs and seeks
            raise CheckpointError(f"{self.file}: {name} is damaged ({type(e).__name__}: {e})") \
                from None

    def storage(self, reference, where):
        """The flat array behind a tensor, after checking its persistent id against the archive."""
        pid = reference.pid if isinstance(reference, _Storage) else None
        if not _is_storage_pid(pid):
            raise CheckpointError(f"{where}: its storage is not a torch storage reference "
                                  "('storage', storage type, key, location, element count)")
        _, storage_type, key, _, count = pid
        if key in self.storages:
            known, array = self.storages[key]
            if known[1] != storage_type or known[4] != count:
                raise CheckpointError(
                    f"{where}: storage {_quote.repr(key)} is declared as {count} "
                    f"{storage_type.name} elements here, {known[4]} {known[1].name} before")
            return array
        dtype = np.dtype(_STORAGE_DTYPES[storage_type.name])
        name = f"{self.prefix}data/{key}"
        try:
            size = self.archive.getinfo(name).file_size
        except KeyError:
            raise CheckpointError(f"{where}: its storage {_quote.repr(name)} is missing from the "
                                  "archive") from None
        if size != count * dtype.itemsize:
            raise CheckpointError(
                f"{where}: storage {_quote.repr(name)} holds {size} bytes; the pickle declares "
                f"{count} {storage_type.name} elements ({count * dtype.itemsize} bytes)")
        array = np.frombuffer(self.read(name), dtype)
        self.storages[key] = pid, array
        self.storage_bytes += array.nbytes
        return array

    def tensor(self, claim, where):
        """The MLX array of a pickled tensor, once every claim is checked against its storage."""
        if not isinstance(claim, _Tensor):
            raise CheckpointError(f"{where}: not a tensor ({type(claim).__name__})")
        offset, size, stride = claim.offset, claim.size, claim.stride
        if not (isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) <= MAX_DIMS):
            raise CheckpointError(f"{where}: size {_quote.repr(size)} and stride "
                                  f"{_quote.repr(stride)} are not tuples of the same length (at "
                                  f"most {MAX_DIMS})")
        if not (all(_is_count(n, 2**31) for n in size) and all(map(_is_count, stride))
                and _is_count(offset)):
            raise CheckpointError(
                f"{where}: size {_quote.repr(size)}, stride {_quote.repr(stride)} and offset "
                f"{_quote.repr(offset)} are not all integers >= 0 (sizes below 2**31, MLX's "
                "limit; strides and offset below 2**63)")
        storage = self.storage(claim.storage, where)
        ident = (claim.storage.pid[2], offset, size, stride)
        if ident not in self.tensors:
            elements = math.prod(size)
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if elements and last >= storage.size:
                raise CheckpointError(
                    f"{where}: size {size}, stride {stride} and offset {offset} reach element "
                    f"{last} of a storage of {storage.size}")
            self.tensor_bytes += elements * storage.itemsize
            if self.tensor_bytes > self.storage_bytes:
                raise CheckpointError(
                    f"{where}: the tensors read so far view {self.tensor_bytes} bytes of "
                    f"storages that hold {self.storage_bytes}: overlapping views are refused")
            self.tensors[ident] = _to_mlx(_copy_out(storage, offset, size, stride))
        return self.tensors[ident]


def _copy_out(storage, offset, size, stride):
    """A checked view of the flat `storage`, copied into a new contiguous array."""
    if 0 in size:
        return np.empty(size, storage.dtype)
    # The stride along a dimension of size 1 is never used, and may be anything.
    strides = [s * storage.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
    return np.ascontiguousarray(np.lib.stride_tricks.as_strided(storage[offset:], size, strides))


def _to_mlx(array):
    if array.dtype == _BFloat16Bits:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def load_torch_bin(file):
    """Tensors of a `torch.save` zip checkpoint as MLX arrays, without running pickled code.

    Every tensor's size, stride and offset are checked against its storage, and every storage
    against its archive entry, before any of its memory is read.
    """
    file = Path(file)
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, NotImplementedError, ValueError):
        raise CheckpointError(f"{file}: not a zip archive (truncated, or the legacy torch format; "
                              "re-save it with a current torch)") from None
    with archive:
        return _read_tensors(archive, file)


def _read_tensors(archive, file):
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not pickles:
        raise CheckpointError(f"{file}: no data.pkl inside: not a torch checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    zip_file = _TorchZip(archive, prefix, file)
    if f"{prefix}byteorder" in archive.namelist() \
            and zip_file.read(f"{prefix}byteorder") != b"little":
        raise CheckpointError(f"{file}: saved on a big-endian machine; only little-endian "
                              "checkpoints are read")
    state = _unpickle(zip_file.read(pickles[0]), file)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dictionary of tensors")
    tensors = {}
    for name, claim in state.items():
        if type(name) is not str:
            raise CheckpointError(f"{file}: a tensor name is {_quote.repr(name)}, not a string")
        tensors[name] = zip_file.tensor(claim, f"{file}: tensor {_quote.repr(name)}")
    return tensors


def _unpickle(data, file):
    try:
        return _TensorUnpickler(io.BytesIO(data), file).load()
    except CheckpointError:
        raise
    except Exception as e:  # a hostile pickle can make the unpickler raise almost any type
        raise CheckpointError(f"{file}: damaged torch checkpoint: data.pkl does not unpickle "
                              f"({type(e).__name__}: {e})") from None
