"""Log-likelihoods of continuations after contexts, as evaluation asks for them: requests that
share a context prefill it once and continue copies of its state.

A request is (context ids, continuation ids), each non-empty. As lm-evaluation-harness does, the
model reads the last `max_length` tokens before each scored token: the input is
(context + continuation)[-(max_length + 1):][:-1], and the logits of its last len(continuation)
positions score the continuation. What comes before those positions (the prefix: the context
but its last token, cut to the window) only sets the state, so it is fed without logits.

Shared-context reuse: requests whose prefixes are equal are grouped; each group's prefix is
prefilled once, and each of its requests continues a copy of that state (a Mamba layer's state
is a few fixed-size arrays; an attention layer's keys and values are immutable arrays, so
copies share them). Without reuse, every request prefills its own prefix. Either way up to
`batch_size` prefixes are prefilled together (left-padded and masked), then up to `batch_size`
continuations are scored together (right-padded: the model is causal, so padding after a row's
last token changes none of its logits).
"""

import mlx.core as mx
import numpy as np

from .cache import cache_rows, cache_state
from .prompt_cache import prefill
from .token_ids import TokenIdError, check_token_ids

LOGITS_BYTES = 1 << 28  # float32 logits held at once: continuations are fed in chunks under this


class ScoringError(ValueError):
    """A request that cannot be scored; the message says which and why."""


def _split(context, continuation, max_length, vocab_size, index):
    """(prefix, fed tokens, targets) of one request: the prefix only sets the state."""
    try:
        context = check_token_ids(context, vocab_size)
        continuation = check_token_ids(continuation, vocab_size)
    except TokenIdError as e:
        raise ScoringError(f"request {index}: {e}") from None
    if not context or not continuation:
        raise ScoringError(f"request {index}: the context and the continuation need a token each "
                           f"(they have {len(context)} and {len(continuation)})")
    if len(continuation) > max_length:
        raise ScoringError(f"request {index}: its continuation has {len(continuation)} tokens, "
                           f"more than the max length ({max_length})")
    whole = (context + continuation)[-(max_length + 1):]
    n = len(continuation)
    return tuple(whole[:-n - 1]), whole[-n - 1:-1], whole[-n:]


def continuation_logprobs(model, requests, *, batch_size=8, max_length=2048, reuse=True,
                          progress=None):
    """[(log-probability, is_greedy)] of each (context ids, continuation ids) in `requests`:
    the sum of the continuation's token log-probabilities (float32 log-softmax, summed in
    float64), and whether each of its tokens is the argmax of its logits.

    reuse: prefill a context shared by several requests once (the results are the same).
    progress(n): called after each batch with the number of requests it scored.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ScoringError(f"batch size {batch_size!r}: expected a positive integer")
    if not (isinstance(max_length, int) and max_length >= 1):
        raise ScoringError(f"max length {max_length!r}: expected a positive integer")
    split = [_split(c, t, max_length, model.config.vocab_size, i)
             for i, (c, t) in enumerate(requests)]
    groups = {}  # prefix (or, without reuse, request index) -> indices of its requests
    for i, (prefix, _, _) in enumerate(split):
        groups.setdefault(prefix if reuse else i, []).append(i)
    # Longest prefixes first: prefixes of like lengths are prefilled together (little padding).
    order = sorted(groups.values(), key=lambda g: -len(split[g[0]][0]))
    results = [None] * len(split)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            wave = order[start:start + batch_size]
            cache = model.make_cache(len(wave))
            prefill(model, [list(split[g[0]][0]) for g in wave], cache)
            rows = sorted(((w, i) for w, g in enumerate(wave) for i in g),
                          key=lambda row: -len(split[row[1]][1]))
            for first in range(0, len(rows), batch_size):
                batch = rows[first:first + batch_size]
                states = cache_rows(cache, mx.array([w for w, _ in batch]))
                scored = _score(model, states, [split[i][1:] for _, i in batch])
                for (_, i), result in zip(batch, scored):
                    results[i] = result
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return results


def _score(model, cache, rows):
    """[(log-probability, is_greedy)] of rows of (fed tokens, targets), continuing `cache`."""
    width = max(len(fed) for fed, _ in rows)
    fed = mx.array([f + [0] * (width - len(f)) for f, _ in rows])  # (B, T), right-padded
    targets = mx.array([t + [0] * (width - len(t)) for _, t in rows])
    real = mx.arange(width)[None] < mx.array([len(t) for _, t in rows])[:, None]  # (B, T)
    chunk = max(1, LOGITS_BYTES // (4 * model.config.vocab_size * len(rows)))
    logprobs, greedy = [], []
    for t in range(0, width, chunk):
        logits = model(fed[:, t:t + chunk], cache).astype(mx.float32)  # (B, chunk, V)
        wanted = targets[:, t:t + chunk]
        picked = mx.take_along_axis(logits, wanted[..., None], axis=-1)[..., 0]
        logprobs.append(picked - mx.logsumexp(logits, axis=-1))
        greedy.append(mx.argmax(logits, axis=-1) == wanted)
        mx.eval(logprobs[-1], greedy[-1], cache_state(cache))
    logprobs = np.array(mx.concatenate(logprobs, axis=1), np.float64)
    greedy = np.array(mx.concatenate(greedy, axis=1) | ~real)
    real = np.array(real)
    return [(float(logprobs[b][real[b]].sum()), bool(greedy[b].all())) for b in range(len(rows))]
