"""`load`: a model and its tokenizer from a converted, transformers or original directory, or the hub."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import (WEIGHT_PATTERNS, CheckpointError, check_weights, keeps_float32,
                         read_weights, to_model_names)
from .config import load_config
from .models import Model

# What a Hugging Face repo needs besides its weights, for loading or converting.
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                      "merges.txt", "*.tiktoken", "chat_template*", "*.model"]
METADATA_PATTERNS = ["*.json", *TOKENIZER_PATTERNS, "*.txt"]


class DownloadError(OSError):
    """The hub could not provide a repo (offline, missing, gated); the message names the repo."""


def resolve(path_or_repo, allow_patterns=None):
    """A local directory for `path_or_repo`, downloading a hub repo id when it is not a path.

    allow_patterns: the files to fetch from the hub; by default the config, the tokenizer and one
    set of weights (safetensors rather than .bin when a repo holds both).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path}: is a file, expected a model directory")
    parts = str(path_or_repo).split("/")
    if len(parts) != 2 or not all(parts) or str(path_or_repo).startswith((".", "~")):
        raise FileNotFoundError(f"{path_or_repo}: no such directory (and not a repo id 'org/name')")
    return download(str(path_or_repo), allow_patterns)


def download(repo_id, allow_patterns=None):
    """Fetch `allow_patterns` of a hub repo, with huggingface_hub's progress bars; by default the
    config, the tokenizer and the first weight format that the repo holds, in the order
    `weight_files` prefers (a repo with both safetensors and .bin gives only the safetensors)."""
    if allow_patterns is not None:
        return _snapshot(repo_id, allow_patterns)
    for pattern in WEIGHT_PATTERNS:  # files already fetched are not fetched again
        path = _snapshot(repo_id, METADATA_PATTERNS + [pattern])
        if any(path.glob(pattern)):
            return path
    raise DownloadError(f"{repo_id}: the repo holds no weights ({', '.join(WEIGHT_PATTERNS)})")


def _snapshot(repo_id, allow_patterns):
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns))
    except OSError as e:  # every huggingface_hub error (offline, not found, gated) is an OSError
        reason = " ".join(str(e).split())
        raise DownloadError(f"{repo_id}: download from the Hugging Face hub failed "
                            f"({type(e).__name__}: {reason})") from None


def cast(weights, dtype):
    """Floating tensors to `dtype`, except those kept in float32 (see `keeps_float32`)."""
    return {name: value.astype(mx.float32 if keeps_float32(name) else dtype)
            if mx.issubdtype(value.dtype, mx.floating) else value
            for name, value in weights.items()}


def build_model(config):
    """A model of `config`, its layers quantized as the config says; weights not yet loaded."""
    model = Model(config)
    if config.quantization:
        from .quantize import quantize_model

        quantize_model(model, config.quantization)
    return model


def load_weights(path, model):
    """The tensors of checkpoint `path` under `model`'s names, checked against its parameters
    (names and shapes) before anything is done with them. Safetensors stay lazy until used."""
    weights = read_weights(path)
    try:
        weights = to_model_names(weights, model.config)
        check_weights(weights, {k: v.shape for k, v in tree_flatten(model.parameters())},
                      model.config)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return weights


def load_model(path, dtype=None):
    """The model of a local checkpoint directory, weights checked against its config."""
    model = build_model(load_config(path))
    weights = load_weights(path, model)
    if dtype is not None:
        weights = cast(weights, dtype)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def load_tokenizer(path):
    """The tokenizer shipped in `path` (transformers' AutoTokenizer), or None when there is none."""
    path = Path(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load(path_or_repo, *, dtype=None):
    """(model, tokenizer) from a local directory or a Hugging Face repo id; tokenizer may be None."""
    path = resolve(path_or_repo)
    return load_model(path, dtype), load_tokenizer(path)
