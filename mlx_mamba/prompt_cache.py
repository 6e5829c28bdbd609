"""A prompt's state: built by prefill, kept in a file and resumed.

A Mamba's whole context is a few MB of constant-size state. A PromptCache holds the state after
every one of its tokens but the last, which is still to be fed: the next run feeds it first,
so resuming needs no stored logits and continues exactly where an uninterrupted run would.
A PrefixCache (the server's) keeps many states, each after all of its tokens, and finds the
longest one that a new prompt starts with.
Files are safetensors: per layer `layers.{i}.{name}` for each array of its cache (`conv` and `ssm`
for Mamba layers; `keys`, `values`, `positions` and `valid` for attention layers), the token ids
as `tokens`, and metadata naming the model and its configuration and saying whether the state
is after all the tokens (`fed` "all") or all but the last ("all_but_last"). The state of a
sharded model is one file per process (`rank_file`), each recording the part it holds (`part`).
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import cache_state
from .files import replace_atomically, save_safetensors
from .token_ids import TokenIdError, check_token_ids

PREFILL_STEP_SIZE = 2048  # prompt tokens per parallel forward: bounds memory for any length
FORMAT = "mlx_mamba.prompt_cache"
VERSION = "1"
# Config fields that do not change what the state means.
NOT_STATE = ("bos_token_id", "eos_token_id", "pad_token_id", "quantization", "source_config")


class PromptCacheError(ValueError):
    """A prompt cache, its file or a prefill setting that cannot be used; the message names it."""


@dataclasses.dataclass
class PromptCache:
    layers: list  # the model's per-layer caches, batch 1: the state after tokens[:-1]
    tokens: list  # every token of the prompt; the last one is not fed yet

    def copy(self):
        """New layer objects over the same (immutable) arrays: decoding the copy leaves this one."""
        return PromptCache([c.copy() if c is not None else None for c in self.layers],
                           list(self.tokens))


def prefill(model, rows, cache, *, step_size=PREFILL_STEP_SIZE, progress=None):
    """Feed token rows (lists of any lengths, left-padded here) into `cache` (batch len(rows)).

    Runs the parallel forward `step_size` positions at a time and evaluates only the cache
    between chunks (the logits are never computed), so memory does not grow with the prompt.
    progress(done, total) is called after each chunk.
    """
    if not (isinstance(step_size, int) and step_size >= 1):
        raise PromptCacheError(f"prefill step size {step_size!r}: expected a positive integer")
    width = max(map(len, rows))
    ids = mx.array([[0] * (width - len(r)) + list(r) for r in rows])  # (B, width)
    mask = None  # (B, width): 0 on the left padding, which must reach neither conv nor state
    if any(len(r) < width for r in rows):
        mask = mx.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    for start in range(0, width, step_size):
        end = min(start + step_size, width)
        model(ids[:, start:end], cache, None if mask is None else mask[:, start:end])
        mx.eval(cache_state(cache))
        if progress:
            progress(end, width)


def make_prompt_cache(model, tokens, previous=None, *, step_size=PREFILL_STEP_SIZE, progress=None):
    """The PromptCache of `tokens`, continuing `previous` when given (which is left unchanged).

    tokens: a list of ints or a 1-D integer array; TokenIdError if an id (there or in
    `previous`) is outside the model's vocabulary.
    """
    if isinstance(tokens, str):
        raise PromptCacheError("make_prompt_cache takes token ids, not text: encode it first")
    if previous is not None and not isinstance(previous, PromptCache):
        raise PromptCacheError(f"previous has type {type(previous).__name__}: expected a "
                               "PromptCache")
    tokens = check_token_ids(tokens, model.config.vocab_size)
    if previous:
        check_token_ids(previous.tokens, model.config.vocab_size)
    result = previous.copy() if previous else PromptCache(model.make_cache(1), [])
    if not tokens:
        return result
    feed = result.tokens[-1:] + tokens[:-1]
    if feed:
        prefill(model, [feed], result.layers, step_size=step_size, progress=progress)
    result.tokens += tokens
    return result


# The fields a pure Mamba config had when this format was made: always recorded, so that caches
# saved then keep their hash. Fields added since are recorded when not at their default.
FIRST_FIELDS = ("arch", "d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                "dt_rank", "head_dim", "n_groups", "chunk_size", "dt_limit", "conv_bias", "bias",
                "norm_eps", "mixer_rms_eps", "tie_embeddings", "residual_in_fp32")


def state_config(config):
    """The config fields that give the state its meaning, as a JSON-ready dict."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    fields = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()
            if k not in NOT_STATE and (k in FIRST_FIELDS or v != defaults[k])}


def config_hash(config):
    text = json.dumps(state_config(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_cache_file(file):
    """Raise PromptCacheError unless a prompt cache can be written to `file`: its directory
    exists and it is not itself a directory."""
    file = Path(file)
    if file.is_dir():
        raise PromptCacheError(f"{file}: is a directory; name the prompt cache file to write")
    if not file.parent.is_dir():
        problem = "is not a directory" if file.parent.exists() else "does not exist"
        raise PromptCacheError(f"{file}: its directory {file.parent} {problem}")


def save_prompt_cache(file, prompt_cache, model, model_name=""):
    """Write `prompt_cache` (made with `model`) to the safetensors `file`, atomically."""
    check_cache_file(file)
    _write(file, prompt_cache.layers, prompt_cache.tokens, model, model_name, "all_but_last")


def load_prompt_cache(file, model):
    """The PromptCache in `file`; PromptCacheError if it is unreadable or from another model."""
    layers, tokens, fed = _read(file, model)
    if fed != "all_but_last":
        raise PromptCacheError(f"{file}: holds the state after all of its tokens (a server's "
                               "prefix cache file), not a prompt cache to resume")
    return PromptCache(layers, tokens)


def save_state(file, layers, fed, unfed, model, model_name="", messages=None):
    """Write `layers`, the state after the tokens `fed`, to `file`, atomically, with `unfed`:
    the conversation's tokens not fed yet (at most one: the file is then a prompt cache that
    `load_prompt_cache` resumes; with none it holds the state after all its tokens), and the
    chat `messages` they render (JSON in the metadata), for a chat session to resume."""
    if len(unfed) > 1:
        raise PromptCacheError(f"{len(unfed)} tokens not fed: a file keeps at most one")
    check_cache_file(file)
    extra = {} if messages is None else {"messages": json.dumps(messages)}
    _write(file, layers, list(fed) + list(unfed), model, model_name,
           "all_but_last" if unfed else "all", extra)


def load_state(file, model):
    """(layers, tokens fed, tokens not fed yet, chat messages or None) of a file written by
    save_state, save_prompt_cache or a server's prefix cache."""
    layers, tokens, fed = _read(file, model)
    try:
        messages = json.loads(_read_metadata(file)[1].get("messages", "null"))
    except ValueError:
        raise PromptCacheError(f"{file}: damaged prompt cache (its messages are not JSON)")
    if messages is not None and not (isinstance(messages, list) and
                                     all(isinstance(m, dict) for m in messages)):
        raise PromptCacheError(f"{file}: damaged prompt cache (its messages are not a list)")
    if fed == "all":
        return layers, tokens, [], messages
    return layers, tokens[:-1], tokens[-1:], messages


def _write(file, layers, tokens, model, model_name, fed, extra=None):
    """Write the per-layer `layers` and `tokens` to `file`, atomically; fed: "all_but_last" (a
    PromptCache) or "all" (a PrefixCache state); extra: more metadata (strings)."""
    arrays = {"tokens": mx.array(tokens, dtype=mx.int32)}
    for i, layer in enumerate(layers):
        if layer is not None:
            arrays.update({f"layers.{i}.{k}": v for k, v in layer.arrays().items()})
    metadata = {"format": FORMAT, "version": VERSION, "model": str(model_name),
                "config": json.dumps(state_config(model.config), sort_keys=True),
                "config_hash": config_hash(model.config),
                "token_count": str(len(tokens)), "fed": fed, **(extra or {})}
    if model.part:
        metadata["part"] = model.part
    replace_atomically(file, lambda f: save_safetensors(f, arrays, metadata))


def _read_metadata(file):
    file = Path(file)
    if not file.is_file():
        raise PromptCacheError(f"{file}: no such prompt cache file")
    try:
        arrays, metadata = mx.load(str(file), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises bare RuntimeError/ValueError for damaged files
        raise PromptCacheError(f"{file}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise PromptCacheError(f"{file}: not an mlx-mamba prompt cache (no '{FORMAT}' metadata)")
    if metadata.get("version") != VERSION:
        raise PromptCacheError(f"{file}: prompt cache version {metadata.get('version')!r}; this "
                               f"mlx-mamba reads version {VERSION}")
    return arrays, metadata


def _check_model(file, metadata, model):
    if metadata.get("config_hash") != config_hash(model.config):
        raise PromptCacheError(f"{file}: made by a model of another configuration "
                               f"({_differences(metadata.get('config'), model.config)})")
    if metadata.get("part", "") != model.part:
        raise PromptCacheError(f"{file}: holds the state of "
                               f"{metadata.get('part') or 'a whole model'}, not of this process's "
                               f"model ({model.part or 'whole'})")


def rank_file(file, group):
    """The file of this process's part of a sharded model's state: `name.rank{r}-of-{n}.ext`
    (`file` itself for a group of one)."""
    file = Path(file)
    if group is None or group.size() == 1:
        return file
    return file.with_name(f"{file.stem}.rank{group.rank()}-of-{group.size()}{file.suffix}")


def _read(file, model):
    """(per-layer caches, tokens, fed) from `file`, checked against `model`."""
    arrays, metadata = _read_metadata(file)
    _check_model(file, metadata, model)
    layers = model.make_cache(1)
    by_layer, names = {}, [n for n in arrays if n != "tokens"]
    for name in names:
        match = re.fullmatch(r"layers\.(\d+)\.([\w.]+)", name)
        if match:
            by_layer.setdefault(match.group(1), {})[match.group(2)] = arrays[name]
    expected = {str(i) for i, layer in enumerate(layers) if layer is not None}
    if "tokens" not in arrays or set(by_layer) != expected or \
            sum(map(len, by_layer.values())) != len(names):
        raise PromptCacheError(f"{file}: damaged prompt cache (unexpected or missing tensors)")
    for i, layer in enumerate(layers):
        if layer is not None:
            try:
                layer.restore(by_layer[str(i)])
            except ValueError as e:
                raise PromptCacheError(f"{file}: layer {i}: {e}") from None
    try:
        tokens = check_token_ids(arrays["tokens"], model.config.vocab_size)
    except TokenIdError as e:
        raise PromptCacheError(f"{file}: damaged prompt cache ({e})") from None
    fed = metadata.get("fed", "all_but_last")  # files from before PrefixCache have no "fed"
    if not tokens or str(len(tokens)) != metadata.get("token_count"):
        raise PromptCacheError(f"{file}: damaged prompt cache (token count does not match)")
    if fed not in ("all", "all_but_last"):
        raise PromptCacheError(f"{file}: damaged prompt cache (fed is {fed!r})")
    return layers, tokens, fed


@dataclasses.dataclass
class _Entry:
    tokens: np.ndarray  # (T,) int64: the state is after all of them
    layers: list
    nbytes: int


class PrefixCache:
    """States after token prefixes, in an LRU bounded in bytes: `add(tokens, layers)` keeps the
    state after `tokens`; `longest(tokens)` resumes from the longest kept prefix of `tokens`.

    With a directory, each state is also a file there (written atomically, removed when evicted)
    and a new PrefixCache reads back those of a previous run; a directory holding the states of
    another model is refused (PromptCacheError).
    """

    def __init__(self, model, max_bytes, directory=None, model_name="", group=None):
        """group: the processes of a sharded model (each holding its part of every state); a
        state's size is then the largest part over the group, so that every process keeps and
        evicts the same states."""
        self.model, self.max_bytes, self.model_name = model, max_bytes, model_name
        self.group = group
        self.directory = Path(directory) if directory is not None else None
        self.entries = collections.OrderedDict()  # prefix hash -> _Entry, least recent first
        self.lengths = collections.Counter()  # prefix length -> entries of that length
        self.nbytes = 0
        if self.directory is not None:
            self._read_directory()

    def __len__(self):
        return len(self.entries)

    def add(self, tokens, layers):
        """Keep (a copy of) `layers`, the per-layer caches (batch 1) after all of `tokens`."""
        key = _prefix_hash(tokens)
        if not tokens or key in self.entries:
            if key in self.entries:
                self.entries.move_to_end(key)
            return
        layers = [None if layer is None else layer.copy() for layer in layers]
        arrays = cache_state(layers)
        mx.eval(arrays)  # also lets go of whatever the arrays were computed from
        nbytes = sum(a.nbytes for a in arrays)
        if self.group is not None:
            nbytes = mx.distributed.all_max(mx.array(nbytes, mx.int64), group=self.group).item()
        entry = _Entry(np.asarray(tokens, np.int64), layers, nbytes)
        if entry.nbytes > self.max_bytes:
            return
        self._insert(key, entry)
        if self.directory is not None:
            _write(self._file(key), layers, tokens, self.model, self.model_name, "all")
        self._evict()

    def longest(self, tokens, limit=None):
        """(n, per-layer caches after tokens[:n]) for the longest kept prefix with
        n <= limit (default len(tokens)), or (0, None). The caches are the caller's to update."""
        best = self._longest_key(tokens, limit)
        if best is None:
            return 0, None
        self.entries.move_to_end(best)
        entry = self.entries[best]
        if self.directory is not None:  # the file's time orders the next run's LRU
            with contextlib.suppress(OSError):
                os.utime(self._file(best))
        return len(entry.tokens), [None if layer is None else layer.copy()
                                   for layer in entry.layers]

    def longest_length(self, tokens, limit=None):
        """The n that `longest` would give, without taking out the state."""
        best = self._longest_key(tokens, limit)
        return 0 if best is None else len(self.entries[best].tokens)

    def _longest_key(self, tokens, limit):
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        data = np.asarray(tokens[:limit], np.int64)
        hasher, hashed, best = hashlib.blake2b(digest_size=16), 0, None
        for length in sorted(n for n in self.lengths if n <= limit):
            hasher.update(data[hashed:length].tobytes())
            hashed = length
            entry = self.entries.get(hasher.copy().hexdigest())
            if entry is not None and np.array_equal(entry.tokens, data[:length]):
                best = hasher.copy().hexdigest()
        return best

    def _insert(self, key, entry):
        self.entries[key] = entry
        self.lengths[len(entry.tokens)] += 1
        self.nbytes += entry.nbytes

    def _evict(self):
        while self.nbytes > self.max_bytes:
            key, entry = self.entries.popitem(last=False)
            self.nbytes -= entry.nbytes
            self.lengths[len(entry.tokens)] -= 1
            if not self.lengths[len(entry.tokens)]:
                del self.lengths[len(entry.tokens)]
            if self.directory is not None:
                self._file(key).unlink(missing_ok=True)

    def _file(self, key):
        return self.directory / f"{key}.safetensors"

    def _read_directory(self):
        """Take back the states a previous run left, newest first while they fit."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PromptCacheError(f"{self.directory}: cannot make the prompt cache directory "
                                   f"({e.strerror})") from None
        for partial in self.directory.glob(".tmp-*.safetensors"):
            if re.fullmatch(r"\.tmp-\d+-[0-9a-f]{32}\.safetensors", partial.name):
                partial.unlink()  # a write that a crash interrupted (see replace_atomically)
        files = [f for f in self.directory.glob("*.safetensors")
                 if re.fullmatch(r"[0-9a-f]{32}\.safetensors", f.name)]
        for file in files:  # refuse another model's directory before touching any of it
            try:
                _, metadata = _read_metadata(file)
            except PromptCacheError:
                continue  # damaged: dropped below
            try:
                _check_model(file, metadata, self.model)
            except PromptCacheError as e:
                raise PromptCacheError(f"{self.directory} holds the prompt cache of another "
                                       f"model: {e}") from None
        kept = []
        for file in sorted(files, key=lambda f: f.stat().st_mtime, reverse=True):
            try:
                layers, tokens, fed = _read(file, self.model)
                tokens = tokens if fed == "all" else tokens[:-1]
                if _prefix_hash(tokens) != file.stem:
                    raise PromptCacheError(f"{file}: damaged prompt cache (name and tokens "
                                           "differ)")
            except PromptCacheError as e:
                logging.getLogger(__name__).warning("removing %s", e)
                file.unlink()
                continue
            arrays = cache_state(layers)
            mx.eval(arrays)
            nbytes = sum(a.nbytes for a in arrays)
            if nbytes > self.max_bytes - sum(entry.nbytes for _, entry in kept):
                file.unlink()  # does not fit any more (a smaller budget than last time)
                continue
            kept.append((file.stem, _Entry(np.asarray(tokens, np.int64), layers, nbytes)))
        for key, entry in reversed(kept):  # least recent first
            self._insert(key, entry)


def _prefix_hash(tokens):
    return hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=16).hexdigest()


def _differences(saved_json, config):
    try:
        saved = json.loads(saved_json)
    except (TypeError, json.JSONDecodeError):
        return "its recorded config is unreadable"
    ours = state_config(config)
    diffs = [f"{k} {saved.get(k)!r} there, {ours[k]!r} here"
             for k in ours if saved.get(k) != ours[k]]
    return "; ".join(diffs) or "config hash differs"
