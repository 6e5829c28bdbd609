"""Text generation: `generate`, `stream_generate`, `batch_generate`, and the command line
`python -m mlx_mamba.generate`.

The prompt goes through the parallel forward in chunks (see prompt_cache.prefill), then tokens
are decoded one at a time with `model.step`, O(1) time and memory per token. The tokenizer can be
any object with `encode(str) -> list[int]`, `decode(list[int]) -> str` and `eos_token_id`
(an int, a list of them, or None), or None: prompts are then token ids, the texts are empty and
the tokens are in the responses (`.token`, `.tokens`); nothing stops generation but max_tokens.
"""

import dataclasses
import sys
import time

import mlx.core as mx

from . import cli
from .checkpoint import CheckpointError
from .cli_model import add_draft_arguments, add_sampling_arguments, load_draft, load_model
from .config import ConfigError
from .decoder import GenerationError, eos_token_ids, generate_step, make_drafter
from .detokenizer import StreamingDetokenizer
from .grammar import Grammar, GrammarError, from_response_format, logits_processor
from .models.sharding import ShardingError
from .prompt_cache import (PREFILL_STEP_SIZE, PromptCache, PromptCacheError, check_cache_file,
                           load_prompt_cache, make_prompt_cache, prefill, rank_file,
                           save_prompt_cache)
from .sample import SamplerError, check_settings, make_logits_processors, make_sampler
from .speculative import DraftError, DraftStats
from .token_ids import TokenIdError, check_token_ids


@dataclasses.dataclass
class GenerationResponse:
    text: str  # new text with this token ("" while a multi-byte character is incomplete)
    token: int
    logprobs: mx.array  # (V,) log-softmax of the processed logits (before temperature, filters)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float  # tokens after the first, per second since the first
    peak_memory: float  # GB, mx.get_peak_memory(): MLX's buffers (in RAM on the CPU backend)
    finish_reason: str | None  # "stop" (EOS), "length" (max_tokens) or None while going
    from_draft: bool = False  # a draft token the model accepted (speculative decoding)
    draft_stats: DraftStats | None = None  # so far, when decoding speculatively


@dataclasses.dataclass
class BatchResult:
    text: str
    tokens: list  # generated token ids, without the EOS that ended them
    finish_reason: str


class _NoText:
    """Stands in for a missing tokenizer: no text, no end-of-sequence token."""

    eos_token_id = None

    def decode(self, ids):
        return ""


_NO_TEXT = _NoText()


def encode(model, tokenizer, prompt, name="the prompt"):
    """Token ids of `prompt`: a string, or already token ids (a list of ints or a 1-D integer
    array, see `check_token_ids`), checked against the model's vocabulary."""
    text = isinstance(prompt, str)
    try:
        return check_token_ids(tokenizer.encode(prompt) if text else prompt,
                               model.config.vocab_size)
    except TokenIdError as e:
        hint = ": is this the model's tokenizer?" if text else ""
        raise GenerationError(f"{name}: {e}{hint}") from None


def _check_text(text, what="the prompt"):
    """Raise GenerationError if `text` holds undecodable bytes (surrogate escapes), which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{what} is not UTF-8 text (an undecodable byte at character "
                              f"{e.start})") from None


def _check_prompt(tokenizer, prompt, what="the prompt"):
    """Raise GenerationError if `prompt` is text that cannot be encoded (no tokenizer, or not
    UTF-8); token ids are checked by `encode`."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError(f"{what} is text, and there is no tokenizer to encode it: pass "
                                  "token ids, or a tokenizer")
        _check_text(prompt, what)


def _decoding(model, tokenizer, temp, top_p, top_k, min_p, repetition_penalty, seed,
              logits_processors, max_tokens, response_format):
    """(sampler, processors, eos ids, row_processors) for these settings, checked first."""
    check_settings(temp, top_p, top_k, min_p, repetition_penalty, seed)
    if not (isinstance(max_tokens, int) and max_tokens >= 0):
        raise GenerationError(f"max_tokens is {max_tokens!r}: expected an integer >= 0")
    grammar = from_response_format(response_format)
    if grammar is None:
        row_processors = list
    else:
        logits_processor(grammar, tokenizer, model.config.vocab_size)  # fails here, not later

        def row_processors():
            return [logits_processor(grammar, tokenizer, model.config.vocab_size)]
    return (make_sampler(temp, top_p, top_k, min_p, seed),
            make_logits_processors(repetition_penalty, logits_processors),
            eos_token_ids(tokenizer), row_processors)


def stream_generate(model, tokenizer, prompt, *, max_tokens=256, temp=0.0, top_p=1.0, top_k=0,
                    min_p=0.0, repetition_penalty=None, seed=None, logits_processors=None,
                    response_format=None, prompt_cache=None, prefill_step_size=PREFILL_STEP_SIZE,
                    progress=None, draft_model=None, num_draft_tokens=3, prompt_lookup=None):
    """Yield a GenerationResponse per generated token; the last has `finish_reason` set.

    prompt: a string or token ids (a list of ints or a 1-D integer array; every id is checked
    against the vocabulary), appended to `prompt_cache` (a PromptCache, left unchanged) when
    one is given; it may then be empty. logits_processors: functions
    (tokens so far (T,), logits (1, V)) -> logits, applied after the repetition penalty.
    response_format: OpenAI's ({"type": "json_object"}, {"type": "json_schema", "json_schema":
    {"schema": {...}}}) or a grammar.Grammar: the text then follows it (see grammar.py).
    progress(done, total) follows the prompt's prefill.
    draft_model (a model with the same token ids) or prompt_lookup (the longest n-gram to look
    up in the context): decode speculatively, proposing num_draft_tokens (1 to 64) per round;
    the text is the same (token for token at temp 0, in distribution when sampling).
    """
    drafter = make_drafter(draft_model, num_draft_tokens, prompt_lookup, prefill_step_size,
                           response_format)
    sampler, processors, eos, row_processors = _decoding(
        model, tokenizer, temp, top_p, top_k, min_p, repetition_penalty, seed, logits_processors,
        max_tokens, response_format)
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise GenerationError(f"prompt_cache has type {type(prompt_cache).__name__}: expected a "
                              "PromptCache (load_prompt_cache reads one from a file)")
    _check_prompt(tokenizer, prompt)
    tokens = encode(model, tokenizer, prompt)
    if not tokens and prompt_cache is None:
        raise GenerationError("the prompt is empty")
    start = time.perf_counter()
    state = make_prompt_cache(model, tokens, prompt_cache, step_size=prefill_step_size,
                              progress=progress)
    detokenizer = StreamingDetokenizer(_NO_TEXT if tokenizer is None else tokenizer)
    steps = generate_step(model, state.layers, [state.tokens], sampler, processors, max_tokens,
                          eos, row_processors, drafter)
    events = (event for step in steps for event in step)
    for n, (_, token, logprobs, finish, from_draft) in enumerate(events, 1):
        now = time.perf_counter()
        if n == 1:
            prompt_tps = len(tokens) / (now - start)
            first = now
        text = detokenizer.add_token(token) if finish != "stop" else ""
        if finish:
            text += detokenizer.finalize()
        yield GenerationResponse(
            text=text, token=token, logprobs=logprobs, prompt_tokens=len(tokens),
            prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, from_draft=from_draft,
            draft_stats=drafter and dataclasses.replace(drafter.stats))


def generate(model, tokenizer, prompt, *, verbose=False, **kwargs):
    """The generated text. Keyword arguments as `stream_generate` (max_tokens=256, temp=0.0,
    top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None, seed=None, ...); `verbose` prints
    the text as it comes and the speeds at the end."""
    text, response = "", None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    if verbose:
        print()
        if response is not None:
            print_stats(response.prompt_tokens, response.prompt_tps, response.generation_tokens,
                        response.generation_tps, response.peak_memory,
                        draft_stats=response.draft_stats)
    return text


def batch_generate(model, tokenizer, prompts, *, max_tokens=256, temp=0.0, top_p=1.0, top_k=0,
                   min_p=0.0, repetition_penalty=None, seed=None, verbose=False,
                   logits_processors=None, response_format=None,
                   prefill_step_size=PREFILL_STEP_SIZE, draft_model=None, num_draft_tokens=3,
                   prompt_lookup=None):
    """A BatchResult (`.text`, `.tokens`, `.finish_reason`) per prompt, decoded together
    (speculatively with draft_model or prompt_lookup, as in `stream_generate`).

    Prompts of different lengths are left-padded and masked, so each gets exactly the tokens it
    gets alone (with a seed, sampled ones too); finished prompts leave the batch.
    """
    drafter = make_drafter(draft_model, num_draft_tokens, prompt_lookup, prefill_step_size,
                           response_format)
    sampler, processors, eos, row_processors = _decoding(
        model, tokenizer, temp, top_p, top_k, min_p, repetition_penalty, seed, logits_processors,
        max_tokens, response_format)
    if not isinstance(prompts, (list, tuple)):
        raise GenerationError(f"prompts has type {type(prompts).__name__}: expected a list of "
                              "strings or of token-id lists")
    for i, prompt in enumerate(prompts):
        _check_prompt(tokenizer, prompt, f"prompt {i}")
    rows = [encode(model, tokenizer, p, f"prompt {i}") for i, p in enumerate(prompts)]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise GenerationError(f"prompt {empty[0]} is empty")
    if not rows:
        return []
    start = time.perf_counter()
    cache = model.make_cache(len(rows))
    prefill(model, [r[:-1] for r in rows], cache, step_size=prefill_step_size)
    outputs, finished, first = [[] for _ in rows], ["length"] * len(rows), None
    steps = generate_step(model, cache, rows, sampler, processors, max_tokens, eos,
                          row_processors, drafter)
    for step in steps:
        first = first or time.perf_counter()
        for row, token, _, finish, _ in step:
            if finish != "stop":
                outputs[row].append(token)
            finished[row] = finish
    if verbose and first:
        prompt_tokens, generated = sum(map(len, rows)), sum(map(len, outputs))
        # Tokens after each row's first, over the time after the first step.
        print_stats(prompt_tokens, prompt_tokens / (first - start), generated,
                    max(generated - len(rows), 0) / (time.perf_counter() - first),
                    mx.get_peak_memory() / 1e9, draft_stats=drafter and drafter.stats)
    decode = (_NO_TEXT if tokenizer is None else tokenizer).decode
    return [BatchResult(decode(out), out, f) for out, f in zip(outputs, finished)]


def print_stats(prompt_tokens, prompt_tps, generation_tokens, generation_tps, peak_memory,
                file=None, draft_stats=None):
    where = " (MLX buffers in RAM)" if mx.default_device() == mx.cpu else ""
    print("=" * 10, file=file)
    print(f"Prompt: {prompt_tokens} tokens, {prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {generation_tokens} tokens, {generation_tps:.3f} tokens-per-sec",
          file=file)
    if draft_stats is not None:
        d = draft_stats
        print(f"Speculation: {d.accepted}/{d.proposed} draft tokens accepted "
              f"({100 * d.acceptance:.1f}%), {d.passes} model passes, "
              f"{d.passes / max(generation_tokens, 1):.3f} per generated token", file=file)
    print(f"Peak memory: {peak_memory:.3f} GB{where}", file=file, flush=True)


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m mlx_mamba.generate",
        description="Generate text with a Mamba or Mamba2 model. Streams the text to stdout; "
                    "speeds and peak memory go to stderr.")
    add = parser.add_argument
    cli.add_model_arguments(parser)
    add("--prompt", "-p", required=True, help="the prompt text; '-' reads stdin")
    add("--max-tokens", "-m", type=cli.integer(0), default=256, help="tokens to generate at most")
    add_sampling_arguments(parser)
    add("--json-schema", metavar="FILE", default=None,
        help="write JSON that validates against the JSON schema in FILE, at any temperature "
             "(needs llguidance; default: free text)")
    add("--ignore-chat-template", action="store_true",
        help="feed the prompt as is, even if the tokenizer has a chat template")
    add("--save-prompt-cache", metavar="FILE", default=None,
        help="save the state after the prompt to FILE (safetensors); sharded, each process "
             "saves its part to NAME.rank{r}-of-{n}.safetensors (default: not saved)")
    add("--prompt-cache-file", metavar="FILE", default=None,
        help="continue from a saved prompt cache; --prompt is appended as is; sharded, each "
             "process reads its part as saved (default: start afresh)")
    add("--prefill-step-size", type=cli.integer(1), default=PREFILL_STEP_SIZE,
        help="prompt tokens per parallel forward")
    add_draft_arguments(parser)
    cli.add_switch(parser, "--pipeline",
                   help="under mlx.launch with several processes: pipeline parallel (each "
                        "process holds a range of layers) instead of tensor parallel")
    cli.add_switch(parser, "--verbose",
                   help="also print the model, the backend, the prompt as fed and, when "
                        "decoding speculatively, the acceptance rate and the model passes per "
                        "generated token")
    return parser


def _prompt_ids(args, model, tokenizer, text):
    """The prompt's token ids: through the chat template when the tokenizer has one, unless
    told otherwise or continuing a cached prompt (then the text is appended as is)."""
    template = getattr(tokenizer, "chat_template", None)
    if template and not args.ignore_chat_template and not args.prompt_cache_file:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
        return encode(model, tokenizer, tokenizer.encode(text, add_special_tokens=False)), text
    return encode(model, tokenizer, text), text


def _progress_bar(total_tokens, step_size):
    """A progress callback drawing a bar on stderr, for prompts longer than one chunk."""
    if total_tokens <= step_size:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total_tokens, unit="tok", desc="Prompt", file=sys.stderr, leave=False)

    def update(done, total):
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def _prompt_text(args):
    """The --prompt text, or stdin's for '-', checked to be text."""
    if args.prompt != "-":
        _check_text(args.prompt, "--prompt")
        return args.prompt
    text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    _check_text(text, "the prompt on stdin")
    return text


def _json_schema(file):
    """The --json-schema FILE as a Grammar."""
    with open(file, "rb") as f:
        data = f.read()
    try:
        return Grammar.json_schema(data.decode("utf-8"))
    except (GrammarError, UnicodeDecodeError) as e:
        raise GrammarError(f"{file}: {e}") from None


def run(args):
    check_settings(args.temp, args.top_p, args.top_k, args.min_p, args.repetition_penalty)
    grammar = _json_schema(args.json_schema) if args.json_schema else None
    if args.save_prompt_cache:
        check_cache_file(args.save_prompt_cache)
    text = _prompt_text(args)
    if not text and not args.prompt_cache_file:
        raise GenerationError("the prompt is empty" + (" (nothing on stdin)" if args.prompt == "-"
                                                        else ""))
    if args.draft_model is not None and args.prompt_lookup is not None:
        raise GenerationError("--prompt-lookup and --draft-model exclude each other: draft "
                              "with one")
    start = time.perf_counter()
    world = mx.distributed.init()
    model, tokenizer = load_model(args, world)
    seed = args.seed
    if seed is None and world.size() > 1:
        from .sharded import shared_seed

        seed = shared_seed(world)  # every rank must draw the same tokens
    draft = load_draft(args, tokenizer) if args.draft_model else None
    # Sharded, each process keeps its part of the state in a file of its own.
    previous = load_prompt_cache(rank_file(args.prompt_cache_file, world), model) \
        if args.prompt_cache_file else None
    ids, fed_text = _prompt_ids(args, model, tokenizer, text)
    if not ids and previous is None:
        raise GenerationError("the prompt encodes to no tokens")
    if args.verbose:
        print(f"Model {args.model} ({model.config.model_type}, {model.config.n_layer} layers) "
              f"loaded in {time.perf_counter() - start:.1f} s on {mx.default_device()}; "
              f"prompt as fed:\n{fed_text}\n" + "=" * 10, file=sys.stderr)

    start = time.perf_counter()
    state = make_prompt_cache(model, ids, previous, step_size=args.prefill_step_size,
                              progress=_progress_bar(len(ids), args.prefill_step_size))
    prompt_seconds = time.perf_counter() - start
    if args.save_prompt_cache:
        file = rank_file(args.save_prompt_cache, world)
        save_prompt_cache(file, state, model, args.model)
        print(f"Saved the prompt cache ({len(state.tokens)} tokens) to {file}", file=sys.stderr)

    response = None
    start = time.perf_counter()
    for response in stream_generate(
            model, tokenizer, [], max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            seed=seed, response_format=grammar, prompt_cache=state, draft_model=draft,
            num_draft_tokens=args.num_draft_tokens, prompt_lookup=args.prompt_lookup,
            prefill_step_size=args.prefill_step_size):
        if response.generation_tokens == 1:
            # The prompt's last token goes through the first decoding step: prompt time.
            prompt_seconds += time.perf_counter() - start
        print(response.text, end="", flush=True)
    print(flush=True)
    print_stats(len(ids), len(ids) / prompt_seconds, response.generation_tokens if response else 0,
                response.generation_tps if response else 0.0, mx.get_peak_memory() / 1e9,
                file=sys.stderr, draft_stats=response.draft_stats if response and args.verbose
                else None)


def main(argv=None):
    """Under `mlx.launch` with several processes the model is tensor parallel over them and rank
    0 alone prints."""
    from .sharded import quiet_unless_first

    quiet_unless_first(mx.distributed.init())
    args = build_parser().parse_args(argv)
    return cli.run(lambda: run(args), (ConfigError, CheckpointError, PromptCacheError,
                                       SamplerError, GenerationError, GrammarError, DraftError,
                                       OSError, ShardingError))


if __name__ == "__main__":
    sys.exit(main())
