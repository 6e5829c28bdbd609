"""Choosing the next token: samplers (logits -> token ids) and logits processors.

A sampler maps logits (B, V) to token ids (B,). A logits processor maps (tokens so far (T,),
logits (1, V)) to logits (1, V), the signature mlx-lm uses, so its processors work here too.
The filters follow transformers' order: temperature, then top-k, top-p, min-p.
"""

import math

import mlx.core as mx

MAX_SEED = 2**64 - 1  # MLX's random keys take unsigned 64-bit seeds


class SamplerError(ValueError):
    """A sampling setting out of its range; the message names the setting."""


def check_settings(temp=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None, seed=None):
    """Raise SamplerError naming the first setting outside its range."""
    if not (isinstance(temp, (int, float)) and math.isfinite(temp) and temp >= 0):
        raise SamplerError(f"temp is {temp!r}: expected a number >= 0 (0 is greedy)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise SamplerError(f"top_p is {top_p!r}: expected a number in (0, 1]")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise SamplerError(f"top_k is {top_k!r}: expected an integer >= 0 (0 keeps every token)")
    if not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        raise SamplerError(f"min_p is {min_p!r}: expected a number in [0, 1]")
    if repetition_penalty is not None and not (
            isinstance(repetition_penalty, (int, float)) and math.isfinite(repetition_penalty)
            and repetition_penalty > 0):
        raise SamplerError(f"repetition_penalty is {repetition_penalty!r}: expected a number > 0")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise SamplerError(f"seed is {seed!r}: expected an integer from 0 to {MAX_SEED}")


def apply_top_k(logits, k):
    """Keep the k largest logits per row (exactly k; ties broken arbitrarily), -inf elsewhere."""
    if k >= logits.shape[-1]:
        return logits
    dropped = mx.argpartition(-logits, k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, dropped, mx.array(-mx.inf, logits.dtype), axis=-1)


def apply_top_p(logits, p):
    """Keep the smallest set of most likely tokens whose mass reaches p, -inf elsewhere."""
    order = mx.argsort(-logits, axis=-1)
    probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
    keep_sorted = (mx.cumsum(probs, axis=-1) - probs) < p  # the mass before a token is short of p
    keep = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def apply_min_p(logits, p):
    """Keep the tokens at least p times as likely as the most likely one, -inf elsewhere."""
    threshold = logits.max(axis=-1, keepdims=True) + math.log(p)
    return mx.where(logits >= threshold, logits, -mx.inf)


def apply_token_mask(logits, words):
    """Logits (B, V) with -inf where a token is not allowed; words (B, ceil(V / 32)) uint32: bit
    i % 32 of word i // 32 says whether token i is allowed (llguidance's bitmask layout)."""
    bits = (words[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1  # (B, W, 32)
    allowed = bits.reshape(words.shape[0], -1)[:, :logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-mx.inf, logits.dtype))


class Sampler:
    """logits (B, V) -> token ids (B,): greedy at temp 0, else a draw from softmax(logits / temp)
    after the top-k, top-p and min-p filters (see `make_sampler`). Speculative decoding also asks
    it for `distribution` (what a token is drawn from) and draws `uniform` numbers and tokens
    (`draw`) from the same key stream."""

    def __init__(self, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None):
        check_settings(temp, top_p, top_k, min_p, seed=seed)
        self.temp, self.top_p, self.top_k, self.min_p = temp, top_p, top_k, min_p
        self.key = mx.random.key(seed) if seed is not None else None

    def _filtered(self, logits):
        logits = logits.astype(mx.float32) / self.temp
        if self.top_k:
            logits = apply_top_k(logits, self.top_k)
        if self.top_p < 1:
            logits = apply_top_p(logits, self.top_p)
        if self.min_p > 0:
            logits = apply_min_p(logits, self.min_p)
        return logits

    def _noise(self, draw, shape):
        """Noise of `shape` from `draw`: with a seed, one draw of the key stream shared by the
        rows (the first axis), so a sequence gets the same draws alone or in any batch."""
        if self.key is None:
            return draw(shape)
        self.key, key = mx.random.split(self.key)
        return draw((1, *shape[1:]), key=key)

    def __call__(self, logits):
        if self.temp == 0:
            return mx.argmax(logits, axis=-1)
        return self.draw(self._filtered(logits))

    def distribution(self, logits):
        """(..., V) -> the log-probabilities (..., V) that a token is drawn from: one token
        (0, else -inf) at temp 0."""
        if self.temp == 0:
            best = mx.argmax(logits, axis=-1, keepdims=True)
            return mx.where(mx.arange(logits.shape[-1]) == best, 0.0, -mx.inf)
        logits = self._filtered(logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def draw(self, logprobs):
        """(B, V) -> (B,): a token drawn from unnormalised log-probabilities."""
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1)
        noise = self._noise(mx.random.gumbel, logprobs.shape)
        return mx.argmax(logprobs + noise, axis=-1)  # Gumbel-max: a draw from softmax

    def uniform(self, shape):
        """Numbers in [0, 1) of `shape` (B, ...); zeros at temp 0, which draws nothing."""
        if self.temp == 0:
            return mx.zeros(shape)
        return self._noise(lambda shape, key=None: mx.random.uniform(shape=shape, key=key), shape)


greedy = Sampler()


def make_sampler(temp=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None):
    """A Sampler (B, V) -> (B,): greedy at temp 0, else a draw from softmax(logits / temp) after
    the top-k, top-p and min-p filters.

    With a seed each call draws one noise vector from its own key stream and shares it across the
    rows of the batch: a prompt then gets the same tokens alone or in any batch. Without one,
    rows draw independently from MLX's global generator.
    """
    check_settings(temp, top_p, top_k, min_p, seed=seed)
    return greedy if temp == 0 else Sampler(temp, top_p, top_k, min_p, seed)


def make_repetition_penalty(penalty, context_size=None):
    """The CTRL paper's penalty, as transformers applies it: the logits of tokens already seen
    (the last `context_size` of them, or all) are divided by `penalty` when positive and
    multiplied by it when negative."""
    check_settings(repetition_penalty=penalty)

    def process(tokens, logits):
        seen = (tokens[-context_size:] if context_size else tokens)[None]  # (1, T)
        values = mx.take_along_axis(logits, seen, axis=-1)
        values = mx.where(values < 0, values * penalty, values / penalty)
        return mx.put_along_axis(logits, seen, values, axis=-1)

    return process


def make_logits_processors(repetition_penalty=None, logits_processors=None):
    """The repetition penalty (when set) followed by the caller's own processors."""
    processors = [make_repetition_penalty(repetition_penalty)] if repetition_penalty else []
    return processors + list(logits_processors or [])
