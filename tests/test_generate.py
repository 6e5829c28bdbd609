"""Generation: samplers against their definitions, greedy decoding against transformers' generate,
batches against one-by-one runs, resumed prompt caches against uninterrupted runs, UTF-8
streaming with the GPT-NeoX tokenizer, and the command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_mamba
from comparing import IdTokenizer
from mlx_mamba.config import ModelConfig
from mlx_mamba.detokenizer import StreamingDetokenizer
from mlx_mamba.generate import GenerationError, batch_generate, main, stream_generate
from mlx_mamba.models import Model
from mlx_mamba.prompt_cache import (PromptCacheError, load_prompt_cache, make_prompt_cache,
                                    save_prompt_cache)
from mlx_mamba.sample import (SamplerError, apply_min_p, apply_top_k, apply_top_p,
                              make_repetition_penalty, make_sampler)

# The tied tiny Mamba1 only repeats its last token, which would hide mistakes; the untied one talks.
ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["mamba1_untied", "mamba2"]


def tokens_of(model, tokenizer, prompt, **kwargs):
    """Generated ids, with the EOS that ended them (as transformers returns them)."""
    return [r.token for r in stream_generate(model, tokenizer, prompt, **kwargs)]


@pytest.fixture(scope="module")
def models(checkpoint):
    """arch -> (our model, transformers model)."""
    loaded = {}
    for arch in ARCHS:
        directory, reference = checkpoint(arch)
        loaded[arch] = (mlx_mamba.load(directory)[0], reference)
    return loaded


# ---- samplers on hand-made logits ------------------------------------------------------------

def kept(logits):
    return set(np.flatnonzero(np.isfinite(np.array(logits[0]))).tolist())


def test_top_k_keeps_exactly_k_largest():
    values = np.array([0.3, 2.0, -1.0, 2.0, 0.9, 5.0, -3.0], dtype=np.float32)  # a tie at 2.0
    for k in range(1, 8):
        result = kept(apply_top_k(mx.array(values[None]), k))
        dropped = set(range(7)) - result
        assert len(result) == k
        assert all(values[i] >= values[j] for i in result for j in dropped)


def smallest_set_reaching(probs, p):
    """Brute force: the smallest set of tokens with mass >= p (the most likely of each size)."""
    order = np.argsort(-probs)
    for size in range(1, len(probs) + 1):
        if probs[order[:size]].sum() >= p:
            return set(order[:size].tolist())


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = mx.array(np.log(probs)[None])
    assert kept(apply_top_p(logits, 0.4)) == {1}
    assert kept(apply_top_p(logits, 0.75)) == {1, 3}
    assert kept(apply_top_p(logits, 0.85)) == {1, 3, 2}
    assert kept(apply_top_p(logits, 0.99)) == {0, 1, 2, 3}
    rng = np.random.default_rng(0)
    for p in rng.uniform(0.05, 0.98, 20):
        row = rng.normal(size=12) * 2
        probs = np.exp(row) / np.exp(row).sum()
        assert kept(apply_top_p(mx.array(row[None]), float(p))) == smallest_set_reaching(probs, p)


def test_min_p_keeps_tokens_near_the_top():
    probs = np.array([0.4, 0.1, 0.3, 0.02, 0.18])
    logits = mx.array(np.log(probs)[None])
    assert kept(apply_min_p(logits, 0.5)) == {0, 2}  # p >= 0.2
    assert kept(apply_min_p(logits, 0.25)) == {0, 1, 2, 4}  # p >= 0.1
    assert kept(apply_min_p(logits, 1.0)) == {0}


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 30)).astype(np.float32)
    seen = rng.integers(0, 30, size=12)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(seen[None]),
                                                     torch.tensor(logits)).numpy()
    ours = make_repetition_penalty(1.7)(mx.array(seen), mx.array(logits))
    np.testing.assert_allclose(np.array(ours), expected, rtol=1e-6)
    assert (np.array(ours) != logits).sum() == len(set(seen.tolist()))
    recent = make_repetition_penalty(1.7, context_size=3)(mx.array(seen), mx.array(logits))
    changed = set(np.flatnonzero(np.array(recent) != logits).tolist())
    assert changed == set(seen[-3:].tolist())


def test_sampling_follows_softmax_of_scaled_and_filtered_logits():
    logits = np.array([1.0, 0.5, 0.0, -1.0, 2.0], dtype=np.float32)
    draws = 40000
    batch = mx.array(np.tile(logits, (draws, 1)))  # unseeded: independent draws per row
    for temp, top_k, top_p in [(0.7, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.8)]:
        tokens = np.array(make_sampler(temp, top_p=top_p, top_k=top_k)(batch))
        scaled = logits / temp
        allowed = np.ones(5, bool)
        if top_k:
            allowed[np.argsort(-scaled)[top_k:]] = False
        probs = np.where(allowed, np.exp(scaled), 0.0)
        probs /= probs.sum()
        if top_p < 1:
            allowed = np.isin(np.arange(5), list(smallest_set_reaching(probs, top_p)))
            probs = np.where(allowed, probs, 0.0) / probs[allowed].sum()
        frequencies = np.bincount(tokens, minlength=5) / draws
        assert np.all(frequencies[~allowed] == 0)
        assert np.abs(frequencies - probs).max() < 0.015, (temp, top_k, top_p, frequencies, probs)


def test_seeded_sampler_is_reproducible_and_greedy_is_argmax():
    logits = mx.array(np.random.default_rng(2).normal(size=(1, 50)).astype(np.float32))

    def draws(sampler):
        return [sampler(logits).item() for _ in range(30)]

    assert draws(make_sampler(1.0, seed=7)) == draws(make_sampler(1.0, seed=7))
    assert draws(make_sampler(1.0, seed=7)) != draws(make_sampler(1.0, seed=8))
    assert make_sampler(0.0)(logits).item() == int(np.argmax(np.array(logits)))


def test_empty_prompt_and_foreign_token_ids_are_refused(models):
    model, _ = models["mamba2"]
    with pytest.raises(GenerationError, match="prompt is empty"):
        next(stream_generate(model, IdTokenizer(), ""))
    with pytest.raises(GenerationError, match="token id 100 is outside the model's vocabulary"):
        batch_generate(model, IdTokenizer(), [[1], [2, 100]])


@pytest.mark.parametrize("settings", [dict(temp=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                      dict(top_k=-1), dict(min_p=1.5), dict(temp=math.nan),
                                      dict(repetition_penalty=0.0)])
def test_invalid_sampler_settings_are_refused(models, settings):
    model, _ = models["mamba1_untied"]
    with pytest.raises(SamplerError, match=next(iter(settings))):
        stream_generate(model, IdTokenizer(), [1, 2], **settings).__next__()


# ---- generation against transformers ---------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("penalty", [None, 1.4])
def test_greedy_matches_transformers_generate(models, arch, penalty):
    model, reference = models[arch]
    prompt = [5, 17, 42, 8, 99, 3, 61, 23, 70]
    eos = reference.generation_config.eos_token_id
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                      repetition_penalty=penalty)[0, len(prompt):].tolist()
    ours = tokens_of(model, IdTokenizer(eos), prompt, max_tokens=16, repetition_penalty=penalty)
    print(arch, penalty, ours)
    assert ours == expected
    assert len(set(ours)) > 3 or penalty is None  # the penalty really steers


# ---- batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_one_by_one(models, arch):
    model, _ = models[arch]
    prompts = [[7], [5, 17, 42, 8, 99], [3, 9, 27, 81, 43, 29, 87, 61, 83, 49, 47, 41, 23]]
    settings = [dict(), dict(temp=0.9, top_k=20, seed=11)]
    # An EOS that ends one prompt early while the others go on.
    free = [tokens_of(model, IdTokenizer(), p, max_tokens=12) for p in prompts]
    eos = next(t for t in free[1][1:] if t not in free[0] + free[2])
    tokenizer = IdTokenizer(eos)
    for kwargs in settings:
        # prefill_step_size 4: the padded prompts also cross chunk boundaries.
        batch = batch_generate(model, tokenizer, prompts, max_tokens=12, prefill_step_size=4,
                               **kwargs)
        for prompt, result in zip(prompts, batch):
            alone = tokens_of(model, tokenizer, prompt, max_tokens=12, **kwargs)
            assert result.tokens + ([eos] if result.finish_reason == "stop" else []) == alone
            assert result.text == tokenizer.decode(result.tokens)
        if not kwargs:
            assert [r.finish_reason for r in batch] == ["length", "stop", "length"]


# ---- prompt caches ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_resumed_equals_uninterrupted(models, arch, tmp_path):
    model, _ = models[arch]
    first, second = [5, 17, 42, 8, 99, 3, 61, 23, 70, 11, 12], [4, 40, 44]
    tokenizer = IdTokenizer()
    settings = dict(max_tokens=10, repetition_penalty=1.3)
    file = tmp_path / "prompt.safetensors"
    save_prompt_cache(file, make_prompt_cache(model, first, step_size=4), model, "tiny")
    resumed = load_prompt_cache(file, model)
    assert resumed.tokens == first
    assert tokens_of(model, tokenizer, [], prompt_cache=resumed, **settings) == \
        tokens_of(model, tokenizer, first, **settings)
    assert tokens_of(model, tokenizer, second, prompt_cache=resumed, **settings) == \
        tokens_of(model, tokenizer, first + second, **settings)
    _, metadata = mx.load(str(file), return_metadata=True)
    assert metadata["token_count"] == str(len(first)) and metadata["model"] == "tiny"


def test_prompt_cache_of_another_model_or_damaged_is_refused(models, tmp_path):
    mamba1, mamba2 = models["mamba1_untied"][0], models["mamba2"][0]
    file = tmp_path / "cache.safetensors"
    save_prompt_cache(file, make_prompt_cache(mamba1, [1, 2, 3]), mamba1)
    with pytest.raises(PromptCacheError, match="another configuration.*tie_embeddings False there"):
        load_prompt_cache(file, mamba2)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(file.read_bytes()[:200])
    with pytest.raises(PromptCacheError, match="damaged.safetensors: not a readable"):
        load_prompt_cache(damaged, mamba1)
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"x": mx.zeros(2)})
    with pytest.raises(PromptCacheError, match="not an mlx-mamba prompt cache"):
        load_prompt_cache(plain, mamba1)


def test_long_prompt_prefills_in_bounded_memory(models):
    model, _ = models["mamba1_untied"]
    rng = np.random.default_rng(3)
    peaks = {}
    for length in (2048, 16384):
        prompt = rng.integers(0, 100, length).tolist()
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        response = list(stream_generate(model, IdTokenizer(), prompt, max_tokens=2,
                                        prefill_step_size=1024))[-1]
        peaks[length] = response.peak_memory
    print(peaks)
    assert peaks[16384] < 1.25 * peaks[2048]  # 8x the prompt, nearly the same memory


# ---- text: UTF-8 streaming with a byte-level BPE like GPT-NeoX's ----------------------------

@pytest.fixture(scope="module")
def neox_tokenizer(tokenizer_file):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file),
                                   eos_token="<|endoftext|>")


def force(script, prompt_length):
    """A logits processor that makes the model say `script`, one token per step (and its last
    token after that: decoding computes a step ahead of the tokens it hands out)."""
    def process(tokens, logits):
        wanted = script[min(tokens.shape[0] - prompt_length, len(script) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == wanted, 0.0, -mx.inf)[None]
    return process


def test_streaming_never_splits_multibyte_characters(neox_tokenizer):
    text = " naïve café: 日本語 🙂 → ok"
    script = neox_tokenizer.encode(text) + [neox_tokenizer.eos_token_id]
    held_back = [i for i, t in enumerate(script[:-1]) if "\ufffd" in neox_tokenizer.decode([t])]
    assert held_back, "the text must have characters spread over several tokens"
    model = Model(ModelConfig(arch="mamba2", d_model=16, n_layer=1, vocab_size=50280,
                              d_state=8, head_dim=8))
    prompt = neox_tokenizer.encode("Say:")
    responses = list(stream_generate(model, neox_tokenizer, prompt, max_tokens=100,
                                     logits_processors=[force(script, len(prompt))]))
    segments = [r.text for r in responses]
    assert "".join(segments) == text
    assert not any("\ufffd" in s for s in segments)
    assert any(s == "" for s in segments[:-1])  # something was held back
    assert responses[-1].finish_reason == "stop" and len(responses) == len(script)
    assert mlx_mamba.generate(model, neox_tokenizer, prompt, max_tokens=100,
                              logits_processors=[force(script, len(prompt))]) == text


def test_detokenizer_flushes_an_unfinished_character(neox_tokenizer):
    ids = neox_tokenizer.encode("語")
    assert len(ids) > 1  # one character, several byte tokens
    detokenizer = StreamingDetokenizer(neox_tokenizer)
    assert detokenizer.add_token(ids[0]) == ""
    assert detokenizer.finalize() == neox_tokenizer.decode(ids[:1]) == "\ufffd"


# ---- command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, neox_tokenizer):
    """A tiny transformers Mamba2 directory whose vocabulary covers GPT-NeoX, with its tokenizer."""
    import transformers

    directory = tmp_path_factory.mktemp("cli_model")
    torch.manual_seed(0)
    config = transformers.Mamba2Config(hidden_size=16, num_hidden_layers=1, state_size=8,
                                       num_heads=4, head_dim=8, n_groups=1, vocab_size=50280,
                                       tie_word_embeddings=True, eos_token_id=0)
    transformers.Mamba2ForCausalLM(config).save_pretrained(directory)
    neox_tokenizer.save_pretrained(directory)
    return directory


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mlx_mamba.generate", *map(str, args)],
                          input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_streams_saves_and_resumes(cli_model, tmp_path):
    cache_file = tmp_path / "hello.safetensors"
    result = run_cli("--model", cli_model, "--prompt", "-", "--max-tokens", 12,
                     "--save-prompt-cache", cache_file, stdin="Hello, world")
    assert result.returncode == 0, result.stderr
    model, tokenizer = mlx_mamba.load(cli_model)
    expected = mlx_mamba.generate(model, tokenizer, "Hello, world", max_tokens=12)
    assert result.stdout == expected + "\n"
    prompt_line = f"Prompt: {len(tokenizer.encode('Hello, world'))} tokens,"
    for line in (prompt_line, "tokens-per-sec", "Generation: 12 tokens,", "Peak memory:"):
        assert line in result.stderr
    assert load_prompt_cache(cache_file, model).tokens == tokenizer.encode("Hello, world")


def test_cli_resumes_in_process(cli_model, tmp_path, capsys):
    model, tokenizer = mlx_mamba.load(cli_model)
    cache_file = tmp_path / "c.safetensors"
    assert main(["--model", str(cli_model), "--prompt", "Once upon", "-m", "6",
                 "--save-prompt-cache", str(cache_file)]) == 0
    assert main(["--model", str(cli_model), "--prompt", " a time", "-m", "6",
                 "--prompt-cache-file", str(cache_file)]) == 0
    first, resumed = capsys.readouterr().out.splitlines()
    assert first == mlx_mamba.generate(model, tokenizer, "Once upon", max_tokens=6)
    assert resumed == mlx_mamba.generate(model, tokenizer, "Once upon a time", max_tokens=6)


def test_cli_applies_the_chat_template(cli_model, neox_tokenizer, tmp_path, capsys):
    templated = tmp_path / "chat"
    templated.mkdir()
    for file in cli_model.iterdir():
        (templated / file.name).write_bytes(file.read_bytes())
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}{% endfor %}"
                               " <bot>")
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["--model", str(templated), "--prompt", "hi", "-m", "2", "--verbose"]) == 0
    assert "<user> hi <bot>" in capsys.readouterr().err
    assert main(["--model", str(templated), "--prompt", "hi", "-m", "2", "--verbose",
                 "--ignore-chat-template"]) == 0
    err = capsys.readouterr().err
    assert "<bot>" not in err and f"Prompt: {len(neox_tokenizer.encode('hi'))} tokens" in err


def bad_runs(cli_model, original, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    other = tmp_path / "other.safetensors"
    small = mlx_mamba.loader.load_model(original)
    save_prompt_cache(other, make_prompt_cache(small, [1, 2]), small)
    model = ["--model", str(cli_model)]
    return {
        "no_such_model": (["--model", str(tmp_path / "missing"), "--prompt", "x"], "missing"),
        "empty_prompt": (model + ["--prompt", ""], "prompt is empty"),
        "temp": (model + ["--prompt", "x", "--temp", "-1"], "temp"),
        "top_p": (model + ["--prompt", "x", "--top-p", "0"], "top_p"),
        "top_k": (model + ["--prompt", "x", "--top-k", "-2"], "top_k"),
        "damaged_cache": (model + ["--prompt", "x", "--prompt-cache-file", str(damaged)],
                          "damaged.safetensors"),
        "other_cache": (model + ["--prompt", "x", "--prompt-cache-file", str(other)],
                        "another configuration"),
        "no_tokenizer": (["--model", str(original), "--prompt", "x"], "--tokenizer"),
    }


def test_cli_bad_input_is_one_line(cli_model, checkpoint, tmp_path, capsys):
    original, _ = checkpoint("mamba1_original")
    for name, (argv, needle) in bad_runs(cli_model, original, tmp_path).items():
        assert main(argv) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert needle in err, (name, err)


def test_cli_error_exit_in_a_subprocess_has_no_traceback(tmp_path):
    result = run_cli("--model", tmp_path / "nowhere", "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["directory", "tokenizer.json"])
def test_cli_tokenizer_flag_serves_an_original_checkpoint(where, checkpoint, cli_model, capsys):
    original, _ = checkpoint("mamba2_original")  # vocabulary 112: ids of single characters fit
    tokenizer = cli_model if where == "directory" else cli_model / "tokenizer.json"
    assert main(["--model", str(original), "--tokenizer", str(tokenizer), "--prompt", "a",
                 "-m", "3"]) == 0
    assert "Generation: 3 tokens" in capsys.readouterr().err


def test_cli_takes_a_repo_id(cli_model, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **_: str(cli_model))
    assert main(["--model", "someone/tiny-mamba2", "--prompt", "hi", "-m", "2"]) == 0
    assert "Generation: 2 tokens" in capsys.readouterr().err

    def offline(repo, **_):
        raise LocalEntryNotFoundError("cannot reach the hub\nand no local copy")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["--model", "someone/tiny-mamba2", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: someone/tiny-mamba2: ") and err.count("\n") == 1
    assert "cannot reach the hub and no local copy" in err
