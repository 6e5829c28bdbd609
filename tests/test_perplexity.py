"""Perplexity: exp of the mean token loss computed by hand (float64 log-softmax of whole-sequence
logits), unchanged by batching and by feeding a sequence in chunks; the command line."""

import json
import math
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from comparing import relative_error
from corpus import shakespeare_lines
from tuning import model_with_tokenizer

from mlx_mamba.loader import load, load_model
from mlx_mamba.perplexity import evaluate_perplexity, make_sequences, read_tokens, token_losses


def by_hand(model, sequences):
    # Whole sequences at once, no cache; log-softmax in float64.
    losses = []
    for row in sequences:
        logits = np.array(model(mx.array(row[None, :-1])).astype(mx.float32), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        losses.append(-log_probs[np.arange(len(row) - 1), row[1:]])
    return np.array(losses)


@pytest.mark.parametrize("flavour", ["mamba2", "mamba1", "granite_dense"])
def test_perplexity_is_exp_of_mean_loss(checkpoint, flavour):
    model = load_model(checkpoint(flavour)[0])
    tokens = np.random.default_rng(0).integers(0, 100, 5 * 24).astype(np.int32)
    sequences = make_sequences(tokens, 24)
    expected = by_hand(model, sequences)
    ppl, error, basis = evaluate_perplexity(model, tokens, sequence_length=24, batch_size=2)
    assert relative_error(ppl, math.exp(expected.mean())) < 1e-5
    means = expected.mean(axis=1)
    assert basis == "sequences"
    assert relative_error(error, ppl * means.std(ddof=1) / math.sqrt(len(means))) < 1e-4
    # Batching and chunking change nothing: every split gives the same token losses.
    whole = token_losses(model, sequences, batch_size=5, chunk_size=1000)
    for batch_size, chunk_size in ((1, 1000), (2, 5), (3, 7), (5, 1)):
        split = token_losses(model, sequences, batch_size=batch_size, chunk_size=chunk_size)
        assert split.shape == whole.shape == (5, 23)
        assert relative_error(split, whole) < 1e-5, (batch_size, chunk_size)
    assert relative_error(whole, expected) < 1e-5


def test_one_sequence_error_over_tokens(checkpoint):
    model = load_model(checkpoint("mamba2")[0])
    tokens = np.arange(30, dtype=np.int32) % 100
    ppl, error, basis = evaluate_perplexity(model, tokens, sequence_length=30)
    losses = by_hand(model, tokens[None])[0]
    assert basis == "tokens"
    assert relative_error(error, ppl * losses.std(ddof=1) / math.sqrt(len(losses))) < 1e-4
    assert make_sequences(np.arange(100), 30, num_samples=2).shape == (2, 30)


@pytest.fixture(scope="module")
def tokenized_model(checkpoint, tmp_path_factory):
    return model_with_tokenizer(checkpoint("mamba2")[0], tmp_path_factory.mktemp("m") / "model")


def run(*args):
    return subprocess.run([sys.executable, "-m", "mlx_mamba.perplexity", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_command_line(tokenized_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(shakespeare_lines(40, skip=3000)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "valid.jsonl").write_text("".join(json.dumps({"text": line}) + "\n"
                                              for line in shakespeare_lines(40, skip=3000)))
    model, tokenizer = load(tokenized_model)
    for source in (text, data):
        done = run("--model", tokenized_model, "--data", source, "--sequence-length", 32,
                   "--batch-size", 3, "--num-samples", 5)
        assert done.returncode == 0, done.stderr
        match = re.search(r"^Perplexity: ([\d.]+) ± ([\d.]+)$", done.stdout, re.M)
        tokens = read_tokens(source, tokenizer, model.config.vocab_size)
        ppl, error, _ = evaluate_perplexity(model, tokens, 32, num_samples=5)
        assert match and abs(float(match[1]) - ppl) < 2e-3 and abs(float(match[2]) - error) < 2e-3
        assert "Perplexity" in done.stderr  # the progress bar


@pytest.mark.parametrize("problem", ["missing", "empty_dir", "short", "binary"])
def test_bad_data_is_one_error_line(tokenized_model, tmp_path, problem):
    data = tmp_path / "data"
    if problem == "empty_dir":
        data.mkdir()
    elif problem == "short":
        data.write_text("To be")
    elif problem == "binary":
        data.write_bytes(b"\xff\xfe\x00abc")
    done = run("--model", tokenized_model, "--data", data)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(data) in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
