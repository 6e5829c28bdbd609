"""What the tests compare with: one relative error, and a tokenizer over the tiny checkpoints' ids."""

import numpy as np


def relative_error(ours, theirs):
    """The largest difference relative to the largest reference value, in float64."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


class IdTokenizer:
    """The minimal tokenizer interface, over the tiny checkpoints' 100 ids."""

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def encode(self, text):
        return [ord(c) - 32 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)
