"""Streaming detokenization that never splits a multi-byte character.

Byte-level BPE can spread one UTF-8 character over several tokens; decoding a prefix then ends
in U+FFFD. Text is emitted only once the decoded tail no longer ends in U+FFFD. Each step decodes
a short window of recent tokens (not the whole output), and in context with the tokens before it,
so that tokenizers which drop a word's leading space when it starts a sequence (SentencePiece)
still give the right spacing.
"""


class StreamingDetokenizer:
    """Works with any tokenizer that has `decode(list[int]) -> str`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens = []
        self.start = 0  # window start: context for the pending tokens
        self.pending = 0  # tokens[pending:] have not been emitted as text yet
        self.text = ""  # everything emitted so far

    def _window_texts(self):
        context = self.tokenizer.decode(self.tokens[self.start:self.pending])
        return context, self.tokenizer.decode(self.tokens[self.start:])

    def add_token(self, token):
        """Take one token; returns the text that is now complete ("" while a character is open)."""
        self.tokens.append(token)
        context, full = self._window_texts()
        if full.endswith("\ufffd") or len(full) <= len(context):
            return ""
        return self._emit(full[len(context):])

    def finalize(self):
        """The text still held back (an unfinished character decodes as U+FFFD, as decode does)."""
        context, full = self._window_texts()
        return self._emit(full[len(context):])

    def _emit(self, segment):
        self.start, self.pending = self.pending, len(self.tokens)
        self.text += segment
        return segment
