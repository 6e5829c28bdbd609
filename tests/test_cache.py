"""Forward over a whole sequence == the same sequence split across a cache == prefill then `step`."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from comparing import relative_error
from mlx_mamba import Mamba1, Mamba2

FLAVOURS = ["mamba1", "falcon_mamba", "mamba2", "mamba2_groups_untied"]


def close(a, b, tol=1e-4):
    return relative_error(a, b, floor=1.0) <= tol


@pytest.fixture(params=FLAVOURS)
def model(request, checkpoint):
    return mlx_mamba.load(checkpoint(request.param)[0])[0]


def test_split_forward_and_steps_equal_full_forward(model):
    # 29 tokens (chunk size 8): pieces of 5, 11 and 9 tokens, then 4 single steps.
    ids = mx.array(np.random.default_rng(0).integers(0, 100, size=(3, 29)))
    full = model(ids)
    cache = model.make_cache(3)
    pieces = [model(ids[:, a:b], cache) for a, b in ((0, 5), (5, 16), (16, 25))]
    steps = [model.step(ids[:, t], cache) for t in range(25, 29)]
    assert close(mx.concatenate(pieces, axis=1), full[:, :25])
    assert close(mx.stack(steps, axis=1), full[:, 25:])


def test_cache_is_constant_size(model):
    cache = model.make_cache(2)
    sizes = [(c.conv.shape, c.ssm.shape) for c in cache]
    model(mx.zeros((2, 13), dtype=mx.int32), cache)
    model.step(mx.zeros((2,), dtype=mx.int32), cache)
    assert [(c.conv.shape, c.ssm.shape) for c in cache] == sizes
    assert all(c.ssm.dtype == mx.float32 for c in cache)


def test_left_padding_never_reaches_the_state(model):
    ids = mx.array(np.random.default_rng(1).integers(0, 100, size=(1, 12)))
    alone_cache = model.make_cache(1)
    alone = model(ids, alone_cache)
    padded = mx.concatenate([mx.array([[7, 7, 7, 7, 7]]), ids], axis=1)
    mask = mx.array([[0] * 5 + [1] * 12])
    padded_cache = model.make_cache(1)
    out = model(padded, padded_cache, mask=mask)
    assert close(out[:, 5:], alone)
    token = mx.array([3])
    assert close(model.step(token, padded_cache), model.step(token, alone_cache))


@pytest.mark.parametrize("block", [
    Mamba1(16, d_state=4, dt_rank=2),
    Mamba2(16, d_state=4, head_dim=8, n_groups=2, chunk_size=4),
])
def test_mixer_blocks_alone(block):
    x = mx.random.normal((2, 11, 16))
    full = block(x)
    cache = block.make_cache(2)
    first = block(x[:, :6], cache)
    rest = [block.step(x[:, t], cache) for t in range(6, 11)]
    assert full.shape == (2, 11, 16)
    assert close(mx.concatenate([first, mx.stack(rest, axis=1)], axis=1), full)
