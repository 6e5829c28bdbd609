"""Continuous batching: caches of sequences of different lengths merged row-wise decode exactly
like each sequence alone, for every cache kind (Mamba, KV, a layer of several parts), and rows
that join a running Decoder, or leave it, get the tokens they get alone."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from comparing import IdTokenizer, relative_error
from mlx_mamba.cache import KVCache, cache_rows, merge_caches
from mlx_mamba.config import ModelConfig
from mlx_mamba.decoder import Decoder, Row
from mlx_mamba.generate import stream_generate
from mlx_mamba.prompt_cache import prefill
from mlx_mamba.sample import greedy, make_logits_processors, make_sampler

# Mamba caches only; KV caches with Mamba and MoE layers; Falcon-H1's and Zamba2's layers of two
# parts (LayerCaches), Zamba2's attention with RoPE; Mamba-3 (MIMO) caches.
FLAVOURS = ["mamba1_untied", "mamba2", "nemotron_h", "falcon_h1", "zamba2", "mamba3"]
MAMBA3 = {"d_model": 32, "n_layer": 2, "vocab_size": 100, "rms_norm": True,
          "ssm_cfg": dict(layer="Mamba3", d_state=16, expand=2, headdim=16, ngroups=1,
                          chunk_size=8, is_mimo=True, mimo_rank=2)}
PROMPTS = [np.random.RandomState(r).randint(0, 100, n).tolist()
           for r, n in ((0, 3), (1, 17), (2, 9))]


@pytest.fixture(scope="module", params=FLAVOURS)
def model(request, checkpoint):
    if request.param == "mamba3":
        mx.random.seed(0)
        model = mlx_mamba.Model(ModelConfig.from_dict(MAMBA3))
        mx.eval(model.parameters())
        return model
    return mlx_mamba.load(checkpoint(request.param)[0])[0]


def prompt_cache(model, tokens):
    """The cache after `tokens` (alone, batch 1)."""
    cache = model.make_cache(1)
    prefill(model, [tokens], cache, step_size=4)
    return cache


def test_merged_rows_decode_like_rows_alone(model):
    alone = [prompt_cache(model, p) for p in PROMPTS]
    merged = merge_caches([prompt_cache(model, p) for p in PROMPTS])
    assert all(layer is None or layer.batch_size == 3 for layer in merged)
    tokens = mx.array([p[-1] for p in PROMPTS])
    for _ in range(4):
        together = model.step(tokens, merged)
        for r, cache in enumerate(alone):
            expected = model.step(tokens[r:r + 1], cache)
            assert relative_error(together[r:r + 1], expected) < 1e-5
        tokens = mx.argmax(together, axis=-1)


def test_rows_taken_out_of_a_merged_cache_decode_alone(model):
    merged = merge_caches([prompt_cache(model, p) for p in PROMPTS])
    token = mx.array([PROMPTS[1][-1]])
    taken = cache_rows(merged, mx.array([1]))
    expected = model.step(token, prompt_cache(model, PROMPTS[1]))
    assert relative_error(model.step(token, taken), expected) < 1e-5
    assert all(layer is None or layer.batch_size == 3 for layer in merged)  # left unchanged


def test_kv_rows_that_stay_drop_the_padding_of_rows_that_left():
    short, long = KVCache(1, 2, 4), KVCache(1, 2, 4)
    short.update(mx.ones((1, 2, 3, 4)), mx.ones((1, 2, 3, 4)))
    long.update(mx.ones((1, 2, 10, 4)), mx.ones((1, 2, 10, 4)))
    merged = KVCache.merge([short, long])
    assert merged.length == 10 and merged.valid[0].tolist() == [False] * 7 + [True] * 3
    merged.keep(mx.array([0]))
    assert merged.length == 3 and merged.arrays()["keys"].shape == (1, 2, 3, 4)
    assert merged.positions.tolist() == [3]


def alone_tokens(model, prompt, max_tokens, **settings):
    return [r.token for r in stream_generate(model, IdTokenizer(), prompt, max_tokens=max_tokens,
                                             **settings)]


def test_rows_joining_and_leaving_a_running_batch_get_their_own_tokens(model):
    # Row 0 starts alone; row 1 joins after 2 steps, row 2 after 4; row 1 samples with a seed and
    # a repetition penalty; row 0 is dropped midway; every row's cache comes back on leaving.
    settings = [dict(), dict(temp=0.8, top_k=30, seed=5, repetition_penalty=1.3), dict()]
    lengths = [12, 5, 6]
    left = {}
    decoder = Decoder(model, on_leave=lambda row, cache: left.update({row.key: (row, cache)}))
    got = {r: [] for r in range(3)}
    joins = {0: 0, 2: 1, 4: 2}
    for step in range(30):
        if step in joins:
            r = joins[step]
            s = settings[r]
            row = Row(r, list(PROMPTS[r]),
                      make_sampler(s.get("temp", 0.0), top_k=s.get("top_k", 0),
                                   seed=s.get("seed")),
                      make_logits_processors(s.get("repetition_penalty")), lengths[r], set())
            decoder.join(prompt_cache(model, PROMPTS[r][:-1]), [row])
        if step == 7:
            decoder.drop(0)
        for key, token, _, finish, _ in decoder.step():
            got[key].append(token)
        if not decoder and step > 4:
            break
    assert not decoder
    for r in (1, 2):
        assert got[r] == alone_tokens(model, PROMPTS[r], lengths[r], **settings[r])
    assert 0 < len(got[0]) < lengths[0]
    assert got[0] == alone_tokens(model, PROMPTS[0], lengths[0])[:len(got[0])]
    # A leaving row's cache holds its tokens[:fed]: it continues exactly like a fresh run.
    for r, (row, cache) in left.items():
        expected = prompt_cache(model, row.tokens[:row.fed])
        token = mx.array([row.tokens[row.fed]])
        assert relative_error(model.step(token, cache), model.step(token, expected)) < 1e-4


def test_rows_sharing_a_sampler_are_sampled_together(model):
    # A seeded sampler shared by rows draws one noise vector per step for all of them, as
    # batch_generate does; the decoder calls it once per step, not once per row.
    calls = []
    sampler = make_sampler(0.9, seed=3)

    def counted(logprobs):
        calls.append(logprobs.shape[0])
        return sampler(logprobs)

    decoder = Decoder(model)
    decoder.join(merge_caches([prompt_cache(model, p[:-1]) for p in PROMPTS]),
                 [Row(r, list(p), counted, [], 3, set()) for r, p in enumerate(PROMPTS)])
    decoder.join(prompt_cache(model, PROMPTS[0][:-1]), [Row(3, list(PROMPTS[0]), greedy, [], 3,
                                                            set())])
    while decoder:
        decoder.step()
    assert calls == [3, 3, 3]
