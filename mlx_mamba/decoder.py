"""The decoding engine, `Decoder`: sequences decoded together one token per step (or one
speculative round), joining and leaving between steps; generate, chat and the server drive it."""

import dataclasses

import mlx.core as mx

from .cache import cache_rows, cache_state, mark, merge_caches, rewind
from .prompt_cache import PREFILL_STEP_SIZE
from .speculative import DraftError, DraftModel, PromptLookup, per_sampler, processed, verify


class GenerationError(ValueError):
    """A prompt or setting that generation cannot use; the message says which."""


def eos_token_ids(tokenizer):
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple, set)) else {eos}


@dataclasses.dataclass(eq=False)
class Row:
    """One sequence in a Decoder: its settings and tokens. The decoder's cache holds the state
    after tokens[:fed]; the next input is tokens[-1]."""

    key: object  # the caller's name for the sequence, handed back with each of its tokens
    tokens: list  # the prompt, then each generated token
    sampler: object  # (n, V) -> (n,); rows sharing a sampler are sampled in one call
    processors: list  # logits processors, (tokens so far (T,), logits (1, V)) -> logits
    max_tokens: int
    eos: set
    fed: int = 0
    generated: int = 0
    history: object = None  # tokens as an array, for the processors


class Decoder:
    """The decoding engine: sequences decoded together, one token each per `step`, that join
    (with the cache of their prompt) and leave (finished or dropped) between steps. Each row
    gets exactly the tokens it gets alone: rows only share the batch dimension.

    While one step's tokens are handed out, the next step is already being computed; a row
    that joins gets its first token at the step after next.

    With a drafter (speculative.DraftModel or PromptLookup) each step is a round: the drafter
    proposes up to k tokens per row, one forward of the model checks them, and each row gets the
    tokens it accepts and one more (see speculative.py); the caches rewind over the rest.
    """

    def __init__(self, model, on_leave=None, drafter=None):
        """on_leave(row, cache): called for each row that leaves, with its own cache (batch 1),
        which holds the state after row.tokens[:row.fed]."""
        self.model, self.on_leave, self.drafter = model, on_leave, drafter
        self.draft_cache = None  # the drafter's, rows as self.cache's
        self.rows, self.cache = [], None  # the rows in the batch, in cache order, and the cache
        self.joining = []  # (cache, rows) that enter at the next step
        self.dropped = set()  # keys of rows to take out without another token
        self.pending = None  # (tokens (b,), logprobs (b, V)) being computed for self.rows

    def __len__(self):
        return len(self.rows) + sum(len(rows) for _, rows in self.joining)

    def join(self, cache, rows):
        """Add `rows`, one per row of `cache`, which holds each row's tokens but the last."""
        for row in rows:
            if row.max_tokens < 1:
                raise GenerationError(f"max_tokens is {row.max_tokens}: a row joins for >= 1")
            row.fed = len(row.tokens) - 1
        self.joining.append((cache, rows))

    def drop(self, key):
        """Take the row named `key` out at the next step, without giving it another token."""
        self.dropped.add(key)

    def step(self):
        """[(key, token, logprobs (V,), finish_reason, from_draft)] for each row but dropped
        ones (several per row with a drafter); finish_reason is "stop" (an EOS token), "length"
        (max_tokens) or None while going."""
        if self.drafter is not None:
            return self._speculate()
        if self.pending is None:
            self._admit(None)
            if self.pending is None:
                return []
        tokens, logprobs = self.pending
        rows = list(self.rows)
        for row in rows:
            row.generated += 1
        going = self._leave([i for i, row in enumerate(rows)
                             if row.generated >= row.max_tokens or row.key in self.dropped])
        for i in going:
            if rows[i].processors:
                rows[i].history = mx.concatenate([rows[i].history,
                                                  tokens[i:i + 1].astype(mx.int32)])
        self._admit(None if not going else tokens if len(going) == len(rows)
                    else tokens[mx.array(going)])
        events = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.tokens.append(token)
            if row.key not in self.dropped:
                finish = "stop" if token in row.eos else \
                    "length" if row.generated >= row.max_tokens else None
                events.append((row.key, token, logprobs[i], finish, False))
        # Rows that met their EOS were computed another step: they leave now.
        ended = [i for i, row in enumerate(self.rows) if row.tokens[-1] in row.eos and
                 row in rows]
        kept = self._leave(ended)
        if ended and kept:
            index = mx.array(kept)
            self.pending = tuple(computed[index] for computed in self.pending)
        present = {row.key for row in self.rows} | {r.key for _, j in self.joining for r in j}
        self.dropped &= present
        return events

    def _leave(self, indices):
        """Take the rows at `indices` out of the batch; returns the indices of those kept."""
        if not indices:
            return list(range(len(self.rows)))
        if self.on_leave:
            for i in indices:
                self.on_leave(self.rows[i], cache_rows(self.cache, mx.array([i])))
        kept = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in kept]
        if kept:
            for layer in self.cache + (self.draft_cache or []):
                if layer is not None:
                    layer.keep(mx.array(kept))
        else:
            self.cache, self.pending, self.draft_cache = None, None, None
        return kept

    def _admit(self, inputs):
        """Bring in the joining rows and start the next step; inputs (b,): the next tokens of
        the rows already in the batch (None when there are none)."""
        caches, parts = ([self.cache], [inputs]) if self.rows else ([], [])
        for cache, rows in self.joining:
            for row in rows:
                if row.processors:
                    row.history = mx.array(row.tokens, dtype=mx.int32)
            caches.append(cache)
            parts.append(mx.array([row.tokens[-1] for row in rows], dtype=mx.int32))
            self.rows += rows
        self.joining = []
        if not self.rows:
            self.cache, self.pending = None, None
            return
        self.cache = caches[0] if len(caches) == 1 else merge_caches(caches)
        self._launch(parts[0] if len(parts) == 1 else mx.concatenate(parts))

    def _launch(self, inputs):  # inputs (b,): each row's next token
        for row in self.rows:
            row.fed += 1
        logits = self.model.step(inputs, self.cache).astype(mx.float32)
        if any(row.processors for row in self.rows):
            logits = mx.concatenate([processed(row, row.history, logits[i:i + 1])
                                     for i, row in enumerate(self.rows)])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = self._sample(logprobs)
        mx.async_eval(tokens, logprobs)
        self.pending = (tokens, logprobs)

    def _sample(self, logprobs):  # (b, V) -> (b,)
        return per_sampler(self.rows, lambda sampler, index: sampler(
            logprobs if index is None else logprobs[index]))

    def _speculate(self):
        """One round of speculative decoding for every row (see `step`)."""
        if self.joining:
            caches, drafts = ([self.cache], [self.draft_cache]) if self.rows else ([], [])
            for cache, rows in self.joining:
                for row in rows:
                    row.history = mx.array(row.tokens, dtype=mx.int32)
                caches.append(cache)
                drafts.append(self.drafter.start(rows))
                self.rows += rows
            self.joining = []
            self.cache = caches[0] if len(caches) == 1 else merge_caches(caches)
            self.draft_cache = self.drafter.merge(drafts)
            mark(self.cache)
        self._leave([i for i, row in enumerate(self.rows) if row.key in self.dropped])
        self.dropped = set()
        if not self.rows:
            return []
        # Always the full count (a row's draws then do not depend on its batch).
        rows, vocab, width = self.rows, self.model.config.vocab_size, self.drafter.num_draft_tokens
        drafts, logq, lengths = self.drafter.propose(rows, self.draft_cache, width,
                                                     [r.history for r in rows], vocab)
        k = drafts.shape[1]
        inputs = mx.concatenate([mx.array([[r.tokens[-1]] for r in rows], mx.int32), drafts], 1)
        logits = self.model(inputs, self.cache).astype(mx.float32)  # (b, k+1, V)
        if any(row.processors for row in rows):
            logits = mx.stack([mx.concatenate([
                processed(row, mx.concatenate([row.history, drafts[i, :j]]), logits[i, j:j + 1])
                for j in range(k + 1)]) for i, row in enumerate(rows)])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        def check(sampler, index):
            pick = (lambda a: a) if index is None else (lambda a: a[index])  # noqa: E731
            return verify(sampler, sampler.distribution(pick(logprobs)), pick(logq),
                          pick(drafts), pick(lengths), width)

        accepted, tokens = per_sampler(rows, check)
        accepted, tokens, drafted = accepted.tolist(), tokens.tolist(), drafts.tolist()
        stats = self.drafter.stats
        stats.passes += 1
        stats.proposed += sum(lengths.tolist())
        stats.accepted += sum(accepted)
        events, ended, counts = [], [], []
        for i, row in enumerate(rows):
            new = drafted[i][:accepted[i]] + [tokens[i]]
            for j, token in enumerate(new):
                row.generated += 1
                finish = "stop" if token in row.eos else \
                    "length" if row.generated >= row.max_tokens else None
                events.append((row.key, token, logprobs[i, j], finish, j < accepted[i]))
                if finish:
                    ended.append(i)
                    new = new[:j + 1]
                    break
            row.tokens += new
            row.fed = len(row.tokens) - 1
            if row.processors:
                row.history = mx.array(row.tokens, dtype=mx.int32)
            counts.append(k + 1 - len(new))  # the caches hold all the tokens but the last
        rewind(self.cache, counts)
        self.drafter.rewind(self.draft_cache, counts)
        mx.eval(cache_state(self.cache))
        self._leave(ended)
        return events


def generate_step(model, cache, histories, sampler, processors, max_tokens, eos,
                  row_processors=list, drafter=None):
    """Decode a batch from `cache`, which holds each row's tokens (`histories`) but the last.
    row_processors() gives each row processors of its own (they follow its tokens: a grammar).

    Yields, per step, a list of (row, token, logprobs (V,), finish_reason, from_draft) for the
    rows still running; a row finishes at an EOS token or after max_tokens, and leaves the
    batch. drafter: decode speculatively (see speculative.py); a step then gives a row 1 to k+1
    tokens.
    """
    if max_tokens <= 0:
        return
    decoder = Decoder(model, drafter=drafter)
    decoder.join(cache, [Row(i, list(tokens), sampler, processors + row_processors(),
                             max_tokens, eos) for i, tokens in enumerate(histories)])
    while decoder:
        yield decoder.step()


def make_drafter(draft_model=None, num_draft_tokens=3, prompt_lookup=None,
                 prefill_step_size=PREFILL_STEP_SIZE, response_format=None):
    """The drafter for these settings (None: plain decoding), which are checked first."""
    if draft_model is not None and prompt_lookup is not None:
        raise DraftError("draft_model and prompt_lookup exclude each other: draft with one")
    if response_format is not None and (draft_model is not None or prompt_lookup is not None):
        raise DraftError("response_format and speculative decoding exclude each other: a "
                         "grammar follows accepted tokens only")
    if draft_model is not None:
        if not hasattr(draft_model, "make_cache"):
            raise DraftError(f"draft_model has type {type(draft_model).__name__}: expected a "
                             "model (mlx_mamba.load(path)[0])")
        return DraftModel(draft_model, num_draft_tokens, prefill_step_size)
    if prompt_lookup is not None:
        return PromptLookup(prompt_lookup, num_draft_tokens)
    return None
