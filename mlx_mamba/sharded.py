"""`sharded_load`: a tensor parallel model whose every rank reads only its shard of the weights.

The model is built with placeholder weights (lazy, never computed) and sharded first, so that a
world size that does not fit the model fails before any weight is read. Each tensor is then read
as the plan says: a safetensors tensor that the checkpoint stores under a mere rename is read
slice by slice from the file (only this rank's bytes); a tensor that its family reshapes or
stacks on loading (a conv kernel's axes, experts stored one by one) is read whole, sliced and
freed before the next, so a rank never holds more than its shard plus one source tensor.

Pipeline parallel, a rank reads only its layers' tensors; from a hub repo whose weights are in
several files (model.safetensors.index.json), it downloads the config, the tokenizer and the
index first, and then only the files that hold its tensors.
"""

import json
import math
import os
import random
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import CheckpointError, read_file, weight_files
from .config import load_config
from .families import to_checkpoint_names, to_model_names
from .loader import (METADATA_PATTERNS, build_model, cast, check_weights, find_tokenizer,
                     load_tokenizer, resolve)
from .models.sharding import ShardingError, take

# safetensors dtype -> the numpy dtype its bytes are read as (bfloat16's as uint16 bits).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
           "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def _header(file):
    """(tensor entries, offset of the data) of a safetensors file."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def read_slices(file, name, axis, ranges):
    """Rows `ranges` of tensor `name` along `axis`, read from the safetensors `file` through a
    memory map: only the pages that hold them are read."""
    entries, start = _header(file)
    entry = entries[name]
    dtype, shape = entry["dtype"], tuple(entry["shape"])
    first, last = entry["data_offsets"]
    if dtype not in _DTYPES or last - first != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
        raise CheckpointError(f"{file}: tensor {name!r} ({dtype}, {shape}) does not match its "
                              f"{last - first} bytes")
    data = np.memmap(file, dtype=_DTYPES[dtype], mode="r", offset=start + first, shape=shape)
    index = [slice(None)] * len(shape)
    parts = []
    for low, high in ranges:
        index[axis] = slice(low, high)
        parts.append(np.ascontiguousarray(data[tuple(index)]))
    array = mx.array(np.concatenate(parts, axis=axis))
    return array.view(mx.bfloat16) if dtype == "BF16" else array


INDEX = "model.safetensors.index.json"


def _read_shard(path, config, shapes, plan, held, names=None):
    """This rank's part of the tensors `held` of checkpoint `path`, under the model's names;
    shapes: the unsharded model's {name: shape}, which the files must match. names: {the
    checkpoint's name of a held tensor: its file} (`_held_in_index`), those tensors alone
    read; None: every file is read (lazily)."""
    if names is None:
        files, expected = weight_files(path), shapes
    else:
        files = [Path(path) / file for file in sorted(set(names.values()))]
        expected = {name: shapes[name] for name in held}
    sources, origin = {}, {}
    for file in files:
        tensors = read_file(file)  # lazy for safetensors: nothing is read yet
        if names is not None:
            tensors = {name: value for name, value in tensors.items() if name in names}
        if file.suffix == ".safetensors":
            origin.update({id(value): (file, name) for name, value in tensors.items()})
        sources.update(tensors)
    try:
        weights = to_model_names(sources, config)
        check_weights(weights, expected, config)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    shard = {}
    for name, value in weights.items():
        if name not in held:
            continue
        if name in plan and id(value) in origin:
            shard[name] = read_slices(*origin[id(value)], *plan[name])
        else:
            shard[name] = take(value, *plan[name]) if name in plan else value
            mx.eval(shard[name])  # the whole source is freed before the next one is read
    return shard


def _held_in_index(path, config, shapes):
    """{name in the checkpoint's index: its file} of the tensors `shapes` ({model name:
    shape}), or None when the checkpoint has no index or names one of them otherwise (then
    every file is read)."""
    file = Path(path) / INDEX
    if not file.is_file():
        return None
    try:
        index = json.loads(file.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: not a valid shard index ({e})") from None
    names = {}
    for name, shape in shapes.items():
        # A lazy placeholder is renamed (split, unstacked) like the real tensor; never computed.
        found = [n for n in {name, *to_checkpoint_names({name: mx.zeros(shape)}, config)}
                 if n in index]
        if not found:
            return None
        names.update((n, index[n]) for n in found)
    return names


def sharded_load(path_or_repo, tensor_group=None, pipeline_group=None, *, dtype=None,
                 tokenizer=None):
    """(model, tokenizer) tensor parallel over `tensor_group` (default: the world of
    `mx.distributed.init()`), or pipeline parallel over `pipeline_group` when it is given, each
    rank reading only its shard of the weights (pipeline: its layers' tensors, and from a hub
    repo with an index of several files, downloading only the files that hold them). Every rank
    calls it with the same arguments; every rank's model gives the full logits. Arguments
    otherwise as `mlx_mamba.load`. A world size that does not fit the model raises
    `mlx_mamba.models.sharding.ShardingError` on every rank, before any weight is read."""
    pipeline = pipeline_group is not None
    # Pipeline: a hub repo's config, tokenizer and index first (a local directory as it is).
    path = resolve(path_or_repo, METADATA_PATTERNS if pipeline else None)
    location = find_tokenizer(path, tokenizer)
    model = build_model(load_config(path))
    shapes = {name: value.shape for name, value in tree_flatten(model.parameters())}
    if pipeline:
        model.pipeline(pipeline_group)
        plan = {}
    else:
        plan = model.shard(tensor_group or mx.distributed.init())
    held = {name for name, _ in tree_flatten(model.parameters())}
    names = None
    if pipeline:
        names = _held_in_index(path, model.config, {name: shapes[name] for name in held})
        path = resolve(path_or_repo) if names is None else \
            resolve(path_or_repo, METADATA_PATTERNS + sorted(set(names.values())))
    weights = _read_shard(path, model.config, shapes, plan, held, names)
    if dtype is not None:
        weights = cast(weights, dtype)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model, load_tokenizer(location, model.config.eos_token_id)


def agree(world, error):
    """Called by every rank after a step that may fail on some (loading): raises this rank's
    `error`, or a ShardingError saying that another rank failed, so that every rank stops or
    none does (a rank left alone would wait for the others forever)."""
    failed = mx.distributed.all_sum(mx.array(error is not None, mx.int32), group=world).item()
    if error is not None:
        raise error
    if failed:
        raise ShardingError(f"{failed} of the {world.size()} processes failed (see their "
                            "errors)")


def shared_seed(world):
    """A random seed drawn by rank 0 and given to every rank: unseeded sampling must still draw
    the same tokens on every rank."""
    seed = random.getrandbits(31) if world.rank() == 0 else 0
    return mx.distributed.all_sum(mx.array(seed, mx.int32), group=world).item()


FRAME = 256  # bytes of a broadcast that one sum carries (with the length in the first 4)


def broadcast(world, data=None):
    """Rank 0's bytes `data` on every rank (the others pass None), summed over the group with
    zeros from the other ranks: one sum of a frame holding the length and the first bytes, and
    a second for the rest of a longer message."""
    first = world.rank() == 0
    frame = np.zeros(FRAME, np.uint8)
    if first:
        head = len(data).to_bytes(4, "little") + data[:FRAME - 4]
        frame[:len(head)] = np.frombuffer(head, np.uint8)
    frame = np.array(mx.distributed.all_sum(mx.array(frame), group=world))
    size = int.from_bytes(frame[:4].tobytes(), "little")
    received = frame[4:4 + size].tobytes()
    if size > FRAME - 4:
        rest = np.frombuffer(data[FRAME - 4:], np.uint8) if first else \
            np.zeros(size - (FRAME - 4), np.uint8)
        received += np.array(mx.distributed.all_sum(mx.array(rest), group=world)).tobytes()
    return received


def quiet_unless_first(world):
    """Only rank 0 prints: the others' stdout and stderr go nowhere."""
    if world.rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
