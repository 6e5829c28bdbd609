"""Speculative decoding: rewindable caches of every kind, greedy text equal to plain greedy for
every family, the sampled distribution equal to the target's, and the errors of bad settings."""

import contextlib

import mlx.core as mx
import numpy as np
import pytest

import mlx_mamba
from comparing import relative_error
from mlx_mamba.cache import KVCache, mark, rewind
from mlx_mamba.config import ModelConfig
from mlx_mamba.generate import batch_generate, stream_generate

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


def mamba3_model(flavour, seed=0, vocab=100):
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": vocab,
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
    they are real tokens (a rewound row may be padded)."""
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
            for layer in again:  # KV rows packed again: as long as the longest kept row
                for part in getattr(layer, "parts", {"": layer}).values():
                    if isinstance(part, KVCache):
                        assert part.length == 7 + 6 - min(per_row)
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
    with pytest.raises(ValueError, match="takes no mask"):
        model(mx.zeros((2, 2), mx.int32), cache, mx.ones((2, 2)))


def quantized_copy(family, checkpoint):
    from mlx_mamba.quantize import quantize_model

    model = mamba3_model(family) if family in MAMBA3 else \
        mlx_mamba.load(str(checkpoint(family)[0]))[0]
    quantize_model(model, {"group_size": 32, "bits": 8, "mode": "affine"})
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_text_equals_plain_greedy(family, family_model, checkpoint):
    """For K = 1..8 with a draft that agrees (the model itself, its 8-bit copy) and for K = 1, 2,
    5, 8 with one that never does (a random Mamba-3 of a padded vocabulary, 104 ids), the greedy
    tokens are those of plain greedy decoding; prefill chunks of 3 tokens put chunk boundaries in
    the prompt. Two prompts of different lengths decoded together (rows accepting different
    counts) equal their plain batch."""
    model = family_model(family)
    stranger = mamba3_model("mamba3", seed=7)
    prompt = [5, 17, 3, 99, 42, 8, 8, 61, 20, 33]
    plain = [r.token for r in stream_generate(model, None, prompt, max_tokens=12)]
    agreeing = quantized_copy(family, checkpoint)
    accepted = 0
    runs = [(k, model if k % 2 else agreeing) for k in range(1, 9)]
    for k, draft in runs + [(k, stranger) for k in (1, 2, 5, 8)]:
        responses = list(stream_generate(model, None, prompt, max_tokens=12, prefill_step_size=3,
                                         draft_model=draft, num_draft_tokens=k))
        assert [r.token for r in responses] == plain, (k, draft is stranger)
        if draft is not stranger:
            accepted += sum(r.from_draft for r in responses)
    assert accepted > 8 * 12 // 2  # the agreeing drafts were mostly accepted
    prompts = [prompt, [7, 1, 2]]
    expected = [r.tokens for r in batch_generate(model, None, prompts, max_tokens=10)]
    for draft in (stranger, agreeing):
        got = batch_generate(model, None, prompts, max_tokens=10, draft_model=draft,
                             num_draft_tokens=3, prefill_step_size=2)
        assert [r.tokens for r in got] == expected


def chi_square_p_value(counts, probabilities):
    """The chi-square test's p-value of `counts` against `probabilities`, cells expecting fewer
    than 5 pooled into one."""
    from scipy.stats import chi2

    expected = probabilities * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token the model gives no probability was drawn"
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return chi2.sf(statistic, keep.sum() - 1)


SAMPLING = dict(temp=0.9, top_k=6, top_p=0.97, min_p=0.01, repetition_penalty=1.5)


def pair_probabilities(model, prompt):
    """P(first two tokens) under the model, with SAMPLING's processors and filters, computed
    by plain forwards of the model (no cache, no drafting)."""
    from mlx_mamba.sample import make_logits_processors, make_sampler

    sampler = make_sampler(SAMPLING["temp"], SAMPLING["top_p"], SAMPLING["top_k"],
                           SAMPLING["min_p"])
    penalty = make_logits_processors(SAMPLING["repetition_penalty"])[0]

    def next_probabilities(ids):
        logits = model(mx.array([ids]))[:, -1].astype(mx.float32)
        return np.array(mx.exp(sampler.distribution(penalty(mx.array(ids), logits)))[0])

    first = next_probabilities(prompt)
    return np.concatenate([first[a] * next_probabilities(prompt + [a])
                           for a in range(len(first))])


def sampled_pairs(model, draft, prompt, rows, **kwargs):
    mx.random.seed(0)
    results = batch_generate(model, None, [prompt] * rows, max_tokens=3, draft_model=draft,
                             num_draft_tokens=2, **SAMPLING, **kwargs)
    vocab = model.config.vocab_size
    pairs = np.array([r.tokens[0] * vocab + r.tokens[1] for r in results])
    return np.bincount(pairs, minlength=vocab * vocab)


def test_sampled_tokens_follow_the_model_distribution(monkeypatch):
    """1000 rows sample their first two tokens speculatively (a disagreeing draft proposes two
    per round, top-k, top-p, min-p and a repetition penalty on both): the pairs' counts pass a
    chi-square test against the model's own probabilities, and fail it when a wrong rule is
    planted: after a rejection, drawing from p instead of max(p - q, 0); keeping a draft with
    probability p(d) instead of p(d) / q(d)."""
    from mlx_mamba import speculative

    model, draft = mamba3_model("mamba3", seed=1, vocab=8), mamba3_model("mamba3", seed=2, vocab=8)
    prompt = [1, 2, 3]
    probabilities = pair_probabilities(model, prompt)
    counts = sampled_pairs(model, draft, prompt, 1000)
    assert chi_square_p_value(counts, probabilities) > 1e-3
    for name, planted in (("residual", lambda p, q: p),
                          ("accepts", lambda u, log_p, log_q: mx.log(u) < log_p)):
        with monkeypatch.context() as patch:
            patch.setattr(speculative, name, planted)
            wrong = sampled_pairs(model, draft, prompt, 1000)
        assert chi_square_p_value(wrong, probabilities) < 1e-6, name


def test_a_seed_reproduces_the_text(family_model):
    model, draft = family_model("mamba2"), mamba3_model("mamba3", seed=3)

    def run(seed):
        return [r.token for r in stream_generate(model, None, [4, 5, 6], max_tokens=16, temp=1.0,
                                                 seed=seed, draft_model=draft,
                                                 num_draft_tokens=3)]

    assert run(11) == run(11)
    assert run(11) != run(12)


# ---- command line and bad input --------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_models(tmp_path_factory, tokenizer_file):
    """(model, draft, draft with other token ids): tiny transformers directories over GPT-NeoX's
    ids with a byte-level tokenizer; the draft is a Mamba1, the stranger's tokenizer swaps two
    ids."""
    import json

    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file),
                                        eos_token="<|endoftext|>")
    made = []
    for name, config in (
            ("model", transformers.Mamba2Config(hidden_size=16, num_hidden_layers=1, state_size=8,
                                                num_heads=4, head_dim=8, n_groups=1,
                                                vocab_size=50280, tie_word_embeddings=True)),
            ("draft", transformers.MambaConfig(hidden_size=16, num_hidden_layers=1, state_size=4,
                                               vocab_size=50277)),
            ("stranger", transformers.MambaConfig(hidden_size=16, num_hidden_layers=1,
                                                  state_size=4, vocab_size=50277))):
        directory = tmp_path_factory.mktemp(name)
        torch.manual_seed(len(made))
        cls = transformers.Mamba2ForCausalLM if name == "model" else \
            transformers.MambaForCausalLM
        cls(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        made.append(directory)
    spec = json.loads((made[2] / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (made[2] / "tokenizer.json").write_text(json.dumps(spec))
    return made


def test_cli_decodes_speculatively_and_reports(cli_models, capsys):
    from mlx_mamba.generate import main

    model_dir, draft_dir, _ = cli_models
    model, tokenizer = mlx_mamba.load(str(model_dir))
    prompt = "the cat sat on the mat and the cat sat on the"
    expected = mlx_mamba.generate(model, tokenizer, prompt, max_tokens=12)
    for flags in (["--draft-model", draft_dir, "--num-draft-tokens", "4"],
                  ["--prompt-lookup", "3"]):
        argv = ["--model", model_dir, "--prompt", prompt, "-m", "12", "--verbose",
                "--ignore-chat-template", *flags]
        assert main(list(map(str, argv))) == 0
        out, err = capsys.readouterr()
        assert out == expected + "\n"
        assert "draft tokens accepted" in err and "per generated token" in err


@pytest.mark.parametrize("flags, message", [
    (["--num-draft-tokens", "0"], "--num-draft-tokens"),
    (["--num-draft-tokens", "65"], "--num-draft-tokens"),
    (["--prompt-lookup", "2", "--draft-model", "DRAFT"], "exclude each other"),
    (["--draft-model", "STRANGER"], "tokenizer differs"),
])
def test_cli_bad_drafting_is_one_error_line(cli_models, capsys, flags, message):
    from mlx_mamba.generate import main

    model_dir, draft_dir, stranger_dir = cli_models
    flags = [{"DRAFT": str(draft_dir), "STRANGER": str(stranger_dir)}.get(f, f) for f in flags]
    with pytest.raises(SystemExit) if "num-draft" in message else contextlib.nullcontext():
        status = main(["--model", str(model_dir), "--prompt", "hi", "-m", "2", *flags])
        assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and message in err, err


def test_api_bad_drafting_is_refused(family_model):
    from mlx_mamba.speculative import DraftError

    model = family_model("mamba1")
    for kwargs, message in ((dict(draft_model=model, num_draft_tokens=0), "1 to 64"),
                            (dict(draft_model=model, num_draft_tokens=65), "1 to 64"),
                            (dict(prompt_lookup=2, num_draft_tokens=True), "1 to 64"),
                            (dict(prompt_lookup=0), "prompt_lookup"),
                            (dict(prompt_lookup=2, draft_model=model), "exclude"),
                            (dict(prompt_lookup=2, response_format={"type": "json_object"}),
                             "response_format and speculative decoding exclude"),
                            (dict(draft_model="path"), "expected a model")):
        with pytest.raises(DraftError, match=message):
            mlx_mamba.generate(model, None, [1, 2], max_tokens=2, **kwargs)


@pytest.mark.parametrize("family", ["mamba2", "mamba3", "jamba", "zamba2"])
def test_prompt_lookup_gives_the_plain_text(family, family_model):
    """Prompt lookup over a repetitive prompt proposes (and gets accepted) continuations; the
    greedy tokens, alone and for rows of a batch, stay plain decoding's."""
    from mlx_mamba.speculative import PromptLookup

    model = family_model(family)
    prompt = [5, 6, 7, 8, 9] * 4
    plain = [r.token for r in stream_generate(model, None, prompt, max_tokens=20)]
    for ngram, k in ((1, 1), (3, 4), (5, 8)):
        responses = list(stream_generate(model, None, prompt, max_tokens=20, prompt_lookup=ngram,
                                         num_draft_tokens=k))
        assert [r.token for r in responses] == plain, (ngram, k)
        assert responses[-1].draft_stats.proposed > 0
    prompts = [prompt, [1, 2, 1, 2, 1]]
    expected = [r.tokens for r in batch_generate(model, None, prompts, max_tokens=12)]
    got = batch_generate(model, None, prompts, max_tokens=12, prompt_lookup=2, num_draft_tokens=3)
    assert [r.tokens for r in got] == expected
    assert PromptLookup(3).lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # the latest
    assert PromptLookup(3).lookup([4, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # a shorter match
    assert PromptLookup(3).lookup([1, 2, 3], 3) == []


# ---- server ----------------------------------------------------------------------------------

@pytest.mark.parametrize("drafting", ["draft", "lookup"])
def test_server_requests_get_their_solo_text(drafting, checkpoint, tmp_path):
    """A Nemotron-H server drafting with a Mamba2 model (or prompt lookup): concurrent requests,
    greedy and seeded, get the text each gets alone from `generate` with the same drafting; a
    conversation's next turn resumes from the prefix cache (which must hold only accepted
    states for the text to match) and gets the cold run's text. Bad flag pairs: one error line."""
    import shutil
    import subprocess
    import sys

    from server_fixtures import write_tokenizer
    from test_server import ROOT, Server, complete, complete_together

    directories = {}
    for flavour in ("nemotron_h", "mamba2"):
        directories[flavour] = tmp_path / flavour
        shutil.copytree(checkpoint(flavour)[0], directories[flavour])
        write_tokenizer(directories[flavour])
    model, tokenizer = mlx_mamba.load(str(directories["nemotron_h"]))
    if drafting == "draft":
        flags = ["--draft-model", str(directories["mamba2"]), "--num-draft-tokens", "3"]
        drafted = dict(draft_model=mlx_mamba.load(str(directories["mamba2"]))[0],
                       num_draft_tokens=3)
    else:
        flags, drafted = ["--prompt-lookup", "2", "--num-draft-tokens", "4"], \
            dict(prompt_lookup=2, num_draft_tokens=4)
    server = Server(directories["nemotron_h"], flags + ["--max-batch-size", "3",
                                                        "--prefill-step-size", "16"],
                    tmp_path / "log")
    try:
        client = server.client()
        requests = [("Hi hi hi hi", 20, dict(temperature=0)),
                    ("A much longer prompt, which takes more prefill than the others.", 14,
                     dict(temperature=0.8, seed=11)),
                    ("Middle-sized prompt here", 16, dict(temperature=0, repetition_penalty=1.4)),
                    ([7, 9, 11, 7, 9], 8, dict(temperature=0.7, top_p=0.9, seed=3))]
        texts, settings = complete_together(client, requests)
        for (prompt, max_tokens, _), text, settings in zip(requests, texts, settings):
            alone = mlx_mamba.generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                       **settings, **drafted)
            assert text == alone, (prompt, settings)
            if settings["temp"] == 0:
                assert text == mlx_mamba.generate(model, tokenizer, prompt,
                                                  max_tokens=max_tokens, **settings)
        first = complete(client, "Once upon a time", 12, temperature=0)
        follow = "Once upon a time" + first.choices[0].text + " and"
        second = complete(client, follow, 12, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens >= \
            first.usage.prompt_tokens + first.usage.completion_tokens - 1
        assert second.choices[0].text == mlx_mamba.generate(model, tokenizer, follow,
                                                            max_tokens=12)
    finally:
        assert server.stop() == 0
    if drafting == "lookup":
        result = subprocess.run(
            [sys.executable, "-m", "mlx_mamba.server", "--model", str(directories["nemotron_h"]),
             "--prompt-lookup", "2", "--draft-model", str(directories["mamba2"])],
            capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and \
            "exclude each other" in result.stderr and "Traceback" not in result.stderr
