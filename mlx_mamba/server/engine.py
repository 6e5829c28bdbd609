"""The server's engine: the thread that does all MLX work. It prefills each request's prompt
from the longest cached prefix of its tokens (a PrefixCache), keeping the state every
`prefill_step_size` tokens and at the end of each request, and decodes every running request in
one Decoder, which requests join and leave between steps (speculatively with --draft-model or
--prompt-lookup: the prefix cache then still gets only states after accepted tokens).

Sharded over several processes (`mlx.launch`), rank 0 serves and decides each turn of the loop
(a Plan: which request starts, from which cached prefix, with which seed; which rows leave;
whether to stop), sends it to the other ranks over `mx.distributed`, and every rank carries it
out: the same model calls in the same order, so their collectives match.
"""

import collections
import dataclasses
import json
import logging
import random
import threading

import mlx.core as mx

from ..cache import cache_rows
from ..cli_model import load_draft, load_model
from ..decoder import Decoder, Row, eos_token_ids, make_drafter
from ..detokenizer import StreamingDetokenizer
from ..grammar import Grammar, logits_processor
from ..tool_calls import FORMATS, detect_format
from ..prompt_cache import PrefixCache, prefill
from ..sample import MAX_SEED, make_logits_processors, make_sampler
from ..sharded import broadcast

log = logging.getLogger("mlx_mamba.server")


@dataclasses.dataclass
class Piece:
    """What a request gets for one generated token."""

    text: str
    finish_reason: str | None
    logprob: tuple | None = None  # (token text, logprob, [(text, logprob) of the top ones])
    index: int = 0  # the choice it belongs to


@dataclasses.dataclass(eq=False)
class Job:
    """One request, from the web side to the engine and back."""

    prompt: list  # token ids
    sampling: dict  # make_sampler's keyword arguments
    repetition_penalty: float | None
    max_tokens: int
    ignore_eos: bool
    stop: list  # strings that end the text (not included in it)
    logprobs: int | None  # top alternatives to report per token; None: no logprobs
    deliver: object  # deliver(Piece | Exception), called from the engine thread
    grammar: object = None  # a grammar.Grammar that the text follows, or None
    n: int = 1  # choices, each a row of the batch, from one prefill of the prompt
    eos: set = dataclasses.field(default_factory=set)
    cached_tokens: int = 0
    completion_tokens: int = 0  # of every choice
    finished: bool = False  # every choice has finished
    cancelled: bool = False
    choices: list = dataclasses.field(default_factory=list)
    rows: int = 0  # choices still in the decoder
    id: int | None = None  # its number in the engine once started, the same on every rank

    def settings(self):
        """What every rank needs to run it, as JSON-ready data."""
        return {"id": self.id, "prompt": self.prompt, "sampling": self.sampling,
                "repetition_penalty": self.repetition_penalty, "max_tokens": self.max_tokens,
                "ignore_eos": self.ignore_eos, "n": self.n, "cached_tokens": self.cached_tokens,
                "grammar": None if self.grammar is None else self.grammar.text}

    @classmethod
    def followed(cls, settings):
        """A job that another rank serves, run here for its model calls alone."""
        grammar = settings.pop("grammar")
        return cls(**settings, stop=[], logprobs=None, deliver=_ignore,
                   grammar=None if grammar is None else Grammar(grammar))


@dataclasses.dataclass(eq=False)
class Choice:
    """One of a job's n sequences: a row of the decoder (its key)."""

    job: Job
    index: int
    detokenizer: object
    finished: bool = False
    held: str = ""  # text not sent yet: it may be the start of a stop string


@dataclasses.dataclass
class Prefill:
    job: Job
    cache: list
    done: int  # prompt tokens in the cache


@dataclasses.dataclass
class Plan:
    """One turn of the engine's loop, decided by rank 0 and carried out by every rank."""

    stop: bool = False
    start: Job | None = None  # the job whose prefill starts (its cached_tokens decided)
    cancel: bool = False  # the job being prefilled is dropped
    drop: list = dataclasses.field(default_factory=list)  # (job id, choice index) that leave

    def encode(self):
        return json.dumps({"stop": self.stop, "cancel": self.cancel, "drop": self.drop,
                           "start": self.start and self.start.settings()}).encode()

    @classmethod
    def decode(cls, data):
        plan = json.loads(data)
        start = plan["start"] and Job.followed(plan["start"])
        return cls(plan["stop"], start, plan["cancel"], [tuple(key) for key in plan["drop"]])


class Overloaded(RuntimeError):
    pass


def _ignore(item):
    pass


class Engine:
    """Loads the model and serves it in the thread that creates it (MLX's work then stays in
    one thread: MLX used from a second thread can abort the process at exit); `submit`, `cancel`
    and `stop` are called from other threads."""

    def __init__(self, args, world=None):
        """world: the processes the model is sharded over (None: this one alone); rank 0
        serves, the others follow it (`run`)."""
        self.args = args
        self.model, self.tokenizer = load_model(args, world)
        self.world = world if world is not None and world.size() > 1 else None
        self.leader = self.world is None or self.world.rank() == 0
        draft = load_draft(args, self.tokenizer) if args.draft_model else None
        self.drafter = make_drafter(draft, args.num_draft_tokens, args.prompt_lookup,
                                    args.prefill_step_size)
        self.tool_format = FORMATS[args.tool_parser] if args.tool_parser else \
            detect_format(getattr(self.tokenizer, "chat_template", None))
        self.prefix_cache = PrefixCache(self.model, args.prompt_cache_bytes,
                                        args.prompt_cache_dir, args.model, self.world)
        self.decoder = Decoder(self.model, on_leave=self._left, drafter=self.drafter)
        self.lock = threading.Condition()
        self.incoming = collections.deque()
        self.active = 0  # requests submitted and not yet out of the engine
        self.prefills = 0  # prompts prefilled (one per request, whatever its n)
        self.stopped = False
        self.jobs = {}  # id -> job, from the start of its prefill until it is released
        self.started = 0  # jobs started so far: the next one's id

    def busy(self):
        """Every batch row and queue place is taken."""
        return self.active >= self.args.max_batch_size + self.args.max_queue

    def submit(self, job):
        with self.lock:
            if self.busy():
                raise Overloaded
            self.active += 1
            self.incoming.append(job)
            self.lock.notify()

    def cancel(self, job):
        """The client is gone: free the job's place (a no-op once it has finished)."""
        job.cancelled = True
        with self.lock:
            self.lock.notify()

    def stop(self):
        with self.lock:
            self.stopped = True
            self.lock.notify()

    def run(self):
        """Prefill and decode requests until `stop`: one prefill chunk, then one decoding step
        of every running request, in turn. Rank 0 decides each turn (a Plan) and the other
        ranks of a sharded model carry out the same."""
        waiting, prefilling = collections.deque(), None
        while True:
            plan = self._plan(waiting, prefilling) if self.leader else None
            if self.world is not None:
                data = broadcast(self.world, plan.encode() if self.leader else None)
                plan = plan or Plan.decode(data)
            if plan.stop:
                return
            if plan.start is not None:
                self.jobs[plan.start.id] = plan.start
                prefilling = self._guarded(self._start_prefill, plan.start)
                if prefilling is not None and prefilling.done != plan.start.cached_tokens:
                    raise RuntimeError(  # the ranks' prefix caches must hold the same states
                        f"this rank holds {prefilling.done} of the {plan.start.cached_tokens} "
                        "cached prompt tokens that rank 0 resumes from")
            elif prefilling is not None and plan.cancel:
                self._release(prefilling.job)
                prefilling = None
            if prefilling is not None:
                prefilling = self._guarded(self._prefill_chunk, prefilling)
            for job, index in plan.drop:
                self.decoder.drop(self.jobs[job].choices[index])
            if self.decoder:
                self._decode()

    def _plan(self, waiting, prefilling):
        """Rank 0's decisions for the next turn, taken once, from the requests as they are
        now (clients come and go meanwhile)."""
        with self.lock:
            while not (self.stopped or self.incoming or waiting or prefilling or self.decoder):
                self.lock.wait()
            if self.stopped:
                return Plan(stop=True)
            waiting.extend(self.incoming)
            self.incoming.clear()
        for job in [job for job in waiting if job.cancelled]:
            waiting.remove(job)
            self._release(job)
        plan = Plan(cancel=prefilling is not None and prefilling.job.cancelled)
        # A request joins with its n rows (n <= max_batch_size: the web side checks).
        if prefilling is None and waiting and \
                len(self.decoder) + waiting[0].n <= self.args.max_batch_size:
            job = plan.start = waiting.popleft()
            job.id, self.started = self.started, self.started + 1
            # At least the last prompt token is left to feed: it gives the first token's logits.
            job.cached_tokens = self.prefix_cache.longest_length(job.prompt,
                                                                 len(job.prompt) - 1)
            if self.world is not None and job.sampling["seed"] is None:
                # Unseeded sampling must draw the same tokens on every rank.
                job.sampling["seed"] = random.randint(0, MAX_SEED)
        plan.drop = [(row.key.job.id, row.key.index) for row in self.decoder.rows
                     if row.key.job.cancelled or row.key.finished]
        return plan

    def _guarded(self, work, item):
        """work(item) for one job; if it fails, that job fails (and the engine goes on)."""
        job = item.job if isinstance(item, Prefill) else item
        try:
            return work(item)
        except Exception as e:
            log.exception("request failed")
            job.deliver(e)
            self._release(job)
            return None

    def _start_prefill(self, job):
        done, cache = self.prefix_cache.longest(job.prompt, job.cached_tokens)
        job.eos = set() if job.ignore_eos else eos_token_ids(self.tokenizer)
        self.prefills += 1
        return Prefill(job, cache if cache is not None else self.model.make_cache(1), done)

    def _prefill_chunk(self, p):
        """Feed the next chunk of the prompt (chunks end at multiples of the step size, where
        states are kept); returns None once the job has joined the decoder."""
        step, end = self.args.prefill_step_size, len(p.job.prompt) - 1
        if p.done < end:
            stop = min((p.done // step + 1) * step, end)
            prefill(self.model, [p.job.prompt[p.done:stop]], p.cache, step_size=step)
            p.done = stop
            if stop % step == 0 or stop == end:
                self._keep(p.job.prompt[:stop], p.cache)
            if stop < end:
                return p
        job, rows = p.job, []
        for index in range(job.n):
            processors = make_logits_processors(job.repetition_penalty)
            if job.grammar is not None:
                processors.append(logits_processor(job.grammar, self.tokenizer,
                                                   self.model.config.vocab_size))
            # Choice i draws from seed + i: the choices differ, each is reproducible alone.
            seed = job.sampling["seed"]
            sampling = dict(job.sampling, seed=None if seed is None else (seed + index) % 2**64)
            choice = Choice(job, index, StreamingDetokenizer(self.tokenizer))
            job.choices.append(choice)
            rows.append(Row(choice, list(job.prompt), make_sampler(**sampling), processors,
                            job.max_tokens, job.eos))
        # The prompt's state, copied into n rows: the prompt is fed once.
        cache = p.cache if job.n == 1 else cache_rows(p.cache, mx.zeros(job.n, mx.int32))
        self.decoder.join(cache, rows)
        job.rows = job.n
        return None

    def _decode(self):
        try:
            events = self.decoder.step()
        except Exception as e:
            log.exception("decoding failed")
            failed = self.decoder.rows + [r for _, rows in self.decoder.joining for r in rows]
            for job in {row.key.job: None for row in failed}:
                job.deliver(e)
                self._release(job)
            self.decoder = Decoder(self.model, on_leave=self._left, drafter=self.drafter)
            return
        for choice, token, logprobs, finish, _ in events:
            if self.leader and not choice.finished:
                self._hand_out(choice, token, logprobs, finish)

    def _hand_out(self, choice, token, logprobs, finish):
        job = choice.job
        job.completion_tokens += 1
        text = choice.detokenizer.add_token(token) if finish != "stop" else ""
        if finish:
            text += choice.detokenizer.finalize()
        text, choice.held, stopped = _cut_at_stop(choice.held + text, job.stop,
                                                  finish is not None)
        logprob = None
        if job.logprobs is not None and not (finish == "stop" and token in job.eos):
            logprob = self._logprob(token, logprobs, job.logprobs)
        choice.finished = stopped or finish is not None
        job.finished = all(c.finished for c in job.choices)
        job.deliver(Piece(text, "stop" if stopped else finish, logprob, choice.index))

    def _logprob(self, token, logprobs, count):
        top = mx.argpartition(-logprobs, count - 1)[:count] if count else mx.array([], mx.int32)
        values = logprobs[mx.concatenate([mx.array([token]), top.astype(mx.int32)])].tolist()
        ranked = sorted(zip(top.tolist(), values[1:]), key=lambda pair: -pair[1])
        decode = self.tokenizer.decode
        return decode([token]), values[0], [(decode([t]), v) for t, v in ranked]

    def _left(self, row, cache):
        """A row left the decoder: keep its state; the job's last row frees its place."""
        self._keep(row.tokens[:row.fed], cache)
        job = row.key.job
        job.rows -= 1
        if job.rows == 0:
            self._release(job)

    def _keep(self, tokens, cache):
        try:
            self.prefix_cache.add(tokens, cache)
        except OSError as e:  # a full disk costs the persisted copy, not the request
            log.warning("cannot write to the prompt cache directory: %s", e)

    def _release(self, job):
        self.jobs.pop(job.id, None)
        with self.lock:
            self.active -= 1


def _cut_at_stop(text, stops, final):
    """(text to send now, text held back, whether a stop string ended the text there).

    Text that could be the start of a stop string is held until the next tokens decide."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], "", True
    if final or not stops:
        return text, "", False
    held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - held], text[len(text) - held:], False
