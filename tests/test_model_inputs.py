"""What `model()` and `model.step` say about inputs of the wrong shape, dtype or batch: one clear
ValueError, checked from shapes alone (the graph stays lazy); and what they do with ids outside
the vocabulary: read inside the table and give NaN logits at those positions."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_mamba
from comparing import assert_close


@pytest.fixture(scope="module", params=["mamba2", "nemotron_h"])
def model(request, checkpoint):
    return mlx_mamba.load(checkpoint(request.param)[0])[0]


@pytest.mark.parametrize("call,message", [
    (lambda m: m(mx.zeros((1, 0), mx.int32)), r"shape \(1, 0\)"),
    (lambda m: m(mx.array([1, 2, 3])), "model.step"),
    (lambda m: m(mx.array([[1.0, 2.0]])), "integers"),
    (lambda m: m(mx.array([[1, 2]]), mask=mx.array([[1, 1, 1]])), "mask"),
    (lambda m: m(mx.array([[1, 2]]), m.make_cache(2)), "cache holds 2 sequences"),
    (lambda m: m(mx.array([[1, 2]]), m.make_cache(1)[:-1]), "model.make_cache"),
    (lambda m: m.step(mx.array([[1]]), m.make_cache(1)), r"\(batch,\)"),
    (lambda m: m.step(mx.array([1, 2]), m.make_cache(3)), "cache holds 3 sequences"),
    (lambda m: m([[1, 2]]), "token ids"),
])
def test_bad_inputs_get_one_clear_error(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


BAD_IDS = [-1, 100, 2**31 - 1]  # the tiny checkpoints' vocabulary is 100 ids


@pytest.fixture(scope="module", params=["mamba2", "nemotron_h", "zamba2", "mamba2-quantized"])
def any_model(request, checkpoint):
    """A pure model, two hybrids (Zamba2's shared blocks also read the embeddings) and a pure
    model whose embedding table is quantized."""
    flavour = request.param.removesuffix("-quantized")
    model = mlx_mamba.load(checkpoint(flavour)[0])[0]
    if request.param.endswith("quantized"):
        nn.quantize(model, group_size=32, bits=8)
        assert isinstance(model.backbone.embeddings, nn.QuantizedEmbedding)
    return model


def test_ids_outside_the_vocabulary_read_inside_the_table_and_give_nan(any_model):
    """model() stays lazy and unchecked, yet an id outside [0, vocab) reads inside the table
    (2**31 - 1 ended the process with SIGSEGV) and its position's logits are NaN; the others are
    those of the ids clamped into the table."""
    model = any_model
    ids = np.random.default_rng(0).integers(0, 100, (2, 7))
    bad = {(0, 1): -1, (0, 5): 100, (1, 3): 2**31 - 1}
    for (row, t), v in bad.items():
        ids[row, t] = v
    logits = np.array(model(mx.array(ids, mx.int32)).astype(mx.float32))
    expected = np.array(model(mx.array(np.clip(ids, 0, 99), mx.int32)).astype(mx.float32))
    positions = np.zeros(ids.shape, bool)
    positions[tuple(zip(*bad))] = True
    assert np.isnan(logits[positions]).all()
    assert np.isfinite(logits[~positions]).all()
    assert_close(logits[~positions], expected[~positions], 1e-6, name="the logits of the other positions")

    cache, clamped = model.make_cache(3), model.make_cache(3)
    for t in range(2):
        step_ids = np.array([BAD_IDS[t], 7, BAD_IDS[t + 1]]) if t else np.array(BAD_IDS)
        stepped = np.array(model.step(mx.array(step_ids, mx.int32), cache).astype(mx.float32))
        want = np.array(model.step(mx.array(np.clip(step_ids, 0, 99), mx.int32), clamped).astype(mx.float32))
        in_vocab = (step_ids >= 0) & (step_ids < 100)
        assert np.isnan(stepped[~in_vocab]).all() and np.isfinite(stepped[in_vocab]).all()
        assert_close(stepped[in_vocab], want[in_vocab], 1e-6, name=f"step {t}'s logits of good ids")
