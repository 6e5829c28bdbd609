"""Per-layer decoding state. Every cache answers the same operations, so generation, the prompt
cache and the tuner never ask which kind of layer it belongs to:
`batch_size`, `state` (arrays to evaluate), `keep(rows)` (drop finished batch rows),
`merge(caches)` (one batch from the rows of several), `copy()`, `arrays()` and `restore(arrays)`
(save to and load from a file), `mark()` and `rewind(n)` (go back n tokens, see below).
Layers without state (MLP, MoE) have None.

Rewinding (speculative decoding): after `mark()`, a Mamba cache keeps its state after every
token it sees (its `trail`), and the mixers run a marked cache's window token by token through
the decode step's recurrence (projections stay parallel), so `rewind(n)` only picks a kept state:
no recompute. n is an int or one count per batch row. A rewind starts a new trail at the state it
leaves. The trail costs one state (SSM state + conv window, or Mamba-3's angles, state, k and v)
per token since the mark or the last rewind. KV caches rewind by trimming, and pack their rows
again when rows go back by different counts.
"""

import mlx.core as mx


class MambaCache:
    """A Mamba layer's state. conv (B, K-1, C): the conv's last inputs; ssm: the SSM state in
    float32, (B, E, N) for Mamba1 and (B, H, P, N) for Mamba2. Constant size; updated in place."""

    def __init__(self, conv, ssm):
        self.conv = conv
        self.ssm = ssm
        self.trail = None  # after mark(): the state after each token since the mark

    @classmethod
    def zeros(cls, batch_size, conv_width, conv_channels, ssm_shape, dtype=mx.float32):
        return cls(mx.zeros((batch_size, conv_width, conv_channels), dtype=dtype),
                   mx.zeros((batch_size, *ssm_shape), dtype=mx.float32))

    @property
    def batch_size(self):
        return self.conv.shape[0]

    @property
    def state(self):
        return [self.conv, self.ssm]

    @state.setter
    def state(self, arrays):
        self.conv, self.ssm = arrays

    def keep(self, rows):
        self.conv, self.ssm = self.conv[rows], self.ssm[rows]
        _keep_trail(self, rows)

    @classmethod
    def merge(cls, caches):
        return _merged_trail(cls(mx.concatenate([c.conv for c in caches]),
                                 mx.concatenate([c.ssm for c in caches])), caches)

    def copy(self):
        """The state alone: a copy is not rewindable."""
        return MambaCache(self.conv, self.ssm)

    def mark(self):
        self.trail = [self.state]

    def remember(self):
        """Called by the mixers after each token."""
        if self.trail is not None:
            self.trail.append(self.state)

    def rewind(self, n):
        _rewind_trail(self, n)

    def arrays(self):
        return {"conv": self.conv, "ssm": self.ssm}

    def restore(self, arrays):
        """Take saved `arrays` in place of this (fresh, batch 1) cache's, checking their shapes."""
        _check_names(arrays, {"conv", "ssm"})
        for name, fresh in self.arrays().items():
            if arrays[name].shape != fresh.shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, this model needs "
                                 f"{fresh.shape}")
        self.conv = arrays["conv"].astype(self.conv.dtype)
        self.ssm = arrays["ssm"].astype(mx.float32)


class Mamba3Cache:
    """A Mamba-3 layer's state, in the official layout: angle (B, H, S), the rotation angles
    accumulated so far (mod 2π); ssm (B, H, P, N); k (B, R, H, N) and v (B, H, P), the last
    token's key (B after norm, bias and rotation) and raw x, which the trapezoid's next step
    needs. All float32; zero at a sequence's start (the first token has no predecessor)."""

    def __init__(self, angle, ssm, k, v):
        self.angle, self.ssm, self.k, self.v = angle, ssm, k, v
        self.trail = None  # after mark(): the state after each token since the mark

    @classmethod
    def zeros(cls, batch_size, heads, head_dim, d_state, rank, angles):
        zeros = lambda *shape: mx.zeros((batch_size, *shape), dtype=mx.float32)  # noqa: E731
        return cls(zeros(heads, angles), zeros(heads, head_dim, d_state),
                   zeros(rank, heads, d_state), zeros(heads, head_dim))

    @property
    def batch_size(self):
        return self.ssm.shape[0]

    @property
    def state(self):
        return [self.angle, self.ssm, self.k, self.v]

    @state.setter
    def state(self, arrays):
        self.angle, self.ssm, self.k, self.v = arrays

    def keep(self, rows):
        self.state = [a[rows] for a in self.state]
        _keep_trail(self, rows)

    @classmethod
    def merge(cls, caches):
        merged = cls(*(mx.concatenate(arrays) for arrays in zip(*(c.state for c in caches))))
        return _merged_trail(merged, caches)

    def copy(self):
        """The state alone: a copy is not rewindable."""
        return Mamba3Cache(*self.state)

    mark, remember, rewind = MambaCache.mark, MambaCache.remember, MambaCache.rewind

    def arrays(self):
        return dict(zip(("angle", "ssm", "k", "v"), self.state))

    def restore(self, arrays):
        """Take saved `arrays` in place of this (fresh, batch 1) cache's, checking their shapes."""
        _check_names(arrays, {"angle", "ssm", "k", "v"})
        for name, fresh in self.arrays().items():
            if arrays[name].shape != fresh.shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, this model needs "
                                 f"{fresh.shape}")
        self.state = [arrays[name].astype(mx.float32) for name in ("angle", "ssm", "k", "v")]


def rewind_counts(n, batch_size, limits):
    """n (an int, or one int per row) checked against `limits` (an int or a list, per row):
    an int when every row goes back the same count, else a list."""
    counts = [n] * batch_size if isinstance(n, int) else \
        (n.tolist() if isinstance(n, mx.array) else list(n))
    limits = [limits] * batch_size if isinstance(limits, int) else limits
    if len(counts) != batch_size or not all(isinstance(c, int) for c in counts):
        raise ValueError(f"rewind takes an int or {batch_size} ints (one per row), not {n!r}")
    for count, limit in zip(counts, limits):
        if not 0 <= count <= limit:
            raise ValueError(f"cannot rewind {count} tokens: the cache can go back 0 to {limit}")
    return counts[0] if len(set(counts)) == 1 else counts


def _rewind_trail(cache, n):
    if cache.trail is None:
        raise ValueError("this cache keeps no trail: call mark() before the tokens to rewind")
    seen = len(cache.trail) - 1
    counts = rewind_counts(n, cache.batch_size, seen)
    if isinstance(counts, int):
        cache.state = cache.trail[seen - counts]
    else:
        index = mx.array([seen - c for c in counts])
        cache.state = [_per_row(mx.stack(arrays, axis=1), index)
                       for arrays in zip(*cache.trail)]
    cache.trail = [cache.state]


def _per_row(stacked, index):
    # stacked (B, T, ...), index (B,) -> (B, ...): row b's entry index[b].
    index = index.reshape(-1, *[1] * (stacked.ndim - 1))
    return mx.take_along_axis(stacked, index, axis=1).squeeze(1)


def _keep_trail(cache, rows):
    if cache.trail is not None:
        cache.trail = [[a[rows] for a in state] for state in cache.trail]


def _merged_trail(merged, caches):
    """A merge of marked caches is marked afresh (at the merged state)."""
    if all(c.trail is not None for c in caches):
        merged.mark()
    return merged


class KVCache:
    """An attention layer's keys and values, (B, H_kv, S, head_dim), grown `STEP` positions at a
    time rather than per token. `length` positions are filled. `valid` (B, S) marks the keys
    that are real tokens (None while no row was ever padded); `positions` (B,) counts each row's
    real tokens, which is where its next token's RoPE position starts."""

    STEP = 256

    def __init__(self, batch_size, kv_heads, head_dim):
        self.shape = (batch_size, kv_heads, 0, head_dim)
        self.keys = self.values = None
        self.length = 0
        self.valid = None
        self.positions = mx.zeros((batch_size,), dtype=mx.int32)

    def update(self, keys, values, mask=None):
        """Append (B, H_kv, T, head_dim) keys and values, and mask (B, T) (0 on padding);
        returns every key and value so far and the key mask (None when all are real).
        Updates are functional (slice_update), so a `copy` never sees the original's changes."""
        batch, _, count, _ = keys.shape
        end = self.length + count
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(-(-end // self.STEP) * self.STEP, keys.dtype)
        start = mx.array([self.length])
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        if mask is not None and self.valid is None:
            self.valid = mx.broadcast_to(mx.arange(self.keys.shape[2]) < self.length,
                                         (batch, self.keys.shape[2]))
        if self.valid is not None:
            real = mx.ones((batch, count), mx.bool_) if mask is None else mask.astype(mx.bool_)
            self.valid = mx.slice_update(self.valid, real, start, axes=(1,))
        self.positions = self.positions + (count if mask is None
                                           else mask.astype(mx.int32).sum(axis=1))
        self.length = end
        return (self.keys[..., :end, :], self.values[..., :end, :],
                None if self.valid is None else self.valid[:, :end])

    def _grow(self, size, dtype):
        """Reallocate for `size` positions, keeping the `length` filled ones."""
        _, heads, _, head_dim = self.shape
        batch = self.positions.shape[0]

        def resized(old, shape, axis):  # axis: the positions axis
            fresh = mx.zeros(shape, dtype if old is None else old.dtype)
            if old is None:
                return fresh
            kept = mx.split(old, [self.length], axis=axis)[0]
            return mx.slice_update(fresh, kept, mx.array([0]), axes=(axis,))

        self.keys = resized(self.keys, (batch, heads, size, head_dim), 2)
        self.values = resized(self.values, (batch, heads, size, head_dim), 2)
        if self.valid is not None:
            self.valid = resized(self.valid, (batch, size), 1)

    @property
    def batch_size(self):
        return self.positions.shape[0]

    @property
    def state(self):
        arrays = [self.positions]
        if self.keys is not None:
            arrays += [self.keys, self.values]
        return arrays + ([self.valid] if self.valid is not None else [])

    def keep(self, rows):
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]
        if self.valid is not None:
            self.valid = self.valid[rows]
            self._drop_shared_padding()
        self.positions = self.positions[rows]

    def _drop_shared_padding(self):
        """Drop the leading positions that are padding in every row, so that a batch does not
        keep attending over the padding of a longer row that has left."""
        used = self.valid[:, :self.length].any(axis=0)  # (S,)
        unused = int(mx.argmax(used).item()) if mx.any(used).item() else self.length
        if unused:
            self.keys, self.values = self.keys[..., unused:, :], self.values[..., unused:, :]
            self.valid = self.valid[:, unused:]
            self.length -= unused

    def mark(self):
        """Nothing to do: keys and values are kept anyway."""

    def rewind(self, n):
        """Forget each row's last n keys (n an int or a count per row). Rows going back by
        different counts are packed again: each row's kept keys end at the last position, left
        padding (masked out in `valid`) before them, as `merge` lays rows out."""
        counts = rewind_counts(n, self.batch_size, self.positions.tolist())
        if isinstance(counts, int):
            self.positions = self.positions - counts
            self.length -= counts
            return
        index = mx.arange(self.length)[None]
        kept = index < self.length - mx.array(counts)[:, None]  # (B, S)
        if self.valid is not None:
            kept = kept & self.valid[:, :self.length]
        sizes = kept.astype(mx.int32).sum(axis=1)
        length = int(sizes.max().item())
        # Each row's kept positions in order, last: padding sorts first (its keys go below 0).
        order = mx.argsort(mx.where(kept, index, index - self.length), axis=1)
        order = order[:, self.length - length:]
        self.keys, self.values = (mx.take_along_axis(a[..., :self.length, :],
                                                     order[:, None, :, None], axis=2)
                                  for a in (self.keys, self.values))
        self.valid = mx.arange(length)[None] >= (length - sizes)[:, None]
        self.positions = self.positions - mx.array(counts, mx.int32)
        self.length = length

    @classmethod
    def merge(cls, caches):
        """The rows of `caches` in one cache: each is left-padded to the longest, its padding
        marked invalid (keys carry their RoPE already, and `positions` stay each row's own)."""
        first = caches[0]
        merged = cls(sum(c.batch_size for c in caches), first.shape[1], first.shape[3])
        merged.positions = mx.concatenate([c.positions for c in caches])
        merged.length = max(c.length for c in caches)
        if merged.length == 0:
            return merged
        dtype = next(c.keys.dtype for c in caches if c.keys is not None)
        keys, values, valid = [], [], []
        for c in caches:
            pad = merged.length - c.length
            held = c.arrays()
            empty = mx.zeros((c.batch_size, first.shape[1], 0, first.shape[3]), dtype)
            keys.append(mx.pad(held.get("keys", empty), [(0, 0), (0, 0), (pad, 0), (0, 0)]))
            values.append(mx.pad(held.get("values", empty), [(0, 0), (0, 0), (pad, 0), (0, 0)]))
            real = held.get("valid", mx.ones((c.batch_size, c.length), mx.bool_))
            valid.append(mx.pad(real, [(0, 0), (pad, 0)]))  # padding is False
        merged.keys, merged.values = mx.concatenate(keys), mx.concatenate(values)
        if any(c.length < merged.length or c.valid is not None for c in caches):
            merged.valid = mx.concatenate(valid)
        return merged

    def copy(self):
        other = KVCache.__new__(KVCache)
        other.__dict__.update(self.__dict__)
        return other  # arrays are immutable: updates replace them, never write into them

    def arrays(self):
        arrays = {"positions": self.positions}
        if self.keys is not None:
            arrays["keys"] = self.keys[..., :self.length, :]
            arrays["values"] = self.values[..., :self.length, :]
        if self.valid is not None:
            arrays["valid"] = self.valid[:, :self.length]
        return arrays

    def restore(self, arrays):
        _check_names(arrays, {"positions"}, {"keys", "values", "valid"})
        batch, heads, _, head_dim = self.shape
        if arrays["positions"].shape != (batch,):
            raise ValueError(f"positions has shape {arrays['positions'].shape}, "
                             f"expected ({batch},)")
        if ("keys" in arrays) != ("values" in arrays):
            raise ValueError("keys and values must be saved together")
        self.positions = arrays["positions"].astype(mx.int32)
        if "keys" in arrays:
            keys, values = arrays["keys"], arrays["values"]
            length = keys.shape[2] if keys.ndim == 4 else -1
            for name, value in (("keys", keys), ("values", values)):
                if value.shape != (batch, heads, length, head_dim):
                    raise ValueError(f"{name} has shape {value.shape}, this model needs "
                                     f"{(batch, heads, 'S', head_dim)}")
            valid = arrays.get("valid")
            if valid is not None and valid.shape != (batch, length):
                raise ValueError(f"valid has shape {valid.shape}, expected {(batch, length)}")
            self.update(keys, values.astype(keys.dtype), valid)
            self.positions = arrays["positions"].astype(mx.int32)
        elif "valid" in arrays:
            raise ValueError("valid without keys")
        if not mx.all((self.positions >= 0) & (self.positions <= self.length)).item():
            raise ValueError(f"positions {self.positions.tolist()} are outside 0..{self.length}")


def _check_names(arrays, required, optional=()):
    names = set(arrays)
    if not required <= names or not names <= required | set(optional):
        raise ValueError(f"holds {sorted(names)}, expected {sorted(required)}"
                         + (f" and optionally {sorted(optional)}" if optional else ""))


def cache_state(cache):
    """Every array of a model's per-layer cache list, for mx.eval."""
    return [a for layer in cache if layer is not None for a in layer.state]


def mark(cache):
    """Make every layer of a model's cache rewindable from here (see the module's docstring)."""
    for layer in cache:
        if layer is not None:
            layer.mark()


def rewind(cache, n):
    """Take every layer of a model's cache back n tokens (an int, or a count per row)."""
    for layer in cache:
        if layer is not None:
            layer.rewind(n)


def merge_caches(caches):
    """One per-layer cache list holding the rows of several (each from `model.make_cache`), in
    order: sequences of any lengths decode together as they would alone."""
    return [None if layers[0] is None else type(layers[0]).merge(layers)
            for layers in zip(*caches)]


def cache_rows(cache, rows):
    """A per-layer cache list of only `rows` (an index array) of `cache`, which is unchanged."""
    taken = [None if layer is None else layer.copy() for layer in cache]
    for layer in taken:
        if layer is not None:
            layer.keep(rows)
    return taken


class LayerCaches:
    """The caches of a layer made of several stateful parts (Falcon-H1's parallel Mamba and
    attention), by name; answers the same operations, arrays named `{part}.{array}`."""

    def __init__(self, **parts):
        self.parts = parts

    def __getattr__(self, name):
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(name)

    @property
    def batch_size(self):
        return next(iter(self.parts.values())).batch_size

    @property
    def state(self):
        return [a for part in self.parts.values() for a in part.state]

    def keep(self, rows):
        for part in self.parts.values():
            part.keep(rows)

    def mark(self):
        for part in self.parts.values():
            part.mark()

    def rewind(self, n):
        for part in self.parts.values():
            part.rewind(n)

    @classmethod
    def merge(cls, caches):
        return cls(**{k: type(part).merge([c.parts[k] for c in caches])
                      for k, part in caches[0].parts.items()})

    def copy(self):
        return LayerCaches(**{k: v.copy() for k, v in self.parts.items()})

    def arrays(self):
        return {f"{k}.{name}": a for k, part in self.parts.items()
                for name, a in part.arrays().items()}

    def restore(self, arrays):
        for k, part in self.parts.items():
            mine = {name[len(k) + 1:]: a for name, a in arrays.items() if name.startswith(k + ".")}
            try:
                part.restore(mine)
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
        unknown = [n for n in arrays if n.split(".")[0] not in self.parts]
        if unknown:
            raise ValueError(f"unexpected array {unknown[0]!r}")
