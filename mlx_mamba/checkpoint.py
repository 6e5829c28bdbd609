"""Reading foreign checkpoints: safetensors (single or sharded) and PyTorch `.bin` zips.

`.bin` files are read by a restricted unpickler that only rebuilds tensors: pickled code is never
executed and torch is not needed. (No maintained library reads torch's zip format without
torch; `torch.load(weights_only=True)` needs torch, which conversion must not require.)
"""

import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import ModelConfig


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


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
    # storage is a flat numpy array; the tensor is a strided view of it, copied out.
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
    return data


class _TensorUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
    }

    def __init__(self, data, archive, prefix, file):
        super().__init__(data)
        self.archive, self.prefix, self.file = archive, prefix, file
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise CheckpointError(
            f"{self.file}: refusing to load '{module}.{name}': only tensors are read from .bin files")

    def persistent_load(self, pid):
        _, storage_type, key, _, _ = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            if storage_type.dtype == "bfloat16":
                self.storages[key] = np.frombuffer(raw, dtype=np.uint16).view(_BFloat16Bits)
            else:
                self.storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self.storages[key]


# bfloat16 has no numpy dtype: its bits travel as this marked uint16 view until they reach MLX.
_BFloat16Bits = np.dtype([("bfloat16", np.uint16)])


def _to_mlx(array):
    if array.dtype == _BFloat16Bits:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def load_torch_bin(file):
    """Tensors of a `torch.save` zip checkpoint as MLX arrays, without running pickled code."""
    file = Path(file)
    try:
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pickles:
                raise CheckpointError(f"{file}: no data.pkl inside: not a torch checkpoint")
            prefix = pickles[0][: -len("data.pkl")]
            with archive.open(pickles[0]) as data:
                state = _TensorUnpickler(data, archive, prefix, file).load()
    except zipfile.BadZipFile:
        raise CheckpointError(f"{file}: not a zip archive (truncated, or the legacy torch format; "
                              "re-save it with a current torch)") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, zipfile.error) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file}: damaged torch checkpoint ({e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dictionary of tensors")
    return {name: _to_mlx(t) for name, t in state.items() if isinstance(t, np.ndarray)}


def to_model_names(weights, config: ModelConfig):
    """Rename and reshape foreign tensors to this package's parameters.

    Original checkpoints name the embedding `backbone.embedding`; Mistral's consolidated files
    put every name under `model.` (mistral_inference wraps mamba_ssm's model as `self.model`);
    torch stores the depthwise conv kernel as (C, 1, K) where MLX uses (C, K, 1); a tied head is
    dropped.
    """
    if config.family:
        from .families import MODULES

        weights = MODULES[config.family].to_model_names(weights, config)
    renamed = {}
    for name, value in weights.items():
        if name.startswith(("model.backbone.", "model.lm_head.")):
            name = name[len("model."):]
        name = name.replace("backbone.embedding.", "backbone.embeddings.")
        if name.endswith("conv1d.weight") and value.ndim == 3 and value.shape[1] == 1:
            value = value.swapaxes(1, 2)
        renamed[name] = value
    if config.tie_embeddings:
        renamed.pop("lm_head.weight", None)
    return renamed


def to_checkpoint_names(weights, config: ModelConfig):
    """The names a model's tensors have in its family's transformers checkpoints (the inverse of
    `to_model_names` for converted models; pure Mamba models already use them)."""
    if not config.family:
        return weights
    from .families import MODULES

    return MODULES[config.family].to_checkpoint_names(weights, config)


def check_weights(weights, expected, config=None):
    """Every expected tensor present with its shape, nothing else. expected: {name: shape}.
    With the model's `config`, a message names a missing tensor as the checkpoint does."""
    for name, shape in expected.items():
        if name not in weights:
            raise CheckpointError(f"missing tensor {_checkpoint_name(name, shape, config)!r} "
                                  f"(expected shape {tuple(shape)})")
        if tuple(weights[name].shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(weights[name].shape)}, "
                                  f"the config implies {tuple(shape)}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r}: the config has no such "
                              "parameter")


def _checkpoint_name(name, shape, config):
    # A lazy placeholder is renamed (and split or unstacked) like the real tensor; never evaluated.
    if config is None or not config.family:
        return name
    return next(iter(to_checkpoint_names({name: mx.zeros(shape)}, config)))
