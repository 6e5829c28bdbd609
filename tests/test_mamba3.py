"""Mamba-3 against a float64 loop written from the official module's mathematics: the parallel
forward, continuation over the cache, `step`, left padding and gradients, SISO and MIMO."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import float64_reference as ref
from comparing import relative_error
from mlx_mamba import Mamba3, Mamba3Cache
from mlx_mamba.ops.mamba3 import wrapped_cumsum

D_MODEL, D_STATE, HEADDIM, HEADS = 16, 8, 4, 8

CONFIGS = [dict(is_mimo=mimo, ngroups=groups, rope_fraction=fraction, is_outproj_norm=norm)
           for mimo, groups, fraction, norm in itertools.product(
               (False, True), (1, 2), (0.5, 1.0), (False, True))]
# The March 2026 release's A = -softplus(dd_A).
SOFTPLUS_CONFIGS = [{**CONFIGS[0], "A_activation": "softplus"},
                    {**CONFIGS[-1], "A_activation": "softplus"}]


def config_id(config):
    return "-".join([("mimo" if config["is_mimo"] else "siso"), f"g{config['ngroups']}",
                     f"rope{config['rope_fraction']}", "norm" if config["is_outproj_norm"] else "",
                     config.get("A_activation", "")])


def make_mixer(config, seed=0, A_floor=0.5):
    """A mixer with every parameter random under its official name, and those float64 params.
    A_floor 0.5 clamps A where dd_A < -1 (some of the entries here)."""
    mixer = Mamba3(D_MODEL, d_state=D_STATE, expand=HEADS * HEADDIM // D_MODEL, headdim=HEADDIM,
                   A_floor=A_floor, mimo_rank=3, chunk_size=8, **config)
    rng = np.random.default_rng(seed)
    params = {}
    for name, value in tree_flatten(mixer.parameters()):
        scale = 0.375 if name == "in_proj.weight" else 0.5
        params[name] = rng.normal(size=value.shape) * scale + (1.0 if "norm" in name else 0.0)
    mixer.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in params.items()])
    return mixer, params


def reference(config, params, u, state=None, A_floor=0.5):
    return ref.mamba3(params, np.asarray(u, np.float64), D_STATE, HEADDIM, config["ngroups"],
                      config["rope_fraction"], A_floor, config["is_mimo"], 3,
                      config["is_outproj_norm"], state,
                      A_activation=config.get("A_activation", "heavy_tail"))


def rel_error(ours, theirs):
    return relative_error(ours, theirs, floor=1.0)


def check_cache(cache, state, tol=1e-4):
    angle, ssm, k, v = state
    # Angles mod 2π: compare on the circle.
    turned = np.angle(np.exp(1j * (np.array(cache.angle, np.float64) - angle)))
    assert np.abs(turned).max() < tol
    for ours, theirs in ((cache.ssm, ssm), (cache.k, k), (cache.v, v)):
        assert rel_error(ours, theirs) < tol


def inputs(seed, batch=2, length=21):
    return mx.array(np.random.default_rng(100 + seed).normal(size=(batch, length, D_MODEL))
                    .astype(np.float32))


@pytest.mark.parametrize("config", CONFIGS + SOFTPLUS_CONFIGS, ids=config_id)
def test_forward_continuation_and_step_match_float64(config):
    mixer, params = make_mixer(config)
    u = inputs(1)
    expected, state = reference(config, params, u)

    cache = mixer.make_cache(2)
    out = mixer(u, cache)
    assert rel_error(out, expected) < 1e-4
    check_cache(cache, state)

    # The same tokens in pieces over the cache (a piece crossing a chunk boundary), then steps.
    cache = mixer.make_cache(2)
    pieces = [mixer(u[:, :3], cache), mixer(u[:, 3:17], cache)]
    pieces += [mixer.step(u[:, t], cache)[:, None] for t in range(17, 21)]
    assert rel_error(mx.concatenate(pieces, axis=1), expected) < 1e-4
    check_cache(cache, state)

    # Continuing from a non-zero state whose previous k and v are not zero.
    more = inputs(2, length=11)
    expected, state = reference(config, params, more, state)
    assert rel_error(mixer(more, cache), expected) < 1e-4
    check_cache(cache, state)


@pytest.mark.parametrize("config", [CONFIGS[0], SOFTPLUS_CONFIGS[0]], ids=config_id)
def test_A_floor_clamps_some_entries(config):
    mixer, params = make_mixer(config)
    _, _, _, _, dA, dt, _, _ = mixer._prepare(inputs(1), mixer.make_cache(2), None)
    A = np.array(dA / dt)
    assert (np.isclose(A, -0.5)).mean() > 0.05 and (A < -0.51).mean() > 0.05


def test_long_sequence_many_chunks_matches_float64():
    config = CONFIGS[-1]  # MIMO, 2 groups, full rotation, output norm
    mixer, params = make_mixer(config, seed=3)
    u = inputs(3, batch=1, length=70)
    expected, state = reference(config, params, u)
    cache = mixer.make_cache(1)
    assert rel_error(mixer(u, cache), expected) < 1e-4
    check_cache(cache, state)


@pytest.mark.parametrize("length", [1, 8, 9, 100, 20000])
def test_angles_accumulate_mod_2pi_without_losing_precision(length):
    # Turns of up to 3 rad: a plain float32 cumulative sum drifts by 0.1 rad at 20000 tokens,
    # wrapping by float32's 2π alone by 9e-4; this sum by 2.4e-4 (float32 rounding of each
    # block's sum, which the later angles all carry).
    turns = np.random.default_rng(length).uniform(0, 3, (2, length, 3))
    ours = np.array(wrapped_cumsum(mx.array(turns.astype(np.float32))), np.float64)
    theirs = np.cumsum(turns.astype(np.float32).astype(np.float64), axis=1)
    assert ours.min() > -1e-6 and ours.max() < 2 * np.pi + 1e-6
    assert np.abs(np.angle(np.exp(1j * (ours - theirs)))).max() < 1e-4 * max(1, length / 1000)


@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[13]], ids=config_id)
def test_left_padding_gives_the_unpadded_rows(config):
    mixer, _ = make_mixer(config)
    prefix, u = inputs(4, length=5), inputs(5, length=9)
    cache = mixer.make_cache(2)
    mixer(prefix, cache)
    # Row 1 is padded by 4 (random) tokens on the left; row 0 is not padded.
    padded = mx.concatenate([u[:1], mx.concatenate([inputs(6, 1, 4), u[1:, :5]], axis=1)])
    mask = mx.array([[1] * 9, [0] * 4 + [1] * 5])
    padded_cache = cache.copy()
    out = mixer(padded, padded_cache, mask)
    alone = mixer.make_cache(1)
    alone.state = [a[1:] for a in cache.state]
    expected = mixer(u[1:, :5], alone)
    assert rel_error(out[1:, 4:], expected) < 1e-5
    for ours, theirs in zip(padded_cache.state, alone.state):
        assert rel_error(ours[1:], theirs) < 1e-5
    assert rel_error(out[:1], mixer(u[:1], Mamba3Cache(*[a[:1] for a in cache.state]))) < 1e-5


@pytest.mark.parametrize("config", [CONFIGS[6], CONFIGS[13]], ids=config_id)
def test_gradients_match_finite_differences(config):
    mixer, params = make_mixer(config, seed=7)
    u = inputs(7, batch=1, length=11)
    weights = np.random.default_rng(8).normal(size=(1, 11, D_MODEL))

    def loss(model):
        return (model(u) * mx.array(weights.astype(np.float32))).sum()

    grads = dict(tree_flatten(nn.value_and_grad(mixer, loss)(mixer)[1]))
    rng = np.random.default_rng(9)
    step = 1e-6
    for name, value in params.items():
        for _ in range(2):
            index = tuple(rng.integers(0, n) for n in value.shape)
            shifted = {k: v.copy() for k, v in params.items()}
            shifted[name][index] += step
            up = (reference(config, shifted, u)[0] * weights).sum()
            shifted[name][index] -= 2 * step
            down = (reference(config, shifted, u)[0] * weights).sum()
            numeric = (up - down) / (2 * step)
            assert abs(float(grads[name][index]) - numeric) < 2e-3 * max(1.0, abs(numeric)), name


def test_official_parameter_names_and_shapes():
    mixer = Mamba3(32, d_state=16, headdim=8, ngroups=2, is_mimo=True, mimo_rank=4,
                   is_outproj_norm=True)
    H, R, S = 8, 4, 4  # 64 / 8 heads; 16 · 0.5 / 2 angles
    shapes = dict((k, v.shape) for k, v in tree_flatten(mixer.parameters()))
    assert shapes == {
        "in_proj.weight": (2 * 64 + 2 * 16 * 2 * R + 3 * H + S, 32), "dt_bias": (H,),
        "B_bias": (H, R, 16), "C_bias": (H, R, 16), "B_norm.weight": (16,),
        "C_norm.weight": (16,), "mimo_x": (H, R, 8), "mimo_z": (H, R, 8), "mimo_o": (H, R, 8),
        "D": (H,), "norm.weight": (64,), "out_proj.weight": (32, 64)}
    siso = dict((k, v.shape) for k, v in tree_flatten(Mamba3(32).parameters()))
    assert siso["in_proj.weight"] == (2 * 64 + 2 * 128 + 3 * 1 + 32, 32)
    assert siso["B_bias"] == (1, 1, 128) and "mimo_x" not in siso and "norm.weight" not in siso


@pytest.mark.parametrize("kwargs, field", [
    (dict(rope_fraction=0.7), "rope_fraction"), (dict(headdim=7), "headdim"),
    (dict(ngroups=3), "ngroups"), (dict(d_state=9), "d_state"), (dict(d_state=2), "d_state"),
    (dict(is_mimo=True, mimo_rank=0), "mimo_rank"), (dict(A_activation="relu"), "A_activation")])
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Mamba3(32, **{"d_state": 16, "headdim": 8, **kwargs})


def test_cache_operations():
    mixer, _ = make_mixer(CONFIGS[4])
    cache = mixer.make_cache(2)
    mixer(inputs(1), cache)
    assert cache.batch_size == 2 and len(cache.state) == 4
    saved = {k: v[1:] for k, v in cache.arrays().items()}
    fresh = mixer.make_cache(1)
    fresh.restore(saved)
    kept = cache.copy()
    kept.keep(mx.array([1]))
    for a, b in zip(fresh.state, kept.state):
        assert mx.array_equal(a, b)
    with pytest.raises(ValueError, match="ssm has shape"):
        mixer.make_cache(1).restore({**saved, "ssm": mx.zeros((1, 2))})
    with pytest.raises(ValueError, match="expected"):
        mixer.make_cache(1).restore({"ssm": saved["ssm"]})
