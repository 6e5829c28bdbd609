"""Speculative decoding: rewindable caches of every kind, greedy text equal to plain greedy for
every family, the sampled distribution equal to the target's, and the errors of bad settings."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from comparing import relative_error
from mlx_mamba.cache import mark, rewind
from mlx_mamba.config import ModelConfig

# Every family: pure Mamba1, Mamba2, Mamba-3 (SISO and MIMO), and each hybrid's cache layout.
HYBRIDS = ["bamba", "granite_moe", "granite_rope", "nemotron_h", "falcon_h1", "zamba2", "jamba"]
FAMILIES = ["mamba1", "mamba2", "mamba3", "mamba3_mimo"] + HYBRIDS
MAMBA3 = {
    "mamba3": dict(layer="Mamba3", d_state=16, expand=2, headdim=16, ngroups=2, chunk_size=8,
                   A_floor=0.05),
    "mamba3_mimo": dict(layer="Mamba3", d_state=16, expand=2, headdim=16, ngroups=1,
                        chunk_size=8, is_mimo=True, mimo_rank=2, rope_fraction=1.0,
                        is_outproj_norm=True),
}


def mamba3_model(flavour, seed=0):
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 100,
              "ssm_cfg": MAMBA3[flavour], "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    mx.random.seed(seed)
    model = mlx_mamba.Model(ModelConfig.from_dict(config))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def family_model(checkpoint):
    loaded = {}

    def make(family):
        if family not in loaded:
            loaded[family] = mamba3_model(family) if family in MAMBA3 else \
                mlx_mamba.load(str(checkpoint(family)[0]))[0]
        return loaded[family]

    return make


def layer_arrays(cache, row):
    """Every state array of one row of a model's cache, by name; keys and values only where
    they are real tokens (a rewound row may hold masked holes)."""
    out = {}
    for i, layer in enumerate(cache):
        if layer is None:
            continue
        for name, array in layer.arrays().items():
            if name.endswith(("keys", "values")):
                valid = layer.arrays().get(name.rsplit(".", 1)[0] + ".valid" if "." in name
                                           else "valid")
                array = np.array(array[row])
                if valid is not None:
                    array = array[:, np.array(valid[row])]
                out[f"{i}.{name}"] = array
            elif not name.endswith("valid"):
                out[f"{i}.{name}"] = np.array(array[row])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_rewind_equals_never_seeing_the_rejected_tokens(family, family_model):
    """Two rows see a prompt and a 6-token window through a marked cache, then go back 4 and 1
    tokens: each row's state (SSM state, conv window, Mamba-3's angles and previous k, v; KV keys
    and positions) and the logits of what follows equal those of a cache that saw only the kept
    tokens. Also an int count, the same for every row."""
    model = family_model(family)
    rng = np.random.default_rng(1)
    prompt = mx.array(rng.integers(0, 100, (2, 7)))
    window = mx.array(rng.integers(0, 100, (2, 6)))
    after = mx.array(rng.integers(0, 100, (2, 3)))
    for counts in ([4, 1], 2):
        cache = model.make_cache(2)
        model(prompt, cache)
        mark(cache)
        model(window[:, :2], cache)  # the window in two calls and a step: one trail
        model(window[:, 2:5], cache)
        model.step(window[:, 5], cache)
        rewind(cache, counts)
        per_row = [counts] * 2 if isinstance(counts, int) else counts
        logits = model(after, cache)
        for row, back in enumerate(per_row):
            alone = model.make_cache(1)
            model(prompt[row:row + 1], alone)
            if 6 - back:
                model(window[row:row + 1, :6 - back], alone)
            expected_state = layer_arrays(alone, 0)
            expected = model(after[row:row + 1], alone)
            assert relative_error(logits[row], expected[0]) < 1e-4, (row, back)
            # The state before `after` went in: compare with a second rewound copy.
            again = model.make_cache(2)
            model(prompt, again)
            mark(again)
            model(window, again)
            rewind(again, counts)
            got = layer_arrays(again, row)
            assert got.keys() == expected_state.keys()
            for name, value in expected_state.items():
                assert got[name].shape == value.shape, name
                if value.size:
                    assert relative_error(got[name], value) < 1e-4, (name, row, back)


def test_rewind_refuses_what_it_cannot_do(family_model):
    model = family_model("jamba")
    cache = model.make_cache(2)
    model(mx.zeros((2, 3), mx.int32), cache)
    with pytest.raises(ValueError, match="mark"):
        rewind(cache, 1)
    mark(cache)
    model(mx.zeros((2, 2), mx.int32), cache)
    with pytest.raises(ValueError, match="0 to 2"):
        rewind(cache, 3)
    with pytest.raises(ValueError, match="one per row"):
        rewind(cache, [1])
