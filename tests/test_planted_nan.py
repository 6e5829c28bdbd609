"""A NaN or an Inf fails every tolerance check, naming the array (issue 23).

Python's max() skips a NaN that is not first, and `nan < tol` is False but `not nan > tol` is True:
a suite that asserted `max(errors) < tol` passed a kernel that wrote NaN into five gradients of
nine. Here the comparison helper is checked on its own, then a NaN is planted in the kernels
(tests/kernel_texts.py: the forward kernel's chunk checkpoints of a thread's channels saved over
its first channel's, so the backward kernel reads unwritten slots, NaN in the emulator) and the
kernel, real-size, tuning and parity tests are run on it: each must fail, naming an array.
"""
import math

import mlx.core as mx
import numpy as np
import pytest

import test_hybrid_tuning
import test_kernel_shapes
import test_kernels
import test_parity
import test_tuner
from comparing import assert_close, relative_error
from kernel_texts import PLANTED_NAN, plant
from metal_emulator import harness
from mlx_mamba.ops import kernel_ops


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["ours", "theirs"])
def test_relative_error_of_a_non_finite_value_is_inf(bad, where):
    good = np.linspace(1.0, 2.0, 12).reshape(3, 4)
    broken = good.copy()
    broken[2, 1] = bad
    ours, theirs = (broken, good) if where == "ours" else (good, broken)
    assert relative_error(ours, theirs) == math.inf
    assert relative_error(mx.array(ours).astype(mx.bfloat16), theirs) == math.inf
    assert relative_error(good, good) == 0.0 and relative_error(good[:2], good) == math.inf


def test_assert_close_names_every_array_that_fails():
    ref = {name: np.ones(4) for name in ("dx", "ddt", "dA", "dB")}
    ours = dict(ref, ddt=np.array([1.0, math.nan, 1.0, 1.0]), dB=np.array([1.0, 1.0, math.inf, 1.0]),
                dA=np.full(4, 1.5))
    with pytest.raises(AssertionError) as caught:
        assert_close(ours, ref, 1e-5)
    message = str(caught.value)
    assert "ddt: 1 NaN and 0 Inf in ours (first at (1,))" in message
    assert "dB: 0 NaN and 1 Inf in ours (first at (2,))" in message
    assert "dA: relative error 0.5" in message and "dx:" not in message.split("\n")[0]
    assert assert_close(ref, ref, 0.0) == dict.fromkeys(ref, 0.0)
    with pytest.raises(AssertionError, match=r"y: shape \(3,\), expected \(4,\)"):
        assert_close(np.ones(3), np.ones(4), 1.0, name="y")


# The issue's planted bug for gradients; the forward outputs' analogue for the logits (parity):
# y of a thread's channels after its first never written.
PLANTED_NAN_Y = ("fwd", "if (lane % (S / CPT) == 0) {", "if (lane % (S / CPT) == 0 && r == 0) {")


@pytest.fixture
def planted(monkeypatch):
    """Emulated kernels, with a bug planted; the models run them (MLX_MAMBA_BACKEND=metal)."""
    harness.install(monkeypatch)
    monkeypatch.setenv("MLX_MAMBA_BACKEND", "metal")

    def with_bug(bug):
        plant(monkeypatch, *bug)
    yield with_bug
    kernel_ops._kernel.cache_clear()


def test_kernel_test_fails_on_the_planted_nan(planted):
    planted(PLANTED_NAN)
    with pytest.raises(AssertionError, match=r"ddt: \d+ NaN .* dA: \d+ NaN"):
        test_kernels.test_gradients("metal", "mamba2-4-channels-a-thread")


def test_real_size_test_fails_on_the_planted_nan(planted):
    planted(PLANTED_NAN)
    c = test_kernel_shapes.case(test_kernel_shapes.MAMBA2_64, L=19, dtype=mx.float32)
    with pytest.raises(AssertionError, match=r"ddt: \d+ NaN .* dA: \d+ NaN"):
        test_kernel_shapes.test_metal_at_real_sizes(None, c)


TUNING = {  # gradients of a pure and of a hybrid model against torch autograd, through the kernels
    "pure": lambda checkpoint, tmp_path, monkeypatch: test_tuner.test_loss_and_gradients_match_torch_autograd(checkpoint, "mamba2"),
    "hybrid": lambda checkpoint, tmp_path, monkeypatch: test_hybrid_tuning.test_gradients_match_torch_autograd_through_transformers(
        checkpoint, "bamba", tmp_path, monkeypatch),
}


@pytest.mark.parametrize("model", TUNING)
def test_tuning_test_fails_on_the_planted_nan(planted, checkpoint, tmp_path, monkeypatch, model):
    planted(PLANTED_NAN)
    with pytest.raises(AssertionError, match=r"A_log: \d+ NaN"):
        TUNING[model](checkpoint, tmp_path, monkeypatch)


def test_parity_test_fails_on_a_planted_nan(planted, checkpoint, tokenizer_file):
    planted(PLANTED_NAN_Y)
    with pytest.raises(AssertionError, match=r"mamba2's logits: \d+ NaN"):
        test_parity.test_logits_match_transformers(checkpoint, "mamba2", tokenizer_file)
