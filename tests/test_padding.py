"""Left padding (`mask`) over caches that already hold state: each row gets exactly what it gets alone.

A padded position must leave a row's state untouched (no decay, no input) and must not enter its
conv window, also when the row's cache is not empty and when a whole chunk of the row is padding.
"""

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from comparing import relative_error
from mlx_mamba.prompt_cache import prefill

TOL = 1e-5  # relative to the reference's scale (at least 1)
CONV_WIDTH = 4  # d_conv of the test checkpoints


def error(ours, alone):
    return relative_error(ours, alone, floor=1.0)


@pytest.fixture(scope="module", params=["mamba1", "mamba2_groups_untied"])
def model(request, checkpoint):
    return mlx_mamba.load(checkpoint(request.param)[0])[0]


def run_alone(model, history, tokens):
    """(logits (T, V) of `tokens`, cache) of one row continuing from `history`, without padding."""
    cache = model.make_cache(1)
    model(mx.array([history]), cache)
    return model(mx.array([tokens]), cache)[0], cache


def assert_rows_match(model, batch_cache, alone_caches):
    """Each row's state in `batch_cache` is that of its run alone, and so is the next token's."""
    for row, alone in enumerate(alone_caches):
        for ours, theirs in zip(batch_cache, alone):
            assert error(ours.conv[row], theirs.conv[0]) <= TOL
            assert error(ours.ssm[row], theirs.ssm[0]) <= TOL
    token = mx.array([5])
    stepped = model.step(mx.repeat(token, len(alone_caches)), batch_cache)
    for row, alone in enumerate(alone_caches):
        assert error(stepped[row], model.step(token, alone)[0]) <= TOL


@pytest.mark.parametrize("pads", range(1, CONV_WIDTH + 2))
def test_padded_row_over_a_cache_equals_the_row_alone(model, pads):
    rng = np.random.default_rng(pads)
    histories = rng.integers(0, 100, size=(2, 4)).tolist()
    width = 7
    rows = [rng.integers(0, 100, size=width).tolist(),
            rng.integers(0, 100, size=width - pads).tolist()]
    cache = model.make_cache(2)
    model(mx.array(histories), cache)
    ids = mx.array([rows[0], [0] * pads + rows[1]])
    mask = mx.array([[1] * width, [0] * pads + [1] * (width - pads)])
    logits = model(ids, cache, mask=mask)
    alone = [run_alone(model, h, r) for h, r in zip(histories, rows)]
    assert error(logits[0], alone[0][0]) <= TOL
    assert error(logits[1, pads:], alone[1][0]) <= TOL
    assert_rows_match(model, cache, [c for _, c in alone])


@pytest.mark.parametrize("step_size", [2, 3, 16])
def test_chunked_prefill_over_caches_equals_each_row_alone(model, step_size):
    """Rows of 9, 1 and 4 tokens after different histories; with small steps, whole chunks of the
    shorter rows are padding."""
    rng = np.random.default_rng(step_size)
    histories = rng.integers(0, 100, size=(3, 5)).tolist()
    rows = [rng.integers(0, 100, size=n).tolist() for n in (9, 1, 4)]
    cache = model.make_cache(3)
    model(mx.array(histories), cache)
    prefill(model, rows, cache, step_size=step_size)
    assert_rows_match(model, cache, [run_alone(model, h, r)[1] for h, r in zip(histories, rows)])


def test_a_mask_of_another_shape_is_named(model):
    message = r"mask has shape \(2, 3\); expected \(batch, length\) = \(2, 4\)"
    with pytest.raises(ValueError, match=message):
        model(mx.zeros((2, 4), dtype=mx.int32), mask=mx.ones((2, 3)))
