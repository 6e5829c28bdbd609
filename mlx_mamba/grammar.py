"""Structured output: text that follows a grammar (a JSON schema, a Lark grammar or a regular
expression) at any temperature, because every token the grammar does not allow next is masked
out of the logits before sampling.

llguidance (the `server` extra) compiles the grammar and, from the tokens sampled so far,
computes on the CPU the bitmask of the tokens allowed next; `sample.apply_token_mask` applies it
to the logits in MLX. A logits processor made by `logits_processor` does both, one per sequence
(it follows the tokens of its own sequence), in the one sampling path of generate.py.
"""

import dataclasses
import json
import logging
import weakref

import mlx.core as mx
import numpy as np

from .sample import apply_token_mask

log = logging.getLogger("mlx_mamba.grammar")


class GrammarError(ValueError):
    """A grammar or response_format that cannot be used; the message says what is wrong."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs llguidance: pip install "
                           "'mlx-mamba[server]' (or pip install llguidance)") from None
    return llguidance


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A checked grammar in llguidance's format (`text`, JSON); build one with `json_schema`,
    `lark` or `regex`."""

    text: str

    @classmethod
    def json_schema(cls, schema):
        """JSON text that validates against `schema` (a dict, or a JSON string), written
        compactly (no free whitespace, which a model could repeat without end)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema is an object, not {type(schema).__name__}")
        matcher = _llguidance().LLMatcher
        try:
            text = matcher.grammar_from_json_schema(schema,
                                                    defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:  # what cannot be serialised
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return cls._checked(text, "JSON schema")

    @classmethod
    def lark(cls, text):
        """Text that the Lark grammar `text` derives (llguidance's Lark dialect, which also
        embeds JSON schemas as `%json {...}`)."""
        return cls._checked(_llguidance().LLMatcher.grammar_from_lark(text), "Lark grammar")

    @classmethod
    def regex(cls, pattern):
        """Text that matches the regular expression `pattern` whole."""
        return cls._checked(_llguidance().LLMatcher.grammar_from_regex(pattern),
                            "regular expression")

    @classmethod
    def _checked(cls, text, what):
        failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(text)
        if failed:
            raise GrammarError(f"unsupported or invalid {what}: {'; '.join(messages)}")
        return cls(text)


def from_response_format(response_format):
    """The Grammar of an OpenAI `response_format` ({"type": "text"}, {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}),
    None for text; a Grammar passes through."""
    if response_format is None or isinstance(response_format, Grammar):
        return response_format
    if not isinstance(response_format, dict):
        raise GrammarError(f"response_format has type {type(response_format).__name__}: "
                           "expected a dict (OpenAI's response_format) or a Grammar")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_schema({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format json_schema needs json_schema.schema, an object")
        # OpenAI allows the schema to be left out: any JSON object then.
        return Grammar.json_schema(spec.get("schema") or {"type": "object"})
    raise GrammarError(f"response_format type {kind!r} is not one of 'text', 'json_object', "
                       "'json_schema'")


_TABLES = weakref.WeakKeyDictionary()  # tokenizer -> {vocabulary size: llguidance tokenizer}


def token_table(tokenizer, vocab_size):
    """llguidance's view of `tokenizer` (each token's bytes), for logits of `vocab_size`;
    built once per tokenizer (about a second for a 128k vocabulary)."""
    if tokenizer is None:
        raise GrammarError("structured output needs the model's tokenizer")
    tables = _TABLES.setdefault(tokenizer, {})
    if vocab_size not in tables:
        tables[vocab_size] = _make_table(tokenizer, vocab_size)
    return tables[vocab_size]


def _make_table(tokenizer, vocab_size):
    llguidance = _llguidance()
    size = max(vocab_size, len(tokenizer))
    try:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=size)
    except (ValueError, TypeError):
        # A decoder llguidance does not know (Metaspace, Fuse...): each token's text in context.
        pass
    try:
        return llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_DecodedTokens(tokenizer, size)), n_vocab=size)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"llguidance cannot read this tokenizer: {e}") from None


class _DecodedTokens:
    """A tokenizer as llguidance's TokenizerWrapper reads it: each token's bytes, decoded after
    a plain token (a token decoded alone can lose its leading space, as Metaspace's do)."""

    def __init__(self, tokenizer, size):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = list(getattr(tokenizer, "all_special_ids", []))
        count = len(tokenizer)
        self.before = tokenizer.encode("a", add_special_tokens=False)
        start = len(tokenizer.decode(self.before))
        self.tokens = [tokenizer.decode(self.before + [i])[start:].encode() if i < count
                       else b"" for i in range(size)]

    def __call__(self, text):
        """Token ids of `text` in the middle of a text (no space put in front, as Metaspace
        puts at the start)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self.tokenizer.encode("a" + text, add_special_tokens=False)
        if ids[:len(self.before)] == self.before:
            return ids[len(self.before):]
        return self.tokenizer.encode(text, add_special_tokens=False)


def logits_processor(grammar, tokenizer, vocab_size):
    """A logits processor (tokens so far (T,), logits (1, V)) -> logits for ONE sequence: its
    first call takes the tokens as the prompt; each later call consumes the tokens added since
    and masks every token the grammar does not allow next. Once the grammar is complete only
    the end-of-sequence tokens are allowed."""
    table = token_table(tokenizer, vocab_size)
    matcher = _llguidance().LLMatcher(table, grammar.text)
    if matcher.is_error():
        raise GrammarError(f"the grammar does not fit this tokenizer: {matcher.get_error()}")
    seen = None  # tokens consumed, counted from the start of the prompt

    def process(tokens, logits):
        nonlocal seen
        if seen is None:
            seen = tokens.size
        elif tokens.size > seen:
            for token in tokens[seen:].tolist():
                if not matcher.consume_token(token):
                    log.warning("the grammar refused token %d: %s", token,
                                matcher.get_error().splitlines()[0])
            seen = tokens.size
        words = None if matcher.is_error() else \
            np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32)
        if words is None or not words[:(vocab_size + 31) // 32].any():
            # Nothing the grammar allows is a token of this vocabulary (or it failed): end
            # the sequence rather than sample junk.
            words = np.zeros((table.vocab_size + 31) // 32, np.uint32)
            for eos in table.eos_tokens:
                words[eos // 32] |= np.uint32(1 << (eos % 32))
        return apply_token_mask(logits, mx.array(words)[None])

    return process
