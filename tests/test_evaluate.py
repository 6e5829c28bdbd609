"""The lm-eval model against the model's own numbers: log-likelihoods computed by hand (float64
log-softmax of whole-sequence logits, lm-eval's tokenization done here), with and without the
shared-context reuse; rolling windows; generation against generate(); the local tasks of
tests/data/evaluate through lm-eval and through the command line."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from comparing import relative_error
from tuning import model_with_tokenizer

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from mlx_mamba import scoring
from mlx_mamba.generate import generate
from mlx_mamba.lm_eval_model import MambaLM
from mlx_mamba.convert import convert
from mlx_mamba.loader import load

TASKS = Path(__file__).resolve().parent / "data" / "evaluate"
FAMILIES = ["mamba2", "granite_dense"]  # a pure Mamba2, a hybrid with attention (KV caches)


@pytest.fixture(scope="module")
def loaded(checkpoint, tmp_path_factory):
    """flavour -> (model directory with a tokenizer, model, tokenizer); "FLAVOUR-4bit": the
    flavour converted to 4 bits."""
    made = {}

    def make(flavour):
        if flavour not in made:
            name, _, quantized = flavour.partition("-")
            directory = model_with_tokenizer(checkpoint(name)[0],
                                             tmp_path_factory.mktemp(name) / "model")
            if quantized:
                directory = convert(directory, directory.parent / flavour, quantize=True,
                                    q_bits=4, q_group_size=32)
            made[flavour] = (directory, *load(directory))
        return made[flavour]

    return make


def log_softmax(model, ids):
    """(len(ids) - 1, V) float64 log-probabilities of each next token, from one forward."""
    logits = np.array(model(mx.array([ids[:-1]])).astype(mx.float32), np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def by_hand(model, context, continuation):
    """(log-probability, is_greedy) of token lists, the context whole (no window)."""
    whole = context + continuation
    logprobs = log_softmax(model, whole)
    positions = np.arange(len(context) - 1, len(whole) - 1)
    picked = logprobs[positions, continuation]
    return picked.sum(), bool((logprobs[positions].argmax(-1) == continuation).all())


def encode_pair(tokenizer, context, continuation):
    # lm-eval's convention, written out: trailing spaces go to the continuation; the whole text
    # is encoded and split after the context's tokens; an empty context is BOS, else EOS.
    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        return [prefix], encode(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ids = encode(stripped)
    return ids, encode(stripped + continuation)[len(ids):]


def instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


# Contexts shared by several continuations, one with a trailing space, an empty one, and one
# that is a single token (its prefix, the context but its last token, is empty).
PAIRS = [("First Citizen: Before we proceed", c) for c in (" any further", " no", " hear me")] + \
        [("All: Speak, ", c) for c in ("speak.", "sing.")] + \
        [("", "You are all resolved"), ("A", " citizen"), ("A", " word")]


@pytest.mark.parametrize("flavour", [*FAMILIES, "granite_dense-4bit"])
@pytest.mark.parametrize("reuse, batch_size", [(True, 8), (True, 2), (False, 3)])
def test_loglikelihood_equals_the_models_own(loaded, flavour, reuse, batch_size):
    _, model, tokenizer = loaded(flavour)
    if flavour.endswith("4bit"):
        assert isinstance(model.backbone.layers[0].mixer.in_proj, nn.QuantizedLinear)
    expected = [by_hand(model, *encode_pair(tokenizer, c, t)) for c, t in PAIRS]
    lm = MambaLM(model, tokenizer, batch_size=batch_size, reuse_context=reuse)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    assert relative_error([g for g, _ in got], [e for e, _ in expected]) < 1e-5
    assert [g for _, g in got] == [e for _, e in expected]


@pytest.mark.parametrize("flavour", FAMILIES)
def test_shared_contexts_are_prefilled_once(loaded, flavour, monkeypatch):
    _, model, tokenizer = loaded(flavour)
    prefilled = []

    def counting(model, rows, cache, **kwargs):
        prefilled.extend(map(tuple, rows))
        return prefill(model, rows, cache, **kwargs)

    prefill = scoring.prefill
    monkeypatch.setattr(scoring, "prefill", counting)
    requests = [encode_pair(tokenizer, c, t) for c, t in PAIRS]
    with_reuse = scoring.continuation_logprobs(model, requests, reuse=True)
    assert len(prefilled) == len(set(prefilled)) == 4  # three contexts and the empty prefix
    prefilled.clear()
    without = scoring.continuation_logprobs(model, requests, reuse=False)
    assert len(prefilled) == len(PAIRS)
    assert relative_error([s for s, _ in with_reuse], [s for s, _ in without]) < 1e-6


@pytest.mark.parametrize("flavour", FAMILIES)
def test_is_greedy_follows_the_argmax(loaded, flavour):
    _, model, _ = loaded(flavour)
    context = [5, 17, 42, 8, 23]
    greedy = []
    for _ in range(4):  # the argmax continuation, token by token
        greedy.append(int(log_softmax(model, context + greedy + [0])[-1].argmax()))
    wrong = greedy[:-1] + [(greedy[-1] + 1) % 100]
    results = scoring.continuation_logprobs(model, [(context, greedy), (context, wrong),
                                                    (context, greedy[:1])], batch_size=2)
    assert [g for _, g in results] == [True, False, True]
    expected = [by_hand(model, context, c)[0] for c in (greedy, wrong, greedy[:1])]
    assert relative_error([s for s, _ in results], expected) < 1e-5


def test_long_context_is_cut_to_the_window(loaded):
    _, model, _ = loaded("mamba2")
    context, continuation = list(range(3, 40)), [7, 9, 11]
    got = scoring.continuation_logprobs(model, [(context, continuation)], max_length=4)
    window = (context + continuation)[-5:]  # the last max_length + 1 tokens
    expected = by_hand(model, window[:-3], continuation)[0]
    assert relative_error(got[0][0], expected) < 1e-5
    assert relative_error(got[0][0], by_hand(model, context, continuation)[0]) > 1e-3
    with pytest.raises(scoring.ScoringError, match="more than the max length"):
        scoring.continuation_logprobs(model, [([1], list(range(12)))], max_length=10)
    with pytest.raises(scoring.ScoringError, match="request 0: token id 100"):
        scoring.continuation_logprobs(model, [([1], [100])])


TEXTS = ["First Citizen: Before we proceed any further, hear me speak.",
         "All: Speak, speak. First Citizen: You are all resolved rather to die than to famish?"]


def rolling_by_hand(model, tokens, prefix, max_length):
    """The sum of each token's log-probability, each read after the window lm-eval gives it:
    windows predict max_length tokens each, after one token of context, and the last window
    reads a full max_length of tokens before its first prediction."""
    sequence, total, predicted = [prefix] + tokens, 0.0, 0
    while predicted < len(tokens):
        end = min(predicted + max_length, len(tokens))  # predicts tokens[predicted:end]
        start = max(0, end - max_length)  # its input: sequence[start:end]
        logprobs = log_softmax(model, sequence[start:end + 1])
        count = end - predicted
        total += logprobs[np.arange(len(logprobs) - count, len(logprobs)),
                          tokens[predicted:end]].sum()
        predicted = end
    return total


@pytest.mark.parametrize("flavour", FAMILIES)
def test_loglikelihood_rolling(loaded, flavour):
    _, model, tokenizer = loaded(flavour)
    token_lists = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    prefix = tokenizer.eos_token_id  # the tiny tokenizer has no BOS
    assert tokenizer.bos_token_id is None and min(map(len, token_lists)) > 12
    whole = MambaLM(model, tokenizer).loglikelihood_rolling(
        instances("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True)
    expected = [by_hand(model, [prefix], tokens)[0] for tokens in token_lists]
    assert relative_error(whole, expected) < 1e-5
    # Longer than the window: lm-eval's rolling windows, each scored after its own context.
    windowed = MambaLM(model, tokenizer, max_length=5, batch_size=3).loglikelihood_rolling(
        instances("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True)
    expected = [rolling_by_hand(model, tokens, prefix, 5) for tokens in token_lists]
    assert relative_error(windowed, expected) < 1e-5
    assert relative_error(windowed, whole) > 1e-3


@pytest.mark.parametrize("flavour", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_generate_until_stops_at_the_stop_strings(loaded, flavour, batch_size):
    # batch 2: the third request joins while another is decoding.
    _, model, tokenizer = loaded(flavour)
    context = "First Citizen: Before we proceed"
    ids = tokenizer.encode(context, add_special_tokens=False)
    full = generate(model, tokenizer, ids, max_tokens=16)
    assert len(full) >= 3
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a string it meets halfway
    cut = full[:full.index(stop)]
    lm = MambaLM(model, tokenizer, batch_size=batch_size)
    got = lm.generate_until(instances("generate_until", [
        (context, {"until": [stop, "never there"], "max_gen_toks": 16, "do_sample": False}),
        (context, {"until": ["never there"], "max_gen_toks": 16}),
        (context, {"until": stop, "max_gen_toks": 3}),
    ]), disable_tqdm=True)
    assert got[0] == cut and len(cut) < len(full)
    assert got[1] == full
    short = generate(model, tokenizer, ids, max_tokens=3)
    assert got[2] == short.split(stop)[0]


def test_local_task_through_lm_eval(loaded, monkeypatch):
    """tiny_choice's accuracy is the share of questions whose right choice has the highest
    log-likelihood by hand; reuse changes nothing."""
    directory, model, tokenizer = loaded("granite_dense")
    monkeypatch.chdir(TASKS)  # the task's data_files are relative to the working directory
    docs = [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]
    right = 0
    for doc in docs:
        scores = [by_hand(model, *encode_pair(tokenizer, doc["question"], " " + choice))[0]
                  for choice in doc["choices"]]
        right += int(np.argmax(scores) == doc["label"])
    manager = TaskManager(include_path=str(TASKS))
    for reuse in (True, False):
        results = lm_eval.simple_evaluate(
            model=MambaLM(model, tokenizer, reuse_context=reuse), tasks=["tiny_choice"],
            task_manager=manager, num_fewshot=0, log_samples=False)
        assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(right / len(docs))
    # By its registered name, as lm-eval's own command line makes it.
    results = lm_eval.simple_evaluate(
        model="mlx_mamba", model_args={"model": str(directory)}, batch_size=2,
        tasks=["tiny_choice"], task_manager=manager, num_fewshot=0, log_samples=False)
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(right / len(docs))


def run(*args, cwd=TASKS):
    return subprocess.run([sys.executable, "-m", "mlx_mamba.evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_command_writes_results(loaded, tmp_path):
    directory, _, _ = loaded("mamba2")
    result = run("--model", directory, "--tasks", "tiny_choice,tiny_until", "tiny_rolling",
                 "--include-path", ".", "--num-fewshot", "1", "--limit", "3", "--batch-size",
                 "2", "--output-dir", tmp_path / "out", "--seed", "1")
    assert result.returncode == 0, result.stderr
    written = list((tmp_path / "out").iterdir())
    assert [f.name for f in written] == ["eval_model_01shot_tiny_choice_tiny_until_"
                                         "tiny_rolling.json"]
    results = json.loads(written[0].read_text())["results"]
    assert 0 <= results["tiny_choice"]["acc,none"] <= 1
    assert "exact_match,none" in results["tiny_until"]
    assert results["tiny_rolling"]["word_perplexity,none"] > 1
    assert "tiny_choice" in result.stdout


def test_bad_input_is_one_error_line(loaded, tmp_path):
    directory, _, _ = loaded("mamba2")
    for args, message in [
        (["--model", directory, "--tasks", "no_such_task"], "unknown task no_such_task"),
        (["--model", tmp_path / "missing", "--tasks", "tiny_choice"], "missing"),
        (["--model", directory, "--tasks", "tiny_choice", "--include-path", tmp_path / "none"],
         "no such directory"),
        (["--model", directory, "--tasks", "tiny_choice", "--batch-size", "0"], "batch-size"),
    ]:
        result = run(*args, "--include-path", ".", "--output-dir", tmp_path) \
            if "--include-path" not in args else run(*args, "--output-dir", tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and message in lines[0], lines


def test_without_lm_eval_says_what_to_install(tmp_path):
    # lm_eval made unimportable: the command says how to get it.
    code = ("import sys; sys.modules['lm_eval'] = None; from mlx_mamba.evaluate import main; "
            f"main(['--model', {str(tmp_path)!r}, '--tasks', 'tiny_choice'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: lm-eval is not installed")
    assert lines[0].endswith('pip install "mlx-mamba[eval]"')
