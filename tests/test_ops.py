"""The scan ops against plain float64 loops: outputs, final states, gradients, long sequences."""

import math

import mlx.core as mx
import numpy as np
import pytest

import float64_reference as ref
from comparing import assert_close
from mlx_mamba import ops


def f32(a):
    return mx.array(np.asarray(a, dtype=np.float32))


def selective_scan_inputs(rng, batch=2, length=37, channels=5, d_state=3, decay=1.0):
    return dict(
        u=rng.normal(size=(batch, length, channels)),
        delta=rng.normal(size=(batch, length, channels)),
        A=-decay * np.exp(rng.normal(size=(channels, d_state))),
        B=rng.normal(size=(batch, length, d_state)),
        C=rng.normal(size=(batch, length, d_state)),
        D=rng.normal(size=channels),
        z=rng.normal(size=(batch, length, channels)),
        delta_bias=rng.normal(size=channels),
        state=rng.normal(size=(batch, channels, d_state)),
    )


def ssd_inputs(rng, batch=2, length=37, heads=6, head_dim=4, groups=3, d_state=5):
    return dict(
        x=rng.normal(size=(batch, length, heads, head_dim)),
        dt=rng.normal(size=(batch, length, heads)),
        A=-np.exp(rng.normal(size=heads)),
        B=rng.normal(size=(batch, length, groups, d_state)),
        C=rng.normal(size=(batch, length, groups, d_state)),
        D=rng.normal(size=heads),
        z=rng.normal(size=(batch, length, heads, head_dim)),
        dt_bias=rng.normal(size=heads),
        initial_states=rng.normal(size=(batch, heads, head_dim, d_state)),
    )


@pytest.mark.parametrize("length", [1, 7, 8, 9, 37, 200])
@pytest.mark.parametrize("optional", [True, False])
def test_selective_scan_matches_float64(length, optional):
    inputs = selective_scan_inputs(np.random.default_rng(length), length=length)
    if not optional:
        # Without softplus, Δ must be positive for the state to decay.
        inputs.update(D=None, z=None, delta_bias=None, state=None, delta=np.abs(inputs["delta"]))
    y, state = ops.selective_scan(
        **{k: None if v is None else f32(v) for k, v in inputs.items()},
        delta_softplus=optional, return_last_state=True)
    y_ref, state_ref = ref.selective_scan(**inputs, delta_softplus=optional)
    assert_close(dict(y=y, state=state), dict(y=y_ref, state=state_ref), 1e-4, floor=1.0)


@pytest.mark.parametrize("length,chunk", [(1, 8), (37, 8), (37, 16), (37, 64), (64, 16), (130, 32)])
@pytest.mark.parametrize("optional", [True, False])
def test_ssd_matches_float64(length, chunk, optional):
    inputs = ssd_inputs(np.random.default_rng(length + chunk), length=length)
    if not optional:
        inputs.update(D=None, z=None, dt_bias=None, initial_states=None, dt=np.abs(inputs["dt"]))
    limit = (0.01, 2.0) if optional else (0.0, math.inf)
    y, state = ops.ssd(**{k: None if v is None else f32(v) for k, v in inputs.items()},
                       chunk_size=chunk, dt_softplus=optional, dt_limit=limit,
                       return_final_states=True)
    y_ref, state_ref = ref.ssd(**inputs, dt_softplus=optional, dt_limit=limit)
    assert_close(dict(y=y, state=state), dict(y=y_ref, state=state_ref), 1e-4, floor=1.0)


def test_ssd_with_D_per_head_dim_matches_float64():
    """D of shape (H, P), as mamba_ssm allows: over a sequence and one step."""
    inputs = ssd_inputs(np.random.default_rng(4), length=37)
    inputs["D"] = np.random.default_rng(5).normal(size=(6, 4))
    args = {k: f32(v) for k, v in inputs.items()}
    y, state = ops.ssd(**args, chunk_size=16, dt_softplus=True, return_final_states=True)
    y_ref, state_ref = ref.ssd(**inputs, dt_softplus=True)
    assert_close(dict(y=y, state=state), dict(y=y_ref, state=state_ref), 1e-4)
    y, state = ops.ssd_step(
        args["initial_states"], args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0],
        args["C"][:, 0], args["D"], args["z"][:, 0], args["dt_bias"], True)
    first = {k: v[:, :1] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    y_ref, state_ref = ref.ssd(**first, dt_softplus=True)
    assert_close(dict(y=y, state=state), dict(y=y_ref[:, 0], state=state_ref), 1e-5, floor=1.0)


def test_ssd_chunk_size_changes_nothing():
    inputs = {k: f32(v) for k, v in ssd_inputs(np.random.default_rng(3), length=100).items()}
    outputs = [ops.ssd(**inputs, chunk_size=c, dt_softplus=True, return_final_states=True)
               for c in (4, 25, 32, 64, 100)]
    for y, state in outputs[1:]:
        assert mx.allclose(y, outputs[0][0], atol=1e-4).item()
        assert mx.allclose(state, outputs[0][1], atol=1e-4).item()


def test_steps_match_float64():
    rng = np.random.default_rng(5)
    m1 = selective_scan_inputs(rng, length=1)
    y, state = ops.selective_scan_step(
        f32(m1["state"]), f32(m1["u"][:, 0]), f32(m1["delta"][:, 0]), f32(m1["A"]),
        f32(m1["B"][:, 0]), f32(m1["C"][:, 0]), f32(m1["D"]), f32(m1["z"][:, 0]),
        f32(m1["delta_bias"]), True)
    y_ref, state_ref = ref.selective_scan(**m1, delta_softplus=True)
    assert_close(dict(y=y, state=state), dict(y=y_ref[:, 0], state=state_ref), 1e-5, floor=1.0)
    m2 = ssd_inputs(rng, length=1)
    y, state = ops.ssd_step(
        f32(m2["initial_states"]), f32(m2["x"][:, 0]), f32(m2["dt"][:, 0]), f32(m2["A"]),
        f32(m2["B"][:, 0]), f32(m2["C"][:, 0]), f32(m2["D"]), f32(m2["z"][:, 0]),
        f32(m2["dt_bias"]), True, (0.01, 2.0))
    y_ref, state_ref = ref.ssd(**m2, dt_softplus=True, dt_limit=(0.01, 2.0))
    assert_close(dict(y=y, state=state), dict(y=y_ref[:, 0], state=state_ref), 1e-5, floor=1.0)


def _check_gradients(op, reference, inputs, weights, differentiable):
    """mx.grad of sum(y * w) + sum(state * v) against central differences of the float64 loop."""
    names = list(differentiable)

    def loss(*arrays):
        y, state = op(**{**{k: f32(v) for k, v in inputs.items()}, **dict(zip(names, arrays))})
        return (y * f32(weights[0])).sum() + (state * f32(weights[1])).sum()

    grads = mx.grad(loss, argnums=list(range(len(names))))(*[f32(inputs[n]) for n in names])

    def loss64(values):
        y, state = reference(**values)
        return (y * weights[0]).sum() + (state * weights[1]).sum()

    eps = 1e-6
    for name, grad in zip(names, grads):
        numeric = np.zeros_like(inputs[name])
        for index in np.ndindex(*inputs[name].shape):
            plus, minus = dict(inputs), dict(inputs)
            plus[name] = inputs[name].copy()
            plus[name][index] += eps
            minus[name] = inputs[name].copy()
            minus[name][index] -= eps
            numeric[index] = (loss64(plus) - loss64(minus)) / (2 * eps)
        assert_close(grad, numeric, 1e-3, floor=1.0, name=f"the gradient of {name}")


def test_selective_scan_gradients_match_finite_differences():
    rng = np.random.default_rng(7)
    inputs = selective_scan_inputs(rng, batch=1, length=11, channels=3, d_state=2)
    weights = rng.normal(size=(1, 11, 3)), rng.normal(size=(1, 3, 2))
    _check_gradients(
        lambda **kw: ops.selective_scan(**kw, delta_softplus=True, return_last_state=True),
        lambda **kw: ref.selective_scan(**kw, delta_softplus=True),
        inputs, weights, inputs.keys())


@pytest.mark.parametrize("D_shape", [(4,), (4, 2)])
def test_ssd_gradients_match_finite_differences(D_shape):
    rng = np.random.default_rng(8)
    inputs = ssd_inputs(rng, batch=1, length=11, heads=4, head_dim=2, groups=2, d_state=3)
    inputs["D"] = rng.normal(size=D_shape)
    weights = rng.normal(size=(1, 11, 4, 2)), rng.normal(size=(1, 4, 2, 3))
    _check_gradients(
        lambda **kw: ops.ssd(**kw, chunk_size=4, dt_softplus=True, return_final_states=True),
        lambda **kw: ref.ssd(**kw, dt_softplus=True),
        inputs, weights, inputs.keys())


@pytest.mark.parametrize("decay", ["strong", "slow"])
def test_long_sequences_stay_finite_and_accurate(decay):
    """T = 8192: strong decay (ΔA down to about -60 per step) and slow decay (about -1e-4)."""
    rng = np.random.default_rng(9)
    length = 8192
    m1 = selective_scan_inputs(rng, batch=1, length=length, channels=4, d_state=4)
    m2 = ssd_inputs(rng, batch=1, length=length, heads=2, head_dim=4, groups=1, d_state=4)
    if decay == "strong":
        m1["delta_bias"] = np.full(4, 4.0)
        m1["A"] = -np.full((4, 4), 10.0) * np.linspace(1, 1.2, 4)
        m2["dt_bias"] = np.full(2, 4.0)
        m2["A"] = -np.array([10.0, 12.0])
    else:
        m1["delta_bias"] = np.full(4, -9.0)
        m2["dt_bias"] = np.full(2, -9.0)
    y, state = ops.selective_scan(**{k: f32(v) for k, v in m1.items()}, delta_softplus=True,
                                  return_last_state=True)
    y_ref, state_ref = ref.selective_scan(**m1, delta_softplus=True)
    ours = {"selective_scan y": y, "selective_scan state": state}
    theirs = {"selective_scan y": y_ref, "selective_scan state": state_ref}
    y, state = ops.ssd(**{k: f32(v) for k, v in m2.items()}, chunk_size=256, dt_softplus=True,
                       return_final_states=True)
    y_ref, state_ref = ref.ssd(**m2, dt_softplus=True)
    ours |= {"ssd y": y, "ssd state": state}
    theirs |= {"ssd y": y_ref, "ssd state": state_ref}
    errors = assert_close(ours, theirs, 1e-3)  # NaN or Inf anywhere fails
    print(f"T={length} {decay} decay: relative errors " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))


def test_ops_are_lazy():
    """Under mx.compile any evaluation inside the op raises; the ops only build graph."""
    rng = np.random.default_rng(10)
    m1 = {k: f32(v) for k, v in selective_scan_inputs(rng).items()}
    m2 = {k: f32(v) for k, v in ssd_inputs(rng).items()}
    scan = mx.compile(lambda *a: ops.selective_scan(**dict(zip(m1, a)), delta_softplus=True))
    both = mx.compile(lambda *a: ops.ssd(**dict(zip(m2, a)), chunk_size=16, dt_softplus=True))
    assert scan(*m1.values()).shape == (2, 37, 5)
    assert both(*m2.values()).shape == (2, 37, 6, 4)
