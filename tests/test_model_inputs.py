"""What `model()` and `model.step` say about inputs of the wrong shape, dtype or batch: one clear
ValueError, checked from shapes alone (the graph stays lazy)."""

import mlx.core as mx
import pytest

import mlx_mamba


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
