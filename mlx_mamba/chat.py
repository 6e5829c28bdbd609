"""An interactive chat in the terminal: `python -m mlx_mamba.chat --model M`.

The model's state after the conversation so far is kept between turns, so a turn costs only
its new tokens (the user's message and the template's framing), however long the conversation:
a state-space model's past is a fixed-size state. Replies stream; Ctrl-C stops one and keeps
the session. /save FILE and /load FILE keep the state in the prompt-cache format.
"""

import dataclasses
import signal
import sys
import time

import mlx.core as mx

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError
from .cli_model import add_sampling_arguments, load_model
from .decoder import Decoder, GenerationError, Row, eos_token_ids
from .detokenizer import StreamingDetokenizer
from .generate import encode
from .prompt_cache import PREFILL_STEP_SIZE, PromptCacheError, load_state, prefill, save_state
from .sample import SamplerError, check_settings, make_logits_processors, make_sampler

HELP = "/reset clears the conversation, /save FILE and /load FILE keep it, /exit ends"


@dataclasses.dataclass
class Turn:
    text: str  # the reply
    prompt_tokens: int  # tokens fed for this turn
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str  # "stop", "length" or "interrupted"


class ChatSession:
    """A conversation and the model's state after it: `layers` hold the state after `fed`;
    `unfed` are tokens of the conversation not fed yet (the last token of a reply cut short)."""

    def __init__(self, model, tokenizer, *, system_prompt=None, max_tokens=256, temp=0.0,
                 top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None, seed=None,
                 prefill_step_size=PREFILL_STEP_SIZE):
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError("the tokenizer has no chat template: use "
                                  "python -m mlx_mamba.generate")
        check_settings(temp, top_p, top_k, min_p, repetition_penalty, seed)
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.max_tokens, self.step_size = max_tokens, prefill_step_size
        self.sampler = make_sampler(temp, top_p, top_k, min_p, seed)
        self.processors = make_logits_processors(repetition_penalty)
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system_prompt}] \
            if self.system_prompt else []
        self.layers, self.fed, self.unfed = None, [], []

    def _ids(self, messages):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return encode(self.model, self.tokenizer,
                      self.tokenizer.encode(text, add_special_tokens=False))

    def _new_tokens(self, messages):
        """The tokens this turn feeds: what the rendered conversation adds to what the state
        holds. When the conversation's text does not re-encode to the tokens the model wrote
        (or after loading a prompt cache without messages), the message is rendered alone."""
        held = self.fed + self.unfed
        everything = self._ids(messages)
        if everything[:len(held)] == held:
            return everything[len(held):]
        return self.unfed + self._ids(messages[-1:])

    def send(self, text, write=None, stopped=lambda: False):
        """Reply to the user's `text`; write(piece) gets the reply as it comes; the reply ends
        early (finish_reason "interrupted") once stopped() is true."""
        messages = self.messages + [{"role": "user", "content": text}]
        new = self._new_tokens(messages)
        start = time.perf_counter()
        layers = self.model.make_cache(1) if self.layers is None else \
            [c.copy() if c is not None else None for c in self.layers]
        if len(new) > 1:
            prefill(self.model, [new[:-1]], layers, step_size=self.step_size)
        left = []
        decoder = Decoder(self.model, on_leave=lambda row, cache: left.append((row, cache)))
        decoder.join(layers, [Row("reply", self.fed + self.unfed + new, self.sampler,
                                  self.processors, self.max_tokens,
                                  eos_token_ids(self.tokenizer))])
        detokenizer = StreamingDetokenizer(self.tokenizer)
        reply, count, finish, first = "", 0, "length", None
        while decoder:
            if stopped():
                decoder.drop("reply")
                finish = "interrupted"
            for _, token, _, end, _ in decoder.step():
                count += 1
                first = first or time.perf_counter()
                piece = detokenizer.add_token(token) if end != "stop" else ""
                if end:
                    piece += detokenizer.finalize()
                    finish = end
                reply += piece
                if write and piece:
                    write(piece)
        if finish == "interrupted":
            reply += detokenizer.finalize()
        row, cache = left[0]
        # Cut short, the row holds one token more than the reply shows: it is forgotten.
        self.layers, self.fed = cache, row.tokens[:row.fed]
        self.unfed = row.tokens[row.fed:] if finish != "interrupted" else []
        self.messages = messages + [{"role": "assistant", "content": reply}]
        now = time.perf_counter()
        first = first or now
        return Turn(reply, len(new), len(new) / (first - start), count,
                    (count - 1) / (now - first) if count > 1 else 0.0, finish)

    def save(self, file, model_name=""):
        if self.layers is None:
            raise PromptCacheError("nothing to save yet: the conversation is empty")
        save_state(file, self.layers, self.fed, self.unfed, self.model, model_name,
                   self.messages)

    def load(self, file):
        """The conversation and state of a /save file (or the state of any prompt cache, whose
        conversation is then unknown); the next turn continues it."""
        self.layers, self.fed, self.unfed, messages = load_state(file, self.model)
        self.messages = messages or []


# ---------------------------------------------------------------------------------------------
# Command line

def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m mlx_mamba.chat",
        description="Chat with a model in the terminal. The model's state is kept between "
                    "turns, so each turn costs only its new tokens. " + HELP + "; Ctrl-C stops "
                    "a reply.")
    add = parser.add_argument
    cli.add_model_arguments(parser)
    add("--system-prompt", default=None, help="the system message (default: none)")
    add("--max-tokens", "-m", type=cli.integer(1), default=256, help="tokens per reply at most")
    add_sampling_arguments(parser)
    add("--prefill-step-size", type=cli.integer(1), default=PREFILL_STEP_SIZE,
        help="prompt tokens per parallel forward")
    return parser


class _StopOnInterrupt:
    """While a reply streams, Ctrl-C asks it to stop instead of raising KeyboardInterrupt."""

    def __init__(self):
        self.asked = False

    def __enter__(self):
        self.asked = False
        self.previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame):
        self.asked = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def _command(session, line, model_name):
    """Run a /command; False at /exit."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name == "/exit":
        return False
    if name == "/reset":
        session.reset()
        print("[the conversation is cleared]")
    elif name in ("/save", "/load") and argument:
        try:
            if name == "/save":
                session.save(argument, model_name)
                print(f"[saved {len(session.fed) + len(session.unfed)} tokens to {argument}]")
            else:
                session.load(argument)
                print(f"[loaded {len(session.fed) + len(session.unfed)} tokens from "
                      f"{argument}]")
        except (PromptCacheError, OSError) as e:
            cli.fail(e)
    else:
        print(f"[{HELP}]")
    return True


def run(args):
    check_settings(args.temp, args.top_p, args.top_k, args.min_p, args.repetition_penalty)
    model, tokenizer = load_model(args)
    session = ChatSession(model, tokenizer, system_prompt=args.system_prompt,
                          max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          prefill_step_size=args.prefill_step_size)
    print(f"[chatting with {args.model}; {HELP}; Ctrl-C stops a reply]", flush=True)
    interrupt = _StopOnInterrupt()
    while True:
        try:
            line = input(">> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line.strip(), args.model):
                return
            continue
        with interrupt:
            turn = session.send(line, lambda piece: print(piece, end="", flush=True),
                                lambda: interrupt.asked)
        print()
        print(f"[prompt: {turn.prompt_tokens} tokens, {turn.prompt_tps:.1f} tokens-per-sec; "
              f"generation: {turn.generation_tokens} tokens, {turn.generation_tps:.1f} "
              f"tokens-per-sec{'; interrupted' if turn.finish_reason == 'interrupted' else ''}"
              f"; peak memory {mx.get_peak_memory() / 1e9:.3f} GB]", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cli.run(lambda: run(args), (ConfigError, CheckpointError, PromptCacheError,
                                       SamplerError, GenerationError, OSError))


if __name__ == "__main__":
    sys.exit(main())
