"""Fine-tuning in bounded memory: the chunked loss and the segmented scans give the loss and every
gradient of the plain computation (whole logits, autograd through whole scans) in every family,
with and without gradient checkpointing; and a training step's memory grows with the sequence by
activations of width d_model, not by states or vocabulary."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_mamba
from comparing import relative_error
from corpus import shakespeare_lines
from mlx_mamba import lora
from mlx_mamba.config import ModelConfig
from mlx_mamba.models import Model
from mlx_mamba.ops import causal_attention
from mlx_mamba.ops import mamba3 as mamba3_scan
from mlx_mamba.ops import reference
from mlx_mamba.tuner import (Batch, apply_adapters, checkpoint_layers, loss_terms, losses,
                             trainer)
from test_tuner import (perturb_trainable, random_batch, run_cli, text_data,  # noqa: F401
                        tiny_model)

# Every family: tied and untied heads, logits multipliers (Granite 4.0-H, Falcon-H1), shared
# blocks (Zamba2), Mamba1, Mamba2 and attention layers, experts.
FLAVOURS = ["mamba1", "mamba1_untied", "falcon_mamba", "mamba2", "mamba2_groups_untied", "bamba",
            "granite_dense", "granite_moe", "nemotron_h", "falcon_h1", "zamba2", "jamba"]


@pytest.fixture
def small_pieces(monkeypatch):
    """Chunks of 5 tokens for the loss and short scan segments, so that 3 x 23 tokens cross many
    (not a whole number of them)."""
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 5 * 100)
    monkeypatch.setattr(reference, "SCAN_SEGMENT", 4)
    monkeypatch.setattr(reference, "SSD_SEGMENT", 8)
    monkeypatch.setattr(mamba3_scan, "SEGMENT_ROWS", 8)
    monkeypatch.setattr(causal_attention, "BLOCK", 8)


def plain_loss_terms(model, batch):
    """The computation the chunked loss replaces: whole (B, T, V) logits, then cross-entropy."""
    logits = model(mx.array(batch.inputs))
    token_losses = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(batch.targets))
    weights = mx.array(batch.weights)
    return (token_losses * weights).sum(), weights.sum()


def loss_and_gradients(model, batch, terms):
    loss, grads = nn.value_and_grad(model, lambda m: terms(m, batch)[0])(model)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


def quantize(model):
    """QLoRA's base: every linear layer (but the routers, which stay float) and embedding whose
    input width fits a 32-wide group, the head included."""
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, m: isinstance(
        m, (nn.Linear, nn.Embedding)) and m.weight.shape[1] % 32 == 0
        and not path.endswith("router"))


@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["", "checkpointed"])
@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_chunked_loss_and_segmented_scans_equal_the_plain_computation(
        checkpoint, small_pieces, flavour, kind, grad_checkpoint):
    model, _ = mlx_mamba.load(checkpoint(flavour)[0])
    if kind == "qlora":
        quantize(model)
    mx.random.seed(0)
    apply_adapters(model, {"fine_tune_type": "full" if kind == "full" else "lora",
                           "num_layers": -1, "lora_parameters": {"rank": 4, "scale": 2.0}})
    if kind == "full":  # and the head (the embeddings when tied), which full tuning freezes
        model.head_layer().unfreeze()
    perturb_trainable(model)
    batch = random_batch()  # prompt-like spans of weight 0: the completion / assistant masks

    expected_loss, expected = loss_and_gradients(model, batch, plain_loss_terms)
    if grad_checkpoint:
        checkpoint_layers(model)
    loss, grads = loss_and_gradients(model, batch, loss_terms)

    assert relative_error(loss, expected_loss) < 1e-6
    assert sorted(grads) == sorted(expected)
    if kind == "full":
        assert ("lm_head.weight" if "lm_head" in model else "backbone.embeddings.weight") in grads
    for name, value in expected.items():
        error = relative_error(grads[name], np.array(value))
        assert error < 1e-5, f"{name}: relative error {error:.1e}"


def plain_attention(q, k, v, scale, valid):
    """softmax over whole (B, H, T, T) scores, grouped heads repeated, padded keys masked."""
    groups = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
    query, key = mx.arange(q.shape[2])[:, None], mx.arange(q.shape[2])[None]
    allowed = key <= query
    if valid is not None:
        allowed = (allowed & valid[:, None, None, :]) | (key == query)
    scores = mx.where(allowed, (q * scale) @ k.swapaxes(-1, -2), -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


@pytest.mark.parametrize("padded", [False, True], ids=["", "left_padded"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("length", [5, 8, 32, 37])
def test_blockwise_attention_equals_plain_attention(monkeypatch, length, heads, kv_heads, padded):
    """Outputs and the gradients of q, k and v, at lengths within one block of 8, a whole number
    of blocks and not; grouped-query heads; padded keys (the second row's first third)."""
    monkeypatch.setattr(causal_attention, "BLOCK", 8)
    mx.random.seed(length)
    q = mx.random.normal((2, heads, length, 16))
    k, v = (mx.random.normal((2, kv_heads, length, 16)) for _ in range(2))
    valid = mx.array(np.arange(length)[None] >= np.array([[0], [length // 3]])) if padded \
        else None
    weights = mx.random.normal(q.shape)  # the cotangent of the output

    def loss(attention):
        return lambda q, k, v: (attention(q, k, v, 0.3, valid) * weights).sum()

    expected = plain_attention(q, k, v, 0.3, valid)
    assert relative_error(causal_attention.causal_attention(q, k, v, 0.3, valid), expected) < 1e-5
    grads = mx.grad(loss(causal_attention.causal_attention), argnums=(0, 1, 2))(q, k, v)
    expected_grads = mx.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
    for name, ours, theirs in zip("qkv", grads, expected_grads):
        error = relative_error(ours, theirs)
        assert error < 1e-5, f"d{name}: relative error {error:.1e}"


VOCAB = 16384  # a token's logits (64 KB in float32) exceed the bound per token alone


def small_model(kind):
    """Two layers at d_model 64 over a 16384-token vocabulary: states and vocabulary large next to
    d_model, as in real checkpoints. "hybrid": Granite 4.0-H's pattern, a Mamba2 layer and an
    attention layer (4 heads, 2 KV heads), each followed by an MLP."""
    if kind == "hybrid":
        config = ModelConfig.from_dict(dict(
            model_type="granitemoehybrid", hidden_size=64, num_hidden_layers=2,
            layer_types=["mamba", "attention"], num_attention_heads=4, num_key_value_heads=2,
            mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=64,
            mamba_chunk_size=64, shared_intermediate_size=128, vocab_size=VOCAB,
            tie_word_embeddings=False))
    else:
        mixer = dict(mamba1=dict(d_state=16, dt_rank=4),
                     mamba2=dict(d_state=64, head_dim=16, n_groups=1, chunk_size=64))[kind]
        config = ModelConfig(arch=kind, d_model=64, n_layer=2, vocab_size=VOCAB, expand=2,
                             tie_embeddings=False, **mixer)
    mx.random.seed(0)
    model = Model(config)
    mx.eval(model.parameters())
    return model


def step_peak_memory(model, length, batch_size=1):
    """Peak memory of one training step's loss and gradients (bytes)."""
    rng = np.random.default_rng(length)
    tokens = rng.integers(0, model.config.vocab_size, (batch_size, length + 1)).astype(np.int32)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones((batch_size, length), np.float32),
                  np.full(batch_size, length, np.int32))
    step = nn.value_and_grad(model, lambda m: loss_terms(m, batch)[0])
    mx.eval(step(model))
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(step(model))
    return mx.get_peak_memory()


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "hybrid"])
def test_training_memory_grows_with_d_model_not_states_or_vocabulary(kind, monkeypatch):
    """Per token and layer, a step keeps a few dozen activations of width d_model or d_inner; the
    plain computation kept (d_inner x d_state) states per Mamba1 token, (vocabulary) logits,
    their softmax and gradient per token, and (heads x length) attention scores per token."""
    # Loss chunks of 64 tokens, so that both lengths span several: a chunk's logits are a
    # constant, not a growth per token (at the default, 2048 tokens of this vocabulary).
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 64 * VOCAB)
    model = small_model(kind)
    short, long = 256, 1024
    growth = (step_peak_memory(model, long) - step_peak_memory(model, short)) / (long - short)
    c = model.config
    bound = 4 * 64 * c.d_model * (c.n_layer + 1)  # 64 float32 values of width d_model per layer
    print(f"{kind}: {growth:.0f} bytes per token (bound {bound}; d_model {c.d_model}, states "
          f"{c.d_state}, vocabulary {c.vocab_size})")
    assert growth < bound


def test_out_of_memory_is_one_error_naming_the_remedies(tiny_model, text_data, tmp_path, capsys,
                                                        monkeypatch):
    def allocation_fails(model, batch):  # what MLX's Metal allocator raises
        raise RuntimeError("[metal::malloc] Attempting to allocate 68719476736 bytes which is "
                           "greater than the maximum allowed buffer size of 28991029248 bytes.")

    monkeypatch.setattr(trainer, "loss_terms", allocation_fails)
    model = tiny_model("mamba1")
    capsys.readouterr()  # the fixtures' progress bars
    code, _, err = run_cli(lora, ["--model", model, "--train", "--data", text_data,
                                  "--iters", 1, "--batch-size", 2, "--val-batches", 0,
                                  "--adapter-path", tmp_path / "a"], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: out of memory training on a batch of 2 x "), err
    for remedy in ("--grad-checkpoint", "--max-seq-length", "--batch-size"):
        assert remedy in err, err
    # Other errors pass unchanged.
    with pytest.raises(RuntimeError, match="something else"), \
            trainer.out_of_memory_advice("testing"):
        raise RuntimeError("something else")


@pytest.mark.parametrize("flavour", ["mamba1"])
def test_cli_trains_on_32768_tokens_without_new_flags(tiny_model, tmp_path, capsys, flavour):
    data = tmp_path / "data"
    data.mkdir()
    # One record of more than 32768 tokens (the tiny tokenizer spends about one per character).
    text = " ".join(shakespeare_lines(2000))
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    model = tiny_model(flavour)
    capsys.readouterr()  # the fixtures' progress bars
    code, out, err = run_cli(lora, ["--model", model, "--train", "--data", data,
                                    "--iters", 1, "--batch-size", 1, "--max-seq-length", 32768,
                                    "--val-batches", 1, "--adapter-path", tmp_path / "a"], capsys)
    assert code == 0, err
    assert "longest" in err and "truncated" in err  # the record was cut to 32768 tokens
    train_line = next(line for line in out.splitlines() if "Train loss" in line)
    assert "Tokens/sec" in train_line and "Peak mem" in train_line
    assert math.isfinite(float(train_line.split("Train loss ")[1].split(",")[0]))
