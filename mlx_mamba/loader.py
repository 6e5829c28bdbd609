"""`load`: a model and its tokenizer from a converted, transformers or original directory, or the hub."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import check_weights, keeps_float32, read_weights, to_model_names
from .config import load_config
from .models import Model

# What a Hugging Face repo needs to provide for loading or converting.
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "tokenizer*", "*.model",
                "*.model.v3", "*.tiktoken", "*.txt"]


def resolve(path_or_repo):
    """A local directory for `path_or_repo`, downloading a hub repo id when it is not a path."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path}: is a file, expected a model directory")
    parts = str(path_or_repo).split("/")
    if len(parts) != 2 or not all(parts) or str(path_or_repo).startswith((".", "~")):
        raise FileNotFoundError(f"{path_or_repo}: no such directory (and not a repo id 'org/name')")
    return download(str(path_or_repo))


def download(repo_id):
    """Fetch the files `load` and convert.py use from the hub, with huggingface_hub's progress bars."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))


def cast(weights, dtype):
    """Floating tensors to `dtype`, except those kept in float32 (see `keeps_float32`)."""
    return {name: value.astype(mx.float32 if keeps_float32(name) else dtype)
            if mx.issubdtype(value.dtype, mx.floating) else value
            for name, value in weights.items()}


def load_model(path, dtype=None):
    """The model of a local checkpoint directory, weights checked against its config."""
    config = load_config(path)
    model = Model(config)
    if config.quantization:
        from .quantize import quantize_model

        quantize_model(model, config.quantization)
    weights = to_model_names(read_weights(path), config)
    check_weights(weights, {k: v.shape for k, v in tree_flatten(model.parameters())})
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
