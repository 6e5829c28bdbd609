"""`load`: a model and its tokenizer from a converted, transformers or original directory, or the hub."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import WEIGHT_PATTERNS, CheckpointError, keeps_float32, read_weights
from .config import load_config, read_config
from .families import config_format, to_checkpoint_names, to_model_names
from .models import Model

# What a Hugging Face repo needs besides its weights, for loading or converting.
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                      "merges.txt", "*.tiktoken", "chat_template*", "*.model"]
METADATA_PATTERNS = ["*.json", *TOKENIZER_PATTERNS, "*.txt"]
# A directory with any of these holds a tokenizer (the last is Mistral's sentencepiece file,
# which convert turns into a tokenizer.json).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                     "tokenizer.model.v3")
# The tokenizer of every state-spaces model; their original checkpoints ship none.
STATE_SPACES_TOKENIZER = "EleutherAI/gpt-neox-20b"


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


def load_model(path, dtype=None):
    """The model of a local checkpoint directory, weights checked against its config."""
    model = build_model(load_config(path))
    weights = load_weights(path, model)
    if dtype is not None:
        weights = cast(weights, dtype)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def has_tokenizer(directory):
    return any((Path(directory) / name).is_file() for name in TOKENIZER_MARKERS)


def find_tokenizer(model_dir, tokenizer=None):
    """Where the tokenizer of the model in `model_dir` is: a local directory, a tokenizer.json
    file, or None when the model has none.

    tokenizer: a directory, a tokenizer.json file or a hub repo id, used instead of the model's
    own. None: the tokenizer files in `model_dir`, or for a state-spaces original (which ships
    none) GPT-NeoX-20B's from the hub, as mamba_ssm's models use.
    """
    if tokenizer is not None:
        return locate_tokenizer(tokenizer)
    if has_tokenizer(model_dir):
        return Path(model_dir)
    if config_format(read_config(model_dir)[1]) != "state-spaces":
        return None
    try:
        return download(STATE_SPACES_TOKENIZER, TOKENIZER_PATTERNS)
    except DownloadError as e:
        raise DownloadError(f"{model_dir}: a state-spaces checkpoint ships no tokenizer, and {e}; "
                            "pass one as tokenizer= (Python) or --tokenizer (command line): a "
                            "directory, a tokenizer.json file or a repo id") from None


def locate_tokenizer(tokenizer):
    """The local directory or tokenizer.json file of `tokenizer`: a directory, a tokenizer.json
    file, or a hub repo id (whose tokenizer files alone are downloaded)."""
    path = Path(tokenizer).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".json":  # names a file, not a repo
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    directory = resolve(tokenizer, allow_patterns=TOKENIZER_PATTERNS)
    if not has_tokenizer(directory):
        raise FileNotFoundError(f"{directory}: holds no tokenizer "
                                f"({', '.join(TOKENIZER_MARKERS)})")
    return directory


def load_tokenizer(location, eos_token_id=None):
    """The transformers tokenizer at `location` (a directory or a tokenizer.json file, as
    `find_tokenizer` gives), or None when there is none that transformers reads.

    eos_token_id: the model config's, for a tokenizer whose files name no end-of-sequence token
    (a bare tokenizer.json names none).
    """
    if location is None:
        return None
    location = Path(location)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if location.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(location))
        elif any((location / name).is_file()
                 for name in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(str(location))
        else:
            return None
    except Exception as e:  # tokenizers and transformers raise many types, a bare Exception too
        raise CheckpointError(f"{location}: not a readable tokenizer "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    return _name_eos(tokenizer, eos_token_id)


def _name_eos(tokenizer, eos_token_id):
    # Generation stops at the tokenizer's eos, and fine-tuning appends it: take the config's.
    eos = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
    if tokenizer.eos_token_id is None and isinstance(eos, int) and 0 <= eos < len(tokenizer):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    return tokenizer


def load(path_or_repo, *, dtype=None, tokenizer=None):
    """(model, tokenizer) from a local directory or a Hugging Face repo id.

    tokenizer: a directory, a tokenizer.json file or a repo id to take the tokenizer from, for
    models shipped without one or to work offline. None (the default): the model's own; for a
    state-spaces original, GPT-NeoX-20B's from the hub. The returned tokenizer is None when the
    model has none.
    """
    path = resolve(path_or_repo)
    location = find_tokenizer(path, tokenizer)  # before the weights: a missing one fails fast
    model = load_model(path, dtype)
    return model, load_tokenizer(location, model.config.eos_token_id)
