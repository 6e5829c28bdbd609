"""The server's PrefixCache: the longest kept prefix of a prompt, exactly; states that resume
exactly; an LRU bounded in bytes; a directory that survives a restart and refuses another
model's states."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from comparing import relative_error
from mlx_mamba.cache import cache_state
from mlx_mamba.prompt_cache import PrefixCache, PromptCacheError, load_prompt_cache, prefill

TOKENS = np.random.RandomState(0).randint(0, 100, 40).tolist()


@pytest.fixture(scope="module", params=["mamba2", "nemotron_h"])
def model(request, checkpoint):
    return mlx_mamba.load(checkpoint(request.param)[0])[0]


def state(model, tokens, cache=None):
    cache = cache or model.make_cache(1)
    prefill(model, [tokens], cache, step_size=8)
    return cache


def nbytes(layers):
    return sum(a.nbytes for a in cache_state(layers))


def test_longest_kept_prefix_exactly(model):
    cache = PrefixCache(model, 2 ** 30)
    for n in (3, 5):
        cache.add(TOKENS[:n], state(model, TOKENS[:n]))
    cache.add(TOKENS[:2] + [7], state(model, TOKENS[:2] + [7]))
    assert cache.longest(TOKENS)[0] == 5
    assert cache.longest(TOKENS[:4] + [-1])[0] == 3
    assert cache.longest(TOKENS[:2] + [7, 7])[0] == 3
    assert cache.longest(TOKENS[:2]) == (0, None)
    assert cache.longest(TOKENS, limit=4)[0] == 3
    assert cache.longest([TOKENS[0] + 1] + TOKENS[1:]) == (0, None)


def test_a_resumed_state_continues_exactly(model):
    cache = PrefixCache(model, 2 ** 30)
    cache.add(TOKENS[:13], state(model, TOKENS[:13]))
    done, layers = cache.longest(TOKENS[:-1])
    resumed = state(model, TOKENS[done:-1], layers)
    token = mx.array(TOKENS[-1:])
    expected = model.step(token, state(model, TOKENS[:-1]))
    assert relative_error(model.step(token, resumed), expected) < 1e-5
    # Updating what longest() gave leaves the kept state as it was.
    again = state(model, TOKENS[13:-1], cache.longest(TOKENS)[1])
    assert relative_error(model.step(token, again), expected) < 1e-5


def test_least_recently_used_states_go_first_within_the_byte_bound(model):
    size = nbytes(state(model, TOKENS[:30]))  # the largest of the states below
    cache = PrefixCache(model, int(2.5 * size))
    for n in (10, 20):
        cache.add(TOKENS[:n], state(model, TOKENS[:n]))
    assert cache.longest(TOKENS[:15])[0] == 10  # 10 is now the most recent
    cache.add(TOKENS[:30], state(model, TOKENS[:30]))
    assert len(cache) == 2 and cache.nbytes <= 2.5 * size
    assert cache.longest(TOKENS[:25])[0] == 10  # 20 was evicted
    assert cache.longest(TOKENS)[0] == 30
    PrefixCache(model, 0).add(TOKENS[:5], state(model, TOKENS[:5]))  # too large: not kept


def test_a_directory_survives_a_restart(model, tmp_path):
    cache = PrefixCache(model, 2 ** 30, tmp_path, "tiny")
    cache.add(TOKENS[:9], state(model, TOKENS[:9]))
    cache.add(TOKENS[:17], state(model, TOKENS[:17]))
    (tmp_path / (".tmp-123-" + "0" * 32 + ".safetensors")).write_bytes(b"interrupted")
    damaged = tmp_path / ("f" * 32 + ".safetensors")
    damaged.write_bytes(b"not safetensors")
    (tmp_path / "notes.txt").write_text("not ours")
    again = PrefixCache(model, 2 ** 30, tmp_path)
    assert len(again) == 2 and again.longest(TOKENS)[0] == 17
    assert sorted(f.name for f in tmp_path.iterdir()
                  if not f.name.endswith("safetensors") or f.name.startswith(".")) \
        == ["notes.txt"]
    assert not damaged.exists() and len(list(tmp_path.glob("*.safetensors"))) == 2
    done, layers = again.longest(TOKENS[:-1])
    token = mx.array(TOKENS[-1:])
    assert relative_error(model.step(token, state(model, TOKENS[done:-1], layers)),
                          model.step(token, state(model, TOKENS[:-1]))) < 1e-5
    # A state is not a prompt cache to resume from the command line.
    with pytest.raises(PromptCacheError, match="server's prefix cache"):
        load_prompt_cache(next(tmp_path.glob("*.safetensors")), model)
    # A smaller budget keeps the newest that fit, and removes the other files.
    small = PrefixCache(model, nbytes(layers), tmp_path)
    assert len(small) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_a_directory_of_another_model_is_refused(checkpoint, tmp_path):
    mamba = mlx_mamba.load(checkpoint("mamba2")[0])[0]
    PrefixCache(mamba, 2 ** 30, tmp_path).add(TOKENS[:5], state(mamba, TOKENS[:5]))
    other = mlx_mamba.load(checkpoint("mamba2_groups_untied")[0])[0]
    with pytest.raises(PromptCacheError, match="holds the prompt cache of another model"):
        PrefixCache(other, 2 ** 30, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
