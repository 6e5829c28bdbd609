"""Speculative decoding: a drafter proposes k tokens per sequence, the model checks them all in
one forward over the k + 1 positions, and keeps the longest prefix that rejection sampling
(Leviathan et al., 2023; Chen et al., 2023) accepts, plus one token of its own. The text is the
model's: token for token at temp 0, in distribution when sampling. The caches go back over the
rejected tokens with `rewind` (see cache.py), so nothing is recomputed.

Two drafters: `DraftModel`, a smaller model with the same token ids (any family, or a quantized
copy of the model), and `PromptLookup`, which proposes what followed the latest earlier match of
the context's last n-gram (no second model: helps where the output copies its input).
"""

import dataclasses

import mlx.core as mx

from .cache import cache_state, mark, merge_caches, rewind
from .prompt_cache import PREFILL_STEP_SIZE, prefill

MAX_DRAFT_TOKENS = 64


class DraftError(ValueError):
    """A drafting setting or draft model that cannot be used; the message says which."""


@dataclasses.dataclass
class DraftStats:
    proposed: int = 0  # draft tokens checked by the model
    accepted: int = 0  # of those, the tokens it kept
    passes: int = 0  # forwards of the model over a batch: one per round

    @property
    def acceptance(self):
        return self.accepted / self.proposed if self.proposed else 0.0


def check_num_draft_tokens(k):
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_DRAFT_TOKENS):
        raise DraftError(f"num_draft_tokens is {k!r}: expected an integer from 1 to "
                         f"{MAX_DRAFT_TOKENS}")


def check_same_tokenizer(tokenizer, draft_tokenizer):
    """Raise DraftError unless both tokenizers give every token the same id (a model's embedding
    may still be padded to another size than its draft's)."""
    ours, theirs = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if ours != theirs:
        differs = sorted(set(ours.items()) ^ set(theirs.items()), key=str)[0][0]
        raise DraftError(f"the draft model's tokenizer differs from the model's (token "
                         f"{differs!r} is {ours.get(differs)} in the model's and "
                         f"{theirs.get(differs)} in the draft's): speculative decoding needs "
                         "the same token ids")


def processed(row, history, logits):
    """logits (1, V) through the row's processors, after `history` (T,)."""
    for process in row.processors:
        logits = process(history, logits)
    return logits


def per_sampler(rows, compute):
    """compute(sampler, indices (n,)) -> arrays with n rows, for the rows of each sampler; the
    results in row order (rows sharing a sampler share its calls, and a seeded one's draws)."""
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.sampler, []).append(i)
    if len(groups) == 1:
        return compute(rows[0].sampler, None)
    parts = [compute(sampler, mx.array(indices)) for sampler, indices in groups.items()]
    order = mx.argsort(mx.array([i for indices in groups.values() for i in indices]))
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(p)[order] for p in zip(*parts))
    return mx.concatenate(parts)[order]


def accepts(u, log_p, log_q):
    """Whether a draft is kept: u < p(d) / q(d), u uniform in [0, 1)."""
    return mx.log(u) < log_p - log_q


def residual(p, q):
    """Where a rejected position draws from: max(p - q, 0) (normalised by the draw)."""
    return mx.maximum(p - q, 0.0)


def verify(sampler, logp, logq, drafts, lengths, width):
    """Rejection sampling of one round. logp (n, k+1, V): the model's distributions at each
    position (`sampler.distribution`); logq (n, k, V): the drafter's, from which drafts (n, k)
    were drawn; lengths (n,): how many of each row's drafts are real (the rest are padding);
    width >= k: the uniform numbers drawn (a fixed count, so that a seeded row gets the same
    draws whatever its batch proposes).

    Returns (accepted (n,), token (n,)): draft d_j is kept while u_j < p(d_j) / q(d_j); the token
    after the kept ones is drawn from max(p - q, 0) at the first rejection, from p after them all.
    """
    n, k = drafts.shape
    rows = mx.arange(n)
    u = sampler.uniform((n, width))[:, :k]  # drawn even for k = 0, for the same reason
    if k:
        p_d = mx.take_along_axis(logp[:, :k], drafts[..., None], axis=-1)[..., 0]
        q_d = mx.take_along_axis(logq, drafts[..., None], axis=-1)[..., 0]
        ok = accepts(u, p_d, q_d) & (mx.arange(k) < lengths[:, None])
        accepted = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)
        q = mx.exp(logq[rows, mx.minimum(accepted, k - 1)])
        q = mx.where((accepted < lengths)[:, None], q, 0.0)  # after every draft: q = 0
    else:
        accepted, q = mx.zeros((n,), mx.int32), 0.0
    p = mx.exp(logp[rows, accepted])
    left = residual(p, q)
    left = mx.where(left.sum(axis=-1, keepdims=True) > 0, left, p)  # p = q: nothing rejected
    return accepted, sampler.draw(mx.log(left))


class DraftModel:
    """Drafts with `model` (same token ids as the target; vocabulary sizes may differ): k decode
    steps per round, each draft token drawn from the draft's distribution under the row's
    sampler and processors. The last draft goes into the draft's cache too, so that it rewinds by
    the same count as the model's."""

    def __init__(self, model, num_draft_tokens=3, prefill_step_size=PREFILL_STEP_SIZE):
        check_num_draft_tokens(num_draft_tokens)
        self.model, self.num_draft_tokens = model, num_draft_tokens
        self.prefill_step_size = prefill_step_size
        self.stats = DraftStats()

    def start(self, rows):
        """The draft's cache for rows joining, holding each row's tokens but the last."""
        cache = self.model.make_cache(len(rows))
        if any(len(row.tokens) > 1 for row in rows):
            prefill(self.model, [self._ids(row.tokens[:-1]) for row in rows], cache,
                    step_size=self.prefill_step_size)
        return cache

    def _ids(self, tokens):  # the target's ids the draft has no embedding for: its last one
        top = self.model.config.vocab_size - 1
        return [min(t, top) for t in tokens]

    def merge(self, caches):
        cache = caches[0] if len(caches) == 1 else merge_caches(caches)
        mark(cache)
        return cache

    def propose(self, rows, cache, k, histories, vocab):
        """(drafts (B, k), their distributions logq (B, k, vocab), lengths (B,)); histories:
        each row's tokens as an array (for the processors), vocab: the model's size."""
        top = self.model.config.vocab_size - 1
        token = mx.array(self._ids([row.tokens[-1] for row in rows]))
        drafts, logqs = [], []
        for j in range(k):
            logits = _fit(self.model.step(mx.minimum(token, top), cache).astype(mx.float32), vocab)
            if any(row.processors for row in rows):
                logits = mx.concatenate([
                    processed(row, mx.concatenate([histories[i]] + [d[i:i + 1] for d in drafts]),
                              logits[i:i + 1]) for i, row in enumerate(rows)])

            def draw(sampler, index, logits=logits):
                logq = sampler.distribution(logits if index is None else logits[index])
                return logq, sampler.draw(logq)

            logq, token = per_sampler(rows, draw)
            drafts.append(token.astype(mx.int32))
            logqs.append(logq)
            mx.async_eval(token)
        self.model.step(mx.minimum(token, top), cache)
        return (mx.stack(drafts, axis=1), mx.stack(logqs, axis=1),
                mx.full((len(rows),), k, mx.int32))

    def rewind(self, cache, counts):
        rewind(cache, counts)
        mx.eval(cache_state(cache))


def _fit(logits, vocab):
    """(B, V_draft) -> (B, vocab): cut, or padded with ids never drawn."""
    have = logits.shape[-1]
    if have >= vocab:
        return logits[:, :vocab]
    return mx.pad(logits, [(0, 0), (0, vocab - have)], constant_values=-mx.inf)


class PromptLookup:
    """Drafts without a model: the tokens that followed the latest earlier occurrence of the
    context's last n tokens, for the longest n from `ngram` down to 1 that occurs."""

    def __init__(self, ngram=3, num_draft_tokens=3):
        check_num_draft_tokens(num_draft_tokens)
        if not (isinstance(ngram, int) and not isinstance(ngram, bool) and ngram >= 1):
            raise DraftError(f"prompt_lookup is {ngram!r}: expected an integer >= 1 (the longest "
                             "n-gram to look up)")
        self.ngram, self.num_draft_tokens = ngram, num_draft_tokens
        self.stats = DraftStats()

    def start(self, rows):
        return None

    def merge(self, caches):
        return None

    def lookup(self, tokens, k):
        """Up to k tokens that followed the latest earlier match of the end of `tokens`."""
        for n in range(min(self.ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

    def propose(self, rows, cache, k, histories, vocab):
        found = [self.lookup(row.tokens, k) for row in rows]
        k = max(map(len, found))
        drafts = mx.array([f + [0] * (k - len(f)) for f in found], mx.int32).reshape(len(rows), k)
        logq = mx.where(mx.arange(vocab) == drafts[..., None], 0.0, -mx.inf)  # certain draws
        return drafts, logq, mx.array([len(f) for f in found], mx.int32)

    def rewind(self, cache, counts):
        pass
