"""Fine-tuning: exact gradients against torch autograd, adapters, data, schedules, the CLIs."""

import json
import math
import re

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

import mlx_mamba
from comparing import assert_close, relative_error
from mlx_mamba import fuse, lora
from mlx_mamba.families import to_model_names
from mlx_mamba.tuner import (Batch, DoRALinear, LoRALinear, apply_adapters, checkpoint_layers,
                             iterate_batches, load_adapters, load_split, loss_terms,
                             make_schedule, save_adapters, train)
from mlx_mamba.tuner import adapters as adapters_module
from mlx_mamba.tuner.datasets import make_batch
from tuning import model_with_tokenizer, write_data

GRADIENT_TOLERANCE = 1e-3  # max |ours - torch| relative to the largest |torch| gradient


@pytest.fixture(scope="session")
def tiny_model(checkpoint, tmp_path_factory):
    """tiny_model(flavour) -> a model directory with a tokenizer that fits its vocabulary."""
    made = {}

    def make(flavour):
        if flavour not in made:
            made[flavour] = model_with_tokenizer(checkpoint(flavour)[0],
                                                 tmp_path_factory.mktemp("tuned") / flavour)
        return made[flavour]

    return make


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def random_batch(seed=0, rows=3, length=23, vocab=100):
    """A right-padded batch with prompt-like unweighted spans, as the data loader makes them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
    lengths = np.array([length, length - 7, length - 12][:rows], np.int32)
    weights = np.zeros((rows, length), np.float32)
    for row, n in enumerate(lengths):
        weights[row, row * 3:n] = 1.0  # row r's first 3r targets are a "prompt"
        tokens[row, n + 1:] = 0
    return Batch(tokens[:, :-1], tokens[:, 1:], weights, lengths)


def mean_loss(model, batch):
    total, count = loss_terms(model, batch)
    return total / count


def gradients(model, batch):
    loss, grads = nn.value_and_grad(model, mean_loss)(model, batch)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("flavour", ["mamba1", "falcon_mamba", "mamba2", "mamba2_groups_untied"])
def test_loss_and_gradients_match_torch_autograd(checkpoint, flavour):
    directory, reference = checkpoint(flavour)
    model, _ = mlx_mamba.load(directory)
    batch = random_batch()
    loss, grads = gradients(model, batch)

    reference.zero_grad()
    logits = reference(torch.tensor(batch.inputs, dtype=torch.long)).logits
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.tensor(batch.targets, dtype=torch.long).flatten(),
        reduction="none")
    weights = torch.tensor(batch.weights).flatten()
    expected_loss = (losses * weights).sum() / weights.sum()
    expected_loss.backward()
    expected = to_model_names({name: mx.array(p.grad.numpy())
                               for name, p in reference.named_parameters()}, model.config)

    assert abs(loss - expected_loss.item()) < 1e-5 * abs(expected_loss.item())
    assert sorted(grads) == sorted(expected)
    errors = assert_close({name: grads[name] for name in expected}, expected, GRADIENT_TOLERANCE)
    worst = max(errors, key=errors.get)  # every error is finite and within the tolerance here
    print(f"{flavour}: loss {loss:.6f}, worst gradient {worst} relative error {errors[worst]:.1e}")


def adapted(directory, kind, seed=0, **config):
    model, _ = mlx_mamba.load(directory)
    mx.random.seed(seed)
    apply_adapters(model, dict({"fine_tune_type": kind, "num_layers": -1,
                                "lora_parameters": {"rank": 4, "scale": 2.0}}, **config))
    return model


def perturb_trainable(model, seed=1):
    # A trained adapter in one step: fresh LoRA updates are zero, which would hide mistakes.
    rng = np.random.default_rng(seed)
    model.update(tree_map(lambda v: v + mx.array(0.05 * rng.standard_normal(v.shape),
                                                  v.dtype), model.trainable_parameters()))


@pytest.mark.parametrize("flavour", ["mamba1", "mamba2"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_start_as_identity_and_every_adapter_is_used(tiny_model, flavour, kind):
    directory = tiny_model(flavour)
    base, _ = mlx_mamba.load(directory)
    model = adapted(directory, kind, train_ssm_params=True)
    ids = mx.array(np.random.default_rng(0).integers(0, 100, (2, 19)))
    assert relative_error(model(ids), np.array(base(ids))) < 1e-6
    perturb_trainable(model)
    keys = {"mamba1": {"in_proj", "x_proj", "dt_proj", "out_proj"},
            "mamba2": {"in_proj", "out_proj"}}[flavour]
    adapted_names = {name.split(".")[-1] for name, m in model.named_modules()
                     if isinstance(m, LoRALinear)}
    assert adapted_names == keys
    _, grads = gradients(model, random_batch())
    unused = [name for name, g in grads.items() if not float(mx.abs(g).max()) > 0]
    assert not unused, f"trainable parameters with no gradient: {unused}"
    ssm = {"A_log", "D", "conv1d.weight", "conv1d.bias",
           "dt_bias" if flavour == "mamba2" else "dt_proj.linear.bias"}
    assert {n.split("mixer.")[1] for n in grads if "lora" not in n and not n.endswith(".m")} == ssm


def test_dora_layer_matches_its_formula():
    mx.random.seed(0)
    base = nn.Linear(12, 7, bias=True)
    layer = DoRALinear(base, rank=3, scale=1.5)
    perturb_trainable(layer)
    x = mx.random.normal((5, 12))
    W, b, A, B, m = (np.array(v, np.float64) for v in
                     (base.weight, base.bias, layer.lora_a, layer.lora_b, layer.m))
    V = W + 1.5 * (A @ B).T
    direction = V / np.linalg.norm(V, axis=1, keepdims=True)
    expected = np.array(x, np.float64) @ (m[:, None] * direction).T + b
    assert relative_error(layer(x), expected) < 1e-5
    assert relative_error(fuse.fuse_linear(layer)(x), expected) < 1e-5


@pytest.mark.parametrize("flavour", ["mamba1", "mamba2"])
def test_gradient_checkpointing_keeps_gradients(tiny_model, flavour):
    for kind in ("lora", "full"):
        model = adapted(tiny_model(flavour), kind)
        perturb_trainable(model)
        base_class = type(model.backbone.layers[0].mixer)
        loss, grads = gradients(model, random_batch())
        checkpoint_layers(checkpoint_layers(model))  # twice: the second changes nothing
        assert type(model.backbone.layers[0].mixer).__bases__ == (base_class,)
        loss_checkpointed, grads_checkpointed = gradients(model, random_batch())
        assert loss_checkpointed == pytest.approx(loss, rel=1e-6)
        for name, g in grads.items():
            assert relative_error(grads_checkpointed[name], np.array(g)) < 1e-5, name


def test_accumulated_step_equals_one_big_batch(tiny_model, text_data):
    directory = tiny_model("mamba2")
    tokenizer = mlx_mamba.loader.load_tokenizer(directory)
    examples = load_split(text_data, "train", tokenizer, 64)
    big = make_batch(examples[:8], 8)
    halves = [big.rows(0, 4), big.rows(4, 8)]
    results = []
    for batches, accumulation in (([big], 1), (halves, 2)):
        model = adapted(directory, "lora", train_ssm_params=True)
        perturb_trainable(model)
        train(model, optim.SGD(learning_rate=0.1), iter(batches), iters=1,
              grad_accumulation_steps=accumulation, log=lambda *a, **k: None)
        results.append(dict(tree_flatten(model.trainable_parameters())))
    for name, value in results[0].items():
        assert relative_error(results[1][name], np.array(value)) < 1e-5, name


def test_schedules_follow_their_formulas():
    steps, warmup, lr, low = 20, 4, 1e-3, 1e-5
    cosine = make_schedule("cosine", lr, steps, warmup, low)
    linear = make_schedule("linear", lr, steps, warmup, low)
    constant = make_schedule("constant", lr, steps, warmup, low)
    for step in range(steps):
        if step < warmup:
            expected = {"cosine": lr * (step + 1) / warmup}
            expected["linear"] = expected["constant"] = expected["cosine"]
        else:
            t = (step - warmup) / (steps - warmup - 1)
            expected = {"cosine": low + (lr - low) * 0.5 * (1 + math.cos(math.pi * t)),
                        "linear": low + (lr - low) * (1 - t), "constant": lr}
        for name, schedule in (("cosine", cosine), ("linear", linear), ("constant", constant)):
            assert schedule(mx.array(step)).item() == pytest.approx(expected[name], rel=1e-5)
    assert cosine(mx.array(steps - 1)).item() == pytest.approx(low)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return mlx_mamba.loader.load_tokenizer(tiny_model("mamba1"))


def write_jsonl(directory, name, lines):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.jsonl").write_text("".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return directory


def test_loss_weights_of_each_record_format(tokenizer, tmp_path):
    eos = tokenizer.eos_token_id
    prompt, completion = "To be, or not", " to be: that is"
    messages = [{"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A king."},
                {"role": "user", "content": "Of what?"},
                {"role": "assistant", "content": "Of fools."}]
    write_jsonl(tmp_path, "train", [{"text": prompt}, {"prompt": prompt, "completion": completion},
                                    {"messages": messages}])
    text, pair, chat = load_split(tmp_path, "train", tokenizer, 1000)

    assert text.tokens.tolist() == tokenizer.encode(prompt) + [eos]
    assert text.trained.tolist() == [False] + [True] * (len(text.tokens) - 1)

    completion_ids = tokenizer.encode(completion, add_special_tokens=False) + [eos]
    assert pair.tokens.tolist() == tokenizer.encode(prompt) + completion_ids
    assert pair.tokens[pair.trained].tolist() == completion_ids

    # Trained: each assistant turn's content and the end-of-turn token, nothing else.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], chat.trained.astype(int), [0]])))
    runs = [chat.tokens[start:end] for start, end in zip(edges[::2], edges[1::2])]
    squeeze = lambda text: text.replace(" ", "")  # the tokenizer's word-start marks aside
    assert [squeeze(tokenizer.decode(run)) for run in runs] == [
        squeeze(m["content"] + "<|endoftext|>") for m in messages if m["role"] == "assistant"]


def test_batches_pad_on_the_right_and_cover_every_example(tokenizer, text_data):
    examples = load_split(text_data, "valid", tokenizer, 64)
    batches = list(iterate_batches(examples, 3, loop=False))  # 8 examples: the last batch has 2
    assert sum(int((b.lengths > 0).sum()) for b in batches) == len(examples)
    for batch in batches:
        for row, n in enumerate(batch.lengths):
            assert not batch.weights[row, n:].any() and not batch.inputs[row, n:].any()
            assert batch.weights[row, :n].all()
    assert batches[-1].lengths[-1] == 0  # the filler row


def test_right_padding_never_changes_a_sequences_loss(tiny_model, tokenizer, text_data):
    model = mlx_mamba.load(tiny_model("mamba1"))[0]
    examples = load_split(text_data, "valid", tokenizer, 64)[:4]
    assert len({len(e.tokens) for e in examples}) > 1  # so the batch is padded
    padded = loss_terms(model, make_batch(examples, 4))
    alone = [loss_terms(model, make_batch([e], 1)) for e in examples]
    assert padded[1].item() == sum(n.item() for _, n in alone)
    assert padded[0].item() == pytest.approx(sum(total.item() for total, _ in alone), rel=1e-5)


def test_truncation_warns_and_keeps_the_prefix(tokenizer, tmp_path, capsys):
    text = "Now is the winter of our discontent made glorious summer by this sun of York"
    write_jsonl(tmp_path, "train", [{"text": text}, {"text": "short"}])
    long, short = load_split(tmp_path, "train", tokenizer, 8)
    assert long.tokens.tolist() == tokenizer.encode(text)[:8]
    assert len(short.tokens) < 8
    err = capsys.readouterr().err
    assert "warning:" in err and "1 sequence(s) longer than --max-seq-length 8" in err


def run_cli(module, args, capsys):
    code = module.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("lines, message", [
    (['{"text": "fine"}', '{"text": "broken'], "train.jsonl:2: not valid JSON"),
    (['{"txt": "wrong key"}'], 'train.jsonl:1: expected an object with "text"'),
    (['{"text": ""}'], "train.jsonl:1: nothing to train on"),
    ([], "train.jsonl: no examples"),
])
def test_bad_data_is_one_line_naming_file_and_line(tiny_model, tmp_path, capsys, lines, message):
    data = write_jsonl(tmp_path / "data", "train", lines)
    write_jsonl(data, "valid", [{"text": "fine enough"}])
    code, out, err = run_cli(lora, ["--model", tiny_model("mamba1"), "--train", "--data", data,
                                    "--iters", 1, "--adapter-path", tmp_path / "a"], capsys)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "a").exists()


def test_missing_files_are_clear_errors(tiny_model, text_data, tmp_path, capsys):
    model = tiny_model("mamba1")
    for args, message in [
        (["--test", "--data", text_data, "--adapter-path", tmp_path / "none"],
         "none/adapter_config.json: adapter config not found"),
        (["--train", "--data", text_data, "--resume-adapter-file", tmp_path / "no.safetensors"],
         "no.safetensors: adapter file not found"),
        (["--train", "--data", tmp_path / "nodata"], "nodata: does not exist"),
        (["--train", "--data", text_data / "train.jsonl"], "train.jsonl: is not a directory"),
        (["--train", "--data", tmp_path], "train.jsonl: not found"),
        (["--train", "--data", text_data, "--num-layers", 5], "num_layers 5: the model has 2"),
    ]:
        code, _, err = run_cli(lora, ["--model", model, "--iters", 1, *args], capsys)
        assert code == 1 and err.startswith("error: ") and message in err, err
        assert err.count("\n") == 1
    code, _, err = run_cli(fuse, ["--model", model, "--adapter-path", tmp_path / "none",
                                  "--save-path", tmp_path / "out"], capsys)
    assert code == 1 and "adapter config not found" in err and not (tmp_path / "out").exists()


def test_cli_tokenizer_flag_serves_a_model_without_one(checkpoint, tiny_model, text_data,
                                                      tmp_path, capsys):
    bare = checkpoint("mamba1")[0]  # the tiny model's weights, without its tokenizer
    whole = tiny_model("mamba1")
    capsys.readouterr()  # the fixtures' progress bars
    args = ["--data", text_data, "--train", "--test", "--iters", 2, "--batch-size", 2,
            "--val-batches", 1, "--test-batches", 2, "--adapter-path", tmp_path / "a"]
    code, _, err = run_cli(lora, ["--model", bare, *args], capsys)
    assert code == 1 and err.startswith("error: ") and "pass --tokenizer" in err, err
    # Its tokenizer.json alone (whose eos then comes from the config) trains and tests exactly
    # as the whole model directory does.
    runs = [["--model", bare, "--tokenizer", whole / "tokenizer.json"], ["--model", whole]]
    outputs = []
    for run in runs:
        code, out, err = run_cli(lora, [*run, *args], capsys)
        assert code == 0, err
        outputs.append(re.findall(r"(?:Train|Val|Test) loss [0-9.]+", out))
    assert outputs[0] == outputs[1] and "Test loss" in outputs[0][-1]


def test_interrupted_save_keeps_the_last_checkpoint(tiny_model, tmp_path, monkeypatch):
    model = adapted(tiny_model("mamba2"), "lora")
    save_adapters(model, tmp_path, {"fine_tune_type": "lora"})
    saved = (tmp_path / "adapters.safetensors").read_bytes()
    perturb_trainable(model)

    def crash(file, weights, **kwargs):
        file.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters_module.mx, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapters(model, tmp_path, {"fine_tune_type": "lora"}, iteration=5)
    assert (tmp_path / "adapters.safetensors").read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                          "adapters.safetensors"]


def logits(model, seed=0):
    return model(mx.array(np.random.default_rng(seed).integers(0, 100, (2, 21))))


@pytest.mark.parametrize("flavour, kind", [("mamba1", "lora"), ("mamba2", "dora"),
                                           ("mamba1", "full")])
def test_cli_trains_saves_resumes_tests_and_fuses(tiny_model, text_data, tmp_path, capsys,
                                                  flavour, kind):
    model_dir, adapters = tiny_model(flavour), tmp_path / "adapters"
    common = ["--model", model_dir, "--data", text_data, "--adapter-path", adapters,
              "--fine-tune-type", kind, "--lora-rank", 4, "--learning-rate", 1e-2,
              "--batch-size", 4, "--train-ssm-params"]
    code, out, err = run_cli(lora, [*common, "--train", "--iters", 6, "--steps-per-report", 3,
                                    "--steps-per-eval", 3, "--save-every", 3,
                                    "--lr-schedule", "cosine", "--warmup-steps", 1,
                                    "--grad-accumulation-steps", 2,
                                    "--grad-checkpoint", "--test"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    train_lines = [line for line in lines if ": Train loss " in line]
    assert [line.split(":")[0] for line in train_lines] == ["Iter 3", "Iter 6"]
    for field in ("It/sec", "Tokens/sec", "Peak mem"):
        assert field in train_lines[0]
    val = [float(line.split("Val loss ")[1].split(",")[0]) for line in lines if "Val loss" in line]
    assert len(val) == 3 and val[2] < val[0]  # iterations 0, 3 and 6
    test_loss = float(next(line for line in lines if line.startswith("Test loss")).split()[2][:-1])
    assert sorted(p.name for p in adapters.iterdir()) == [
        "0000003_adapters.safetensors", "0000006_adapters.safetensors", "adapter_config.json",
        "adapters.safetensors"]

    trained = mlx_mamba.load(model_dir)[0]
    load_adapters(trained, adapters)
    if kind != "full":
        assert trained.backbone.layers[0].mixer.in_proj.lora_a.shape[1] == 4

    # Resuming starts from the saved weights: the first validation repeats the last one.
    code, out, err = run_cli(lora, [*common, "--train", "--iters", 1, "--steps-per-eval", 1,
                                    "--resume-adapter-file", adapters / "adapters.safetensors",
                                    "--adapter-path", tmp_path / "resumed"], capsys)
    assert code == 0, err
    assert f"Iter 0: Val loss {val[2]:.3f}" in out

    # --test alone reads the adapters back and reproduces the test loss.
    code, out, err = run_cli(lora, [*common, "--test"], capsys)
    assert code == 0 and f"Test loss {test_loss:.3f}" in out, err

    code, out, err = run_cli(fuse, ["--model", model_dir, "--adapter-path", adapters,
                                    "--save-path", tmp_path / "fused"], capsys)
    assert code == 0, err
    fused, fused_tokenizer = mlx_mamba.load(tmp_path / "fused")
    assert fused_tokenizer is not None
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    base = mlx_mamba.load(model_dir)[0]
    assert relative_error(logits(fused), np.array(logits(trained))) < 1e-5
    assert relative_error(logits(base), np.array(logits(trained))) > 1e-3


def quantize(model):
    # Every linear layer whose input width fits a 32-wide group; the embedding stays float.
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, m: isinstance(
        m, nn.Linear) and m.weight.shape[1] % 32 == 0)
    return model


@pytest.mark.parametrize("flavour", ["mamba1", "mamba2"])
def test_qlora_trains_over_quantized_layers_and_fuses(tiny_model, text_data, flavour):
    directory = tiny_model(flavour)
    model, tokenizer = mlx_mamba.load(directory)
    quantize(model)
    apply_adapters(model, {"fine_tune_type": "lora", "num_layers": -1,
                           "lora_parameters": {"rank": 4, "scale": 2.0}})
    assert isinstance(model.backbone.layers[0].mixer.in_proj.linear, nn.QuantizedLinear)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if ".linear." in k}
    examples = load_split(text_data, "train", tokenizer, 64)
    batches = iterate_batches(examples, 4)
    before = gradients(model, next(iterate_batches(examples, 8, loop=False)))[0]
    train(model, optim.Adam(learning_rate=1e-2), batches, iters=8, log=lambda *a, **k: None)
    after = gradients(model, next(iterate_batches(examples, 8, loop=False)))[0]
    assert after < before
    for k, v in tree_flatten(model.parameters()):
        if k in frozen:
            assert np.array_equal(np.array(v), frozen[k]), f"quantized weight {k} changed"

    reference = logits(model)
    fuse.fuse_adapters(model, dequantize=True)
    layers = [m for _, m in model.named_modules()]
    assert not any(isinstance(m, (LoRALinear, nn.QuantizedLinear)) for m in layers)
    assert relative_error(logits(model), np.array(reference)) < 1e-5


def test_qlora_cli_on_a_quantized_model_and_fuse_de_quantize(tiny_model, text_data, tmp_path,
                                                             capsys):
    quantize_model = pytest.importorskip("mlx_mamba.quantize").quantize_model
    source = tiny_model("mamba2")
    model = mlx_mamba.load(source)[0]
    model.config.quantization = {"group_size": 32, "bits": 4, "mode": "affine"}
    quantize_model(model, model.config.quantization)
    fuse.save_model(model, source, tmp_path / "quantized")
    code, _, err = run_cli(lora, ["--model", tmp_path / "quantized", "--train", "--data", text_data,
                                  "--iters", 4, "--learning-rate", 1e-2, "--lora-rank", 4,
                                  "--adapter-path", tmp_path / "adapters"], capsys)
    assert code == 0, err
    adapted = mlx_mamba.load(tmp_path / "quantized")[0]
    load_adapters(adapted, tmp_path / "adapters")
    assert isinstance(adapted.backbone.layers[1].mixer.in_proj.linear, nn.QuantizedLinear)

    for flags, name in (([], "kept"), (["--de-quantize"], "float")):
        code, _, err = run_cli(fuse, ["--model", tmp_path / "quantized", "--adapter-path",
                                      tmp_path / "adapters", "--save-path", tmp_path / name,
                                      *flags], capsys)
        assert code == 0, err
    assert "quantization" not in config_of(tmp_path / "float")
    assert "quantization" in config_of(tmp_path / "kept")
    fused = mlx_mamba.load(tmp_path / "float")[0]
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
    assert relative_error(logits(fused), np.array(logits(adapted))) < 1e-5
    # Without --de-quantize the fused projections are quantized again, as the float ones would be.
    kept = dict(tree_flatten(mlx_mamba.load(tmp_path / "kept")[0].parameters()))
    quantize_model(fused, config_of(tmp_path / "kept")["quantization"])
    projections = {k: v for k, v in tree_flatten(fused.parameters()) if "_proj." in k}
    assert any(k.endswith("scales") for k in projections)
    for name, value in projections.items():
        assert np.array_equal(np.array(kept[name]), np.array(value)), name


def config_of(directory):
    return json.loads((directory / "config.json").read_text())
