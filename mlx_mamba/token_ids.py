"""Checking token ids that come from a user before they reach a model.

`model(ids)` and `model.step` do not check their ids (that would force the lazy ids to be
evaluated): an id outside the vocabulary reads a clamped row and gives NaN logits at its position,
which says something is wrong but not what. Every entry point that takes ids from a user
(generation, prompt caches, training data) passes them through `check_token_ids` first, which
names the bad id.
"""

import mlx.core as mx
import numpy as np


class TokenIdError(ValueError):
    """Token ids that no model may be given; the message names the first bad one."""


def check_token_ids(ids, vocab_size):
    """`ids` as a list of Python ints, each in 0..vocab_size-1.

    ids: a list or tuple of ints (numpy integer scalars too), or a 1-D integer array (numpy or
    MLX). Anything else (bools, floats, strings, nested lists, 2-D arrays) is refused.
    """
    if isinstance(ids, (np.ndarray, mx.array)):
        integer = (mx.issubdtype(ids.dtype, mx.integer) if isinstance(ids, mx.array)
                   else np.issubdtype(ids.dtype, np.integer))
        if ids.ndim != 1 or not integer:
            raise TokenIdError(f"token ids must be a 1-D integer array, not a {ids.dtype} array "
                               f"of shape {tuple(ids.shape)}")
        ids = ids.tolist()
    elif not isinstance(ids, (list, tuple)):
        raise TokenIdError(f"token ids must be a list of ints or a 1-D integer array, not a "
                           f"{type(ids).__name__}")
    if all(type(token) is int for token in ids) and min(ids, default=0) >= 0 \
            and max(ids, default=0) < vocab_size:
        return list(ids)  # the common case, at C speed; the loop below finds the culprit
    for position, token in enumerate(ids):
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise TokenIdError(f"the token at position {position} is a {type(token).__name__}, "
                               "not an integer id")
        if not 0 <= token < vocab_size:
            raise TokenIdError(f"token id {token} is outside the model's vocabulary "
                               f"(0..{vocab_size - 1}) at position {position}")
    return [int(token) for token in ids]
