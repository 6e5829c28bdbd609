"""Convert a Mamba checkpoint of any flavour to MLX safetensors, optionally quantized.

    python convert.py --hf-path state-spaces/mamba-130m --mlx-path mamba-130m-4bit -q

Sources: a local directory or a hub repo id holding a transformers checkpoint (Mamba, Mamba2,
Falcon-Mamba; single or sharded safetensors), a state-spaces original (config.json with ssm_cfg
and pytorch_model.bin, read without running pickled code) or Mistral's Mamba-Codestral layout
(params.json, consolidated.safetensors, tokenizer.model.v3). Every tensor is checked against the
config before anything is written. The output is built in a hidden directory next to the
destination and renamed into place at the end: a failure or Ctrl-C leaves nothing behind, and an
existing directory is never touched.
"""

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .families import to_checkpoint_names
from .files import check_directory_path, save_safetensors
from .loader import (STATE_SPACES_TOKENIZER, build_model, cast, find_tokenizer, load_tokenizer,
                     load_weights, resolve)
from .quant_modes import MODES, QuantizationError, accepted, quantization_params
from .quant_recipes import RECIPES, recipe_quantization
from .quantize import (bits_per_weight, layer_settings, quantize_model, quantized_bits,
                       should_quantize, unfit_layers)

MAX_SHARD_BYTES = 5 << 30  # as mlx-lm: one model.safetensors up to 5 GiB, else shards + index
DTYPES = ("float16", "bfloat16", "float32")
# Copied from the tokenizer's directory when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
MISTRAL_TOKENIZER = "tokenizer.model.v3"


class ConvertError(ValueError):
    """A conversion that cannot go ahead; the message names the path or option."""


def convert(hf_path, mlx_path="mlx_model", *, dtype=None, quantize=False, q_bits=None,
            q_group_size=None, q_mode="affine", quant_predicate=None, tokenizer=None,
            upload_repo=None, max_shard_bytes=MAX_SHARD_BYTES):
    """Convert `hf_path` (directory or repo id) into the new directory `mlx_path`; returns it.

    quant_predicate: a mixed-precision recipe of `quant_recipes.RECIPES` (with quantize=True),
    which sets the bits; or a function (path, module) -> bool or {"group_size", "bits", "mode"},
    as mlx-lm's, deciding layer by layer among the quantizable layers.
    """
    destination = Path(mlx_path).expanduser()
    check_destination(destination, "--mlx-path")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    quantization = quantization_params(q_bits, q_group_size, q_mode) if quantize else None
    if quant_predicate is not None:
        _check_predicate(quant_predicate, quantize, q_bits, q_mode)
    if upload_repo:
        _check_repo_id(upload_repo)

    source = resolve(hf_path)
    model = build_model(load_config(source))
    if quantization and model.config.quantization:
        raise ConvertError(f"{source}: already quantized ({model.config.quantization})")
    weights = load_weights(source, model)
    tokenizer_source = _tokenizer_source(source, tokenizer)

    dtype = getattr(mx, dtype) if dtype else _stored_dtype(weights)
    if dtype is not None:
        weights = cast(weights, dtype)
    if quantization:
        if quant_predicate is not None:
            quantization = predicate_quantization(quant_predicate, model, quantization)
        weights = _quantize(model, weights, quantization)
    config = model.config
    del model  # from here on the weights dict holds the only references: shards free as written

    def extras(staging):
        if (source / "generation_config.json").is_file():  # it carries the eos ids of generation
            shutil.copyfile(source / "generation_config.json", staging / "generation_config.json")
        if upload_repo:
            _write_model_card(staging, upload_repo, hf_path, quantization)

    save_model(destination, weights, config, tokenizer_source, max_shard_bytes, extras)
    print(f"[INFO] Saved to {destination}")
    if upload_repo:
        _upload(destination, upload_repo)
    return destination


def check_destination(destination, flag="output directory"):
    """Raise ConvertError (or NotADirectoryError) unless the new directory `destination` can be
    made: it does not exist, and no parent of it is a file. Checked before any work."""
    destination = Path(destination).expanduser()
    if destination.exists():
        raise ConvertError(f"{destination}: already exists; choose another {flag} "
                           "(it was left untouched)")
    check_directory_path(destination)


def save_model(destination, weights, config, tokenizer_source=None,
               max_shard_bytes=MAX_SHARD_BYTES, extras=None):
    """Write a model directory that `load` reads, atomically: config.json (from the ModelConfig
    `config`), the weights under their checkpoint names (sharded above `max_shard_bytes`), the
    tokenizer of `tokenizer_source` (a directory's tokenizer files or a tokenizer.json file), and
    whatever `extras(staging_directory)` adds. `destination` must not exist; a failure leaves
    nothing."""
    destination = Path(destination).expanduser()
    check_destination(destination)
    with _staged(destination) as staging:
        _write_json(staging / "config.json", config.to_dict())
        _write_weights(to_checkpoint_names(weights, config), staging, max_shard_bytes)
        _write_tokenizer(tokenizer_source, staging)
        if extras is not None:
            extras(staging)


def _stored_dtype(weights):
    # The dtype the checkpoint stores its embedding in; None for an already quantized one.
    stored = weights["backbone.embeddings.weight"].dtype
    return stored if mx.issubdtype(stored, mx.floating) else None


def _quantize(model, weights, quantization):
    """The parameters of `model` holding `weights`, quantized; lazy until written."""
    model.load_weights(list(weights.items()))
    group_size = quantization["group_size"]
    _report_unfit(unfit_layers(model, group_size), group_size)
    quantize_model(model, quantization)
    bits = bits_per_weight(model)
    if bits is None:
        raise QuantizationError(f"--q-group-size {group_size}: no layer's input size is a "
                                "multiple of it; nothing would be quantized")
    model.config.quantization = quantization
    mixed = len(set(quantized_bits(model).values())) > 1
    print(f"[INFO] Quantized ({quantization['mode']}, {'mixed, default ' * mixed}"
          f"{quantization['bits']} bits, group {group_size}): {bits:.2f} bits per quantized "
          "weight")
    return dict(tree_flatten(model.parameters()))


def _check_predicate(predicate, quantize, q_bits, q_mode):
    if not quantize:
        raise ConvertError("--quant-predicate needs -q")
    if isinstance(predicate, str):
        if predicate not in RECIPES:
            raise ConvertError(f"--quant-predicate {predicate!r}: expected one of "
                               f"{', '.join(RECIPES)}")
        if q_bits is not None or q_mode != "affine":
            raise ConvertError(f"--quant-predicate {predicate} sets the bits (affine mode): "
                               "drop --q-bits and --q-mode")


def predicate_quantization(predicate, model, quantization):
    """The `quantization` entry, with per-module entries, that a recipe name or a predicate
    function (path, module) -> bool or settings gives `model` (quantizable layers only)."""
    if isinstance(predicate, str):
        return recipe_quantization(predicate, model, quantization["group_size"])
    mixed = dict(quantization)
    for path, module in model.named_modules():
        if not should_quantize(path, module, quantization["group_size"]):
            continue
        chosen = predicate(path, module)
        if chosen is False:
            raise ConvertError(f"quant_predicate: {path} left in full precision; a mixed "
                               "quantization here gives every quantizable layer a bit width")
        if isinstance(chosen, dict):
            settings = quantization_params(chosen.get("bits"), chosen.get("group_size"),
                                           chosen.get("mode", "affine"))
            if not should_quantize(path, module, settings["group_size"]):
                raise ConvertError(f"quant_predicate: {path}'s input size does not fit group "
                                   f"size {settings['group_size']}")
            if settings != layer_settings(quantization, path):
                mixed[path] = settings
    return mixed


def _report_unfit(unfit, group_size):
    # One line per kind of layer ("layers.*.mixer.dt_proj"), not one per layer.
    kinds = {}
    for path, size in unfit:
        kind = ".".join("*" if part.isdigit() else part for part in path.split("."))
        kinds.setdefault((kind, size), []).append(path)
    for (kind, size), paths in kinds.items():
        print(f"[INFO] {kind} ({len(paths)} layer{'s' * (len(paths) > 1)}) stays in full "
              f"precision: its input size {size} is not a multiple of the group size {group_size}")


def _tokenizer_source(source, override):
    """The directory or tokenizer.json file whose tokenizer goes with the output, or None (with a
    warning); checked before any work."""
    location = find_tokenizer(source, override)
    if location is None:
        print(f"[WARNING] No tokenizer in {source}; pass --tokenizer PATH_OR_REPO to add one")
    elif location.is_file():
        load_tokenizer(location)  # a damaged file fails now, naming it
    else:
        if override is None and location != source:
            print(f"[INFO] No tokenizer in {source}: using {STATE_SPACES_TOKENIZER}'s, which every "
                  "state-spaces model uses (--tokenizer overrides)")
        _convertible(location)
    return location


def _convertible(directory):
    # Checked before any work: transformers reads a sentencepiece model through protobuf.
    if (not (directory / "tokenizer.json").is_file() and (directory / MISTRAL_TOKENIZER).is_file()
            and importlib.util.find_spec("google.protobuf") is None):
        raise ConvertError(f"{directory / MISTRAL_TOKENIZER}: converting it needs protobuf "
                           "(pip install 'mlx-mamba[mistral]'), or pass --tokenizer")


def _write_tokenizer(source, destination):
    if source is None:
        return
    if source.is_file():  # a bare tokenizer.json, whatever its name
        shutil.copyfile(source, destination / "tokenizer.json")
        return
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, destination / name)
    if (source / MISTRAL_TOKENIZER).is_file() and "tokenizer.json" not in copied:
        _convert_sentencepiece(source / MISTRAL_TOKENIZER, destination)


def _convert_sentencepiece(model_file, destination):
    """Mistral's sentencepiece tokenizer as a transformers tokenizer.json, as transformers' own
    Mamba-Codestral conversion does (a Llama tokenizer, legacy=False); the .v3 file is kept too."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        shutil.copyfile(model_file, Path(scratch) / "tokenizer.model")
        _write_json(Path(scratch) / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
            "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
        try:
            tokenizer = AutoTokenizer.from_pretrained(scratch)
        except Exception as e:  # sentencepiece and transformers raise many types for a bad file
            raise ConvertError(f"{model_file}: not a readable sentencepiece model ({e})") from None
    tokenizer.save_pretrained(destination)
    shutil.copyfile(model_file, destination / MISTRAL_TOKENIZER)


def _write_weights(weights, directory, max_shard_bytes):
    """model.safetensors, or shards of at most `max_shard_bytes` with model.safetensors.index.json.

    Each tensor is computed (read, cast, quantized) as its shard is written, so memory holds about
    one shard, not the model.
    """
    from tqdm import tqdm

    shards = _make_shards(weights, max_shard_bytes)
    total = sum(v.nbytes for v in weights.values())
    weights.clear()
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing weights") as progress:
        for i, name in enumerate(names):
            shard, shards[i] = shards[i], None
            for value in shard.values():
                mx.eval(value)
                progress.update(value.nbytes)
            save_safetensors(directory / name, shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, name))
            del shard
    if len(names) > 1:
        _write_json(directory / "model.safetensors.index.json",
                    {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))})


def _make_shards(weights, max_bytes):
    # A tensor larger than the limit gets a shard of its own.
    shards, size = [{}], 0
    for name, value in weights.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


@contextlib.contextmanager
def _staged(destination):
    """A hidden directory next to `destination`, renamed to it when the block succeeds and
    removed, with any parent directories made for it, when it fails or is interrupted. A failed
    write (a full disk, ...) becomes a ConvertError naming the file by its final path."""
    made = next((p for p in reversed(destination.absolute().parents) if not p.exists()), None)
    staging = None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial",
                                        dir=destination.parent))
        yield staging
        if destination.exists():  # appeared while we worked: never replace it
            raise ConvertError(f"{destination}: appeared while it was being written; it was left "
                               "untouched")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's
        staging.rename(destination)
    except BaseException as e:
        if made or staging:
            shutil.rmtree(made or staging, ignore_errors=True)
        if isinstance(e, OSError):
            file = Path(e.filename) if e.filename and staging else destination
            if staging in file.parents:
                file = destination / file.relative_to(staging)
            raise ConvertError(f"{file}: {e.strerror or e}; nothing was left behind") from None
        raise


def _write_json(file, value):
    file.write_text(json.dumps(_tag_non_finite(value), indent=2, allow_nan=False) + "\n")


def _tag_non_finite(value):
    # As transformers writes infinity ({"__float__": "Infinity"}), so config.json stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "NaN" if math.isnan(value) else
                "Infinity" if value > 0 else "-Infinity"}
    if isinstance(value, dict):
        return {k: _tag_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_non_finite(v) for v in value]
    return value


def _write_model_card(directory, repo, hf_path, quantization):
    quantized = (f", quantized ({quantization['mode']}, {quantization['bits']} bits)"
                 if quantization else "")
    (directory / "README.md").write_text(
        f"---\nlibrary_name: mlx\ntags:\n- mlx\n- mamba\nbase_model: {hf_path}\n---\n\n"
        f"# {repo}\n\n{hf_path} converted to MLX with mlx-mamba{quantized}.\n\n"
        f"```python\nimport mlx_mamba\n\nmodel, tokenizer = mlx_mamba.load(\"{repo}\")\n```\n")


def _check_repo_id(repo):
    # Before the conversion, not after it.
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ConvertError(f"--upload-repo {repo!r}: not a repo id ({e})") from None


def _upload(directory, repo):
    import huggingface_hub

    try:
        huggingface_hub.create_repo(repo, exist_ok=True)
        huggingface_hub.upload_folder(folder_path=str(directory), repo_id=repo)
    except OSError as e:  # every huggingface_hub error is an OSError
        reason = " ".join(str(e).split())
        raise ConvertError(f"upload to {repo} failed ({reason}); the converted model is in "
                           f"{directory}") from None
    print(f"[INFO] Uploaded to https://huggingface.co/{repo}")


def _per_mode(index):
    # "affine 32|64|128 (default 64), mxfp4 32, ..." for the group sizes (0) or bits (1).
    return ", ".join(f"{mode} {accepted(values[index])}" + (
        f" (default {values[index][0]})" if len(values[index]) > 1 else "")
        for mode, values in MODES.items())


def parser():
    p = cli.ArgumentParser(
        prog="convert.py", description="Convert a Mamba or Mamba2 checkpoint to MLX safetensors.")
    p.add_argument("--hf-path", "--model", required=True,
                   help="A local directory or a Hugging Face repo id.")
    p.add_argument("--mlx-path", default="mlx_model", help="The new directory to write")
    p.add_argument("--dtype", choices=DTYPES,
                   help="dtype of the unquantized weights (default: as stored). A_log, D, "
                        "dt_bias and the norms stay float32.")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the projections, "
                   "embedding and lm_head.")
    p.add_argument("--q-bits", type=int, help=f"Bits per weight, by --q-mode: {_per_mode(1)}.")
    p.add_argument("--q-group-size", type=int,
                   help=f"Group size, by --q-mode: {_per_mode(0)}.")
    p.add_argument("--q-mode", choices=tuple(MODES), default="affine", help="Quantization mode")
    p.add_argument("--quant-predicate", choices=tuple(RECIPES),
                   help="Mixed-precision recipe (with -q): mixed_L_H keeps the embedding, head, "
                   "Mamba1's x_proj/dt_proj and, in the first and last eighth of the layers and "
                   "every third between, the mixers' in/out projections at H bits, the rest at L "
                   "(default: --q-bits for every layer).")
    p.add_argument("--tokenizer", help="Take the tokenizer from this directory, tokenizer.json "
                   "file or repo id (default: the source's).")
    p.add_argument("--upload-repo", help="Upload the result to this Hugging Face repo "
                   "(default: no upload).")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not args.quantize and (args.q_bits is not None or args.q_group_size is not None
                              or args.q_mode != "affine" or args.quant_predicate):
        p.error("--q-bits, --q-group-size, --q-mode and --quant-predicate need -q")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    try:
        status = cli.run(
            lambda: convert(args.hf_path, args.mlx_path, dtype=args.dtype, quantize=args.quantize,
                            q_bits=args.q_bits, q_group_size=args.q_group_size,
                            q_mode=args.q_mode, quant_predicate=args.quant_predicate,
                            tokenizer=args.tokenizer,
                            upload_repo=args.upload_repo),
            (ConvertError, ConfigError, CheckpointError, QuantizationError, OSError),
            interrupted="no partial output was left behind")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
