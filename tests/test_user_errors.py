"""What every bad input gets, for the four command lines and the public functions: one clear
message naming the flag, file, line or field (one `error: ...` line on the command line), raised
before any work, with nothing half-written left on disk."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest

import mlx_mamba
from mlx_mamba import convert, fuse, lora
from mlx_mamba.generate import (GenerationError, batch_generate, build_parser, generate,
                                stream_generate)
from mlx_mamba.generate import main as generate_main
from mlx_mamba.prompt_cache import (PromptCacheError, load_prompt_cache, make_prompt_cache,
                                    save_prompt_cache)
from mlx_mamba.quant_modes import QuantizationError, quantization_params
from mlx_mamba.sample import SamplerError
from mlx_mamba.tuner import (AdapterError, DataError, TrainingError, apply_adapters,
                             iterate_batches, load_split, make_schedule, train)
from tuning import model_with_tokenizer, write_data

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"generate": generate_main, "lora": lora.main, "fuse": fuse.main,
         "convert": convert.main}
PARSERS = {"generate": build_parser, "lora": lora.build_parser,
           "fuse": fuse.build_parser, "convert": convert.parser}


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    """A tiny Mamba2 with a tokenizer (and chat template) of its 100-token vocabulary."""
    return model_with_tokenizer(checkpoint("mamba2")[0], tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return mlx_mamba.load(model_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), train=8, valid=4, test=4)


@pytest.fixture(scope="module")
def adapters(model_dir, data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "adapters"
    assert lora.main(["--model", str(model_dir), "--train", "--data", str(data_dir), "--iters", "1",
                      "--val-batches", "0", "--adapter-path", str(path)]) == 0
    return path


def error_line(name, argv, capsys, code=1):
    """Run a command line's main; returns (its one `error: ...` line, stdout)."""
    try:
        result = MAINS[name]([str(a) for a in argv])
    except SystemExit as e:  # argparse, and convert.py's main
        result = e.code
    out, err = capsys.readouterr()
    assert result == code, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    # Progress bars may come before the error line, never anything after it.
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert "Traceback" not in err
    return errors[0], out


def disk_full(monkeypatch):
    """MLX's safetensors writer hits a full disk after writing part of the file."""
    def write(file, arrays, metadata=None):
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mx, "save_safetensors", write)


def files_in(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# ---- flags: refused while parsing, before anything is loaded ---------------------------------

BASE = {"generate": ["--model", "m", "--prompt", "p"], "lora": ["--model", "m"],
        "fuse": ["--model", "m"], "convert": ["--hf-path", "h", "--mlx-path", "o"]}
FLAG_ERRORS = [
    ("generate", ["--seed", "-1"],
     "argument --seed: -1: expected an integer from 0 to 18446744073709551615"),
    ("generate", ["--seed", str(2**64)], "argument --seed: 18446744073709551616: expected"),
    ("generate", ["--max-tokens", "-1"], "argument --max-tokens/-m: -1: expected an integer >= 0"),
    ("generate", ["--max-tokens", "many"], "argument --max-tokens/-m: 'many' is not an integer"),
    ("generate", ["--prefill-step-size", "0"],
     "argument --prefill-step-size: 0: expected an integer >= 1"),
    ("generate", ["--verbose", "maybe"], "argument --verbose: 'maybe': expected true or false"),
    ("lora", ["--train", "--learning-rate", "nan"],
     "argument --learning-rate: nan: expected a finite number"),
    ("lora", ["--train", "--learning-rate", "inf"], "argument --learning-rate: inf: expected a "
                                                    "finite number"),
    ("lora", ["--train", "--learning-rate", "-0.0001"],
     "argument --learning-rate: -0.0001: expected a number > 0"),
    ("lora", ["--train", "--learning-rate", "0"], "argument --learning-rate: 0: expected a number"),
    ("lora", ["--train", "--min-learning-rate", "1e-3"],
     "--min-learning-rate 0.001: expected at most --learning-rate (1e-05)"),
    ("lora", ["--train", "--min-learning-rate", "-1"], "argument --min-learning-rate: -1"),
    ("lora", ["--train", "--lora-scale", "nan"], "argument --lora-scale: nan: expected a finite"),
    ("lora", ["--train", "--lora-dropout", "1"], "--lora-dropout 1.0: expected a probability"),
    ("lora", ["--train", "--lora-dropout", "nan"], "argument --lora-dropout: nan: expected a"),
    ("lora", ["--train", "--lora-rank", "0"], "argument --lora-rank: 0: expected an integer >= 1"),
    ("lora", ["--train", "--iters", "0"], "argument --iters: 0: expected an integer >= 1"),
    ("lora", ["--train", "--iters", "-1"], "argument --iters: -1: expected an integer >= 1"),
    ("lora", ["--train", "--batch-size", "0"], "argument --batch-size: 0: expected an integer"),
    ("lora", ["--train", "--grad-accumulation-steps", "0"], "argument --grad-accumulation-steps"),
    ("lora", ["--train", "--num-layers", "0"], "--num-layers 0: expected a positive number or -1"),
    ("lora", ["--train", "--max-seq-length", "1"],
     "argument --max-seq-length: 1: expected an integer >= 2"),
    ("lora", ["--train", "--save-every", "-1"], "argument --save-every: -1: expected an integer"),
    ("lora", ["--train", "--seed", "-1"], "argument --seed: -1: expected an integer from 0"),
    ("lora", ["--train", "--steps-per-eval", "0"], "argument --steps-per-eval: 0"),
    ("lora", ["--train", "--steps-per-report", "0"], "argument --steps-per-report: 0"),
    ("lora", ["--train", "--val-batches", "-2"], "argument --val-batches: -2: expected an integer"),
    ("lora", ["--train", "--warmup-steps", "-1"], "argument --warmup-steps: -1"),
    ("lora", ["--train", "--iters", "5", "--warmup-steps", "5"],
     "--warmup-steps 5: expected 0 <= N < --iters (5)"),
    ("lora", ["--test", "--test-batches", "0"], "--test-batches 0: expected N >= 1, or -1 for all"),
    ("lora", ["--train", "--lora-dropout", "0.1", "--grad-checkpoint"],
     "--lora-dropout with --grad-checkpoint"),
    ("lora", [], "nothing to do: pass --train, --test or both"),
    ("fuse", ["--save-path"], "argument --save-path: expected one argument"),
    ("convert", ["--q-bits", "4"], "--q-mode and --quant-predicate need -q"),
    ("convert", ["--q-group-size", "0"], "--q-mode and --quant-predicate need -q"),
    ("convert", ["-q", "--q-mode", "int4"], "argument --q-mode: invalid choice: 'int4'"),
    ("convert", ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
]


@pytest.mark.parametrize("name, flags, message", FLAG_ERRORS,
                         ids=[f"{n}{' '.join(f)}" for n, f, _ in FLAG_ERRORS])
def test_bad_flags_are_one_line_before_any_work(name, flags, message, capsys):
    line, out = error_line(name, BASE[name] + flags, capsys, code=2)
    assert message in line and line.endswith(f"(see {PARSERS[name]().prog} --help)")
    assert out == ""


@pytest.mark.parametrize("name", PARSERS)
def test_help_shows_every_default(name):
    parser = PARSERS[name]()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.required or action.default is False or action.dest == "help":
            continue
        if action.default is None:  # the help says what happens without the flag
            assert "default" in action.help, action.option_strings
        else:
            assert f"(default: {action.default})" in text or "default" in action.help, \
                action.option_strings


def test_q_group_size_help_and_errors_list_the_sizes_of_the_chosen_mode(checkpoint, tmp_path,
                                                                        capsys):
    text = " ".join(convert.parser().format_help().split())
    assert "affine 32|64|128 (default 64), mxfp4 32, nvfp4 16, mxfp8 32" in text
    assert "affine 2|3|4|5|6|8 (default 4), mxfp4 4, nvfp4 4, mxfp8 8" in text
    for mode, size, accepted in (("affine", 16, "32|64|128"), ("mxfp4", 64, "32"),
                                 ("nvfp4", 32, "16"), ("mxfp8", 64, "32")):
        line, _ = error_line("convert", ["--hf-path", checkpoint("mamba2")[0], "--mlx-path",
                                         tmp_path / "out", "-q", "--q-mode", mode,
                                         "--q-group-size", size], capsys)
        assert line == f"error: --q-group-size {size}: --q-mode {mode} takes {accepted}"
    assert files_in(tmp_path) == []
    with pytest.raises(QuantizationError, match="--q-bits 3: --q-mode mxfp4 takes 4"):
        quantization_params(3, None, "mxfp4")
    with pytest.raises(QuantizationError, match="--q-bits 0: --q-mode affine takes 2|3|4|5|6|8"):
        quantization_params(0, None, "affine")  # not the default in disguise
    with pytest.raises(QuantizationError, match="--q-group-size 0: --q-mode nvfp4 takes 16"):
        quantization_params(None, 0, "nvfp4")



def test_a_group_that_no_layer_fits_is_one_error(checkpoint, tmp_path, capsys):
    # The tiny Mamba2's widest input is 64: grouping by 128 would quantize nothing.
    line, out = error_line("convert", ["--hf-path", checkpoint("mamba2")[0], "--mlx-path",
                                       tmp_path / "out", "-q", "--q-group-size", 128], capsys)
    assert line == ("error: --q-group-size 128: no layer's input size is a multiple of it; "
                    "nothing would be quantized")
    assert "stays in full precision" in out  # each layer was reported first
    assert files_in(tmp_path) == []


# ---- generate --------------------------------------------------------------------------------

def test_verbose_takes_mlx_lm_forms(model_dir, capsys):
    for flags, verbose in ((["--verbose"], True), (["--verbose", "True"], True),
                           (["--verbose", "false"], False), ([], False)):
        assert generate_main(["--model", str(model_dir), "--prompt", "hi", "-m", "1",
                                  *flags]) == 0
        assert ("prompt as fed" in capsys.readouterr().err) == verbose, flags


def test_prompt_cache_destination_is_checked_before_generating(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    base = ["--model", model_dir, "--prompt", "hi", "-m", "2", "--save-prompt-cache"]
    for target, message in ((tmp_path / "missing" / "c.safetensors",
                             "c.safetensors: its directory " f"{tmp_path / 'missing'} does not "
                             "exist"),
                            (tmp_path, f"{tmp_path}: is a directory; name the prompt cache file"),
                            (tmp_path / "file" / "c", "its directory " f"{tmp_path / 'file'} is "
                                                      "not a directory")):
        line, out = error_line("generate", base + [target], capsys)
        assert message in line and out == ""  # nothing was generated
    assert files_in(tmp_path) == ["file"]


def test_full_disk_while_saving_a_prompt_cache(model_dir, tmp_path, capsys, monkeypatch):
    disk_full(monkeypatch)
    line, _ = error_line("generate", ["--model", model_dir, "--prompt", "hi", "-m", "2",
                                      "--save-prompt-cache", tmp_path / "c.safetensors"], capsys)
    assert line == f"error: {tmp_path / 'c.safetensors'}: No space left on device"
    assert files_in(tmp_path) == []


def test_prompt_that_is_not_utf8(model_dir, capsys):
    line, _ = error_line("generate", ["--model", model_dir, "--prompt", "caf\udce9"], capsys)
    assert line == "error: --prompt is not UTF-8 text (an undecodable byte at character 3)"
    result = subprocess.run([sys.executable, "-m", "mlx_mamba.generate", "--model", model_dir,
                             "--prompt", "-"], input=b"\xff\xfe h\x00i", capture_output=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr.decode() == ("error: the prompt on stdin is not UTF-8 text (an "
                                      "undecodable byte at character 0)\n")


class NoEosTokenizer:
    def encode(self, text):
        return [ord(c) % 100 for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def test_token_ids_without_a_tokenizer_give_tokens_and_empty_text(loaded):
    model, _ = loaded
    prompts = [[5, 17, 42], [9, 3]]
    expected = [[r.token for r in stream_generate(model, NoEosTokenizer(), p, max_tokens=4)]
                for p in prompts]
    responses = list(stream_generate(model, None, prompts[0], max_tokens=4))
    assert [r.token for r in responses] == expected[0]
    assert [r.text for r in responses] == [""] * 4 and responses[-1].finish_reason == "length"
    assert generate(model, None, prompts[0], max_tokens=4) == ""
    results = batch_generate(model, None, prompts, max_tokens=4)
    assert [r.tokens for r in results] == expected and [r.text for r in results] == ["", ""]


def library_errors():
    return [
        (lambda m, t: generate(m, None, "text"), GenerationError,
         "the prompt is text, and there is no tokenizer to encode it"),
        (lambda m, t: batch_generate(m, t, "hello"), GenerationError,
         "prompts has type str: expected a list of strings or of token-id lists"),
        (lambda m, t: batch_generate(m, None, [[1], "hi"]), GenerationError,
         "prompt 1 is text, and there is no tokenizer"),
        (lambda m, t: batch_generate(m, t, ["hi", [1, 2.5]]), GenerationError,
         "prompt 1: the token at position 1 is a float"),
        (lambda m, t: generate(m, t, None), GenerationError,
         "the prompt: token ids must be a list of ints or a 1-D integer array, not a NoneType"),
        (lambda m, t: generate(m, t, b"hi"), GenerationError, "not a bytes"),
        (lambda m, t: generate(m, t, [1.5]), GenerationError,
         "the prompt: the token at position 0 is a float"),
        (lambda m, t: generate(m, t, [[1, 2]]), GenerationError,
         "the prompt: the token at position 0 is a list"),
        (lambda m, t: generate(m, t, mx.array([[1, 2]])), GenerationError,
         "the prompt: token ids must be a 1-D integer array"),
        (lambda m, t: generate(m, t, "a\udcff"), GenerationError,
         "the prompt is not UTF-8 text (an undecodable byte at character 1)"),
        (lambda m, t: generate(m, t, "hi", prompt_cache="doc.safetensors"), GenerationError,
         "prompt_cache has type str: expected a PromptCache"),
        (lambda m, t: generate(m, t, "hi", prefill_step_size=0), PromptCacheError,
         "prefill step size 0: expected a positive integer"),
        (lambda m, t: batch_generate(m, t, ["hi"], prefill_step_size=1.5), PromptCacheError,
         "prefill step size 1.5"),
        (lambda m, t: generate(m, t, "hi", temp=1.0, seed=-1), SamplerError,
         "seed is -1: expected an integer from 0 to 18446744073709551615"),
        (lambda m, t: generate(m, t, "hi", seed=2**64), SamplerError, "seed is 1844674407370955"),
        (lambda m, t: generate(m, t, "hi", seed="7"), SamplerError, "seed is '7'"),
        (lambda m, t: make_prompt_cache(m, "text"), PromptCacheError,
         "make_prompt_cache takes token ids, not text"),
        (lambda m, t: make_prompt_cache(m, [1, 2], "doc.safetensors"), PromptCacheError,
         "previous has type str: expected a PromptCache"),
        (lambda m, t: make_prompt_cache(m, [1, 2, 3], step_size=-1), PromptCacheError,
         "prefill step size -1"),
    ]


@pytest.mark.parametrize("call, error, message", library_errors(),
                         ids=[m for _, _, m in library_errors()])
def test_bad_arguments_of_the_generation_functions(loaded, call, error, message):
    model, tokenizer = loaded
    with pytest.raises(error) as info:
        call(model, tokenizer)
    assert message in str(info.value)


def test_save_prompt_cache_checks_its_file_and_keeps_its_name(loaded, tmp_path):
    model, _ = loaded
    cache = make_prompt_cache(model, [1, 2, 3])
    with pytest.raises(PromptCacheError, match="its directory .* does not exist"):
        save_prompt_cache(tmp_path / "missing" / "c.safetensors", cache, model)
    with pytest.raises(PromptCacheError, match="is a directory"):
        save_prompt_cache(tmp_path, cache, model)
    assert files_in(tmp_path) == []  # no .partial file either
    save_prompt_cache(tmp_path / "doc.cache", cache, model)
    assert files_in(tmp_path) == ["doc.cache"]
    assert load_prompt_cache(tmp_path / "doc.cache", model).tokens == [1, 2, 3]


# ---- lora ------------------------------------------------------------------------------------

def bad_data(directory, content):
    directory.mkdir()
    (directory / "train.jsonl").write_bytes(content)
    (directory / "valid.jsonl").write_text('{"text": "a line of valid text"}\n')
    return directory


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "train.jsonl:1: not UTF-8 text (byte 1 of"),
    ('{"text": "fine"}\n'.encode("utf-16"), "train.jsonl:1: not UTF-8 text (byte 1 of the line)"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "train.jsonl:2: not UTF-8 text (byte 14"),
    (b"[" * 100000 + b"\n", "train.jsonl:1: JSON nested too deeply"),
    (b'{"text": "fine"}\n{"text": 5}\n', 'train.jsonl:2: expected an object with "text"'),
], ids=["binary", "utf-16", "latin-1", "nested", "wrong-type"])
def test_unreadable_training_data_names_file_and_line(model_dir, tmp_path, capsys, content,
                                                      message):
    data = bad_data(tmp_path / "data", content)
    line, _ = error_line("lora", ["--model", model_dir, "--train", "--data", data,
                                  "--adapter-path", tmp_path / "adapters"], capsys)
    assert message in line
    assert not (tmp_path / "adapters").exists()


def test_data_with_a_byte_order_mark_loads(loaded, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a line of text"}\n', encoding="utf-8-sig")
    assert len(load_split(tmp_path, "train", loaded[1], 64)) == 1


def test_adapter_path_that_cannot_be_a_directory_fails_before_training(model_dir, data_dir,
                                                                       tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "adapters"):
        line, out = error_line("lora", ["--model", model_dir, "--train", "--data", data_dir,
                                        "--adapter-path", path], capsys)
        assert line.startswith(f"error: {path}: ") and str(tmp_path / "file") in line
        assert line.endswith("is a file, not a directory")
        assert "Training" not in out and "Loading datasets" not in out


def test_num_layers_beyond_the_model_fails_before_loading_data(model_dir, data_dir, tmp_path,
                                                              capsys):
    line, out = error_line("lora", ["--model", model_dir, "--train", "--data", data_dir,
                                    "--num-layers", 3, "--adapter-path", tmp_path / "a"], capsys)
    assert line == "error: num_layers 3: the model has 2 layers (use -1 for all)"
    assert "Loading datasets" not in out


def test_diverging_training_stops_and_saves_nothing(model_dir, data_dir, tmp_path, capsys):
    line, out = error_line("lora", ["--model", model_dir, "--train", "--data", data_dir,
                                    "--optimizer", "sgd", "--learning-rate", "1e30",
                                    "--iters", 5, "--save-every", 0, "--val-batches", 0,
                                    "--adapter-path", tmp_path / "adapters"], capsys)
    assert "the training loss is" in line and "training diverged" in line
    assert not (tmp_path / "adapters").exists()


def test_full_disk_while_saving_adapters(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    disk_full(monkeypatch)
    adapters = tmp_path / "adapters"
    line, _ = error_line("lora", ["--model", model_dir, "--train", "--data", data_dir,
                                  "--iters", 1, "--val-batches", 0, "--adapter-path", adapters],
                         capsys)
    assert line == f"error: {adapters / 'adapters.safetensors'}: No space left on device"
    assert files_in(adapters) == ["adapter_config.json"]  # no half-written weights


def test_batches_need_examples_and_a_positive_size():
    with pytest.raises(DataError, match="no examples to make batches of"):
        next(iterate_batches([], 4))  # used to loop for ever
    with pytest.raises(DataError, match="batch size 0: expected a positive integer"):
        next(iterate_batches([object()], 0))


def test_data_directory_must_exist(loaded, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: does not exist"):
        load_split(tmp_path / "nowhere", "train", loaded[1], 64)


@pytest.mark.parametrize("learning_rate, minimum, message", [
    (float("nan"), 0.0, "learning rate nan"), (-1e-3, 0.0, "learning rate -0.001"),
    (0.0, 0.0, "learning rate 0.0"), (1e-3, 0.1, "minimum learning rate 0.1"),
    (1e-3, float("inf"), "minimum learning rate inf")])
def test_schedules_refuse_learning_rates_that_cannot_train(learning_rate, minimum, message):
    with pytest.raises(ValueError, match=message):
        make_schedule("cosine", learning_rate, 10, min_learning_rate=minimum)


def test_train_stops_when_the_loss_is_no_longer_finite(model_dir, data_dir):
    model, tokenizer = mlx_mamba.load(model_dir)
    apply_adapters(model, {"num_layers": -1})
    examples = load_split(data_dir, "train", tokenizer, 64)
    with pytest.raises(TrainingError, match="the training loss is nan at iteration 2"):
        train(model, optim.SGD(learning_rate=float("inf")), iterate_batches(examples, 2),
              iters=3, log=lambda *a, **k: None)


# ---- adapter configs (fuse, lora --test, apply_adapters) -------------------------------------

ADAPTER_CONFIG_ERRORS = [
    ({"num_layers": "2"}, "num_layers '2': expected a positive integer, or -1 for all"),
    ({"num_layers": 2.0}, "num_layers 2.0: expected a positive integer"),
    ({"num_layers": True}, "num_layers True: expected a positive integer"),
    ({"num_layers": 0}, "num_layers 0: expected a positive integer"),
    ({"fine_tune_type": ["lora"]}, "fine_tune_type ['lora']: expected lora, dora or full"),
    ({"train_ssm_params": "no"}, "train_ssm_params 'no': expected true or false"),
    ({"lora_parameters": []}, "lora_parameters []: expected an object"),
    ({"lora_parameters": {"rank": "8"}}, "lora_parameters.rank '8': expected a positive integer"),
    ({"lora_parameters": {"scale": None}}, "lora_parameters.scale None: expected a finite number"),
    ({"lora_parameters": {"scale": "20"}}, "lora_parameters.scale '20'"),
    ({"lora_parameters": {"dropout": "0"}}, "lora_parameters.dropout '0': expected a probability"),
    ({"lora_parameters": {"keys": "in_proj"}},
     "lora_parameters.keys 'in_proj': expected a list of projection names"),
    ({"lora_parameters": {"keys": ["conv1d"]}},
     "LoRA key 'conv1d': no adapted layer has such a linear projection (they have in_proj, "
     "out_proj)"),
]


@pytest.mark.parametrize("change, message", ADAPTER_CONFIG_ERRORS,
                         ids=[m.split(":")[0] for _, m in ADAPTER_CONFIG_ERRORS])
def test_fuse_names_the_wrong_field_of_adapter_config(model_dir, adapters, tmp_path, capsys,
                                                      change, message):
    broken = tmp_path / "adapters"
    broken.mkdir()
    (broken / "adapters.safetensors").write_bytes((adapters / "adapters.safetensors").read_bytes())
    config = json.loads((adapters / "adapter_config.json").read_text())
    for key, value in change.items():
        if key == "lora_parameters" and isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (broken / "adapter_config.json").write_text(json.dumps(config))
    line, _ = error_line("fuse", ["--model", model_dir, "--adapter-path", broken,
                                  "--save-path", tmp_path / "fused"], capsys)
    assert message in line
    if "has no projection" not in message:  # type errors name the file they are in
        assert f"{broken / 'adapter_config.json'}: " in line
    assert not (tmp_path / "fused").exists()


def test_apply_adapters_checks_its_config(model_dir):
    model = mlx_mamba.load(model_dir)[0]
    with pytest.raises(AdapterError, match="the adapter config is a list: expected an object"):
        apply_adapters(model, [("num_layers", 2)])
    with pytest.raises(AdapterError, match="num_layers 3: the model has 2 layers"):
        apply_adapters(model, {"num_layers": 3})
    apply_adapters(model, {})  # the default number of layers fits a 2-layer model


def test_fuse_onto_an_existing_folder_fails_before_loading(model_dir, adapters, tmp_path, capsys):
    (tmp_path / "fused").mkdir()
    (tmp_path / "file").write_text("")
    for save_path, message in ((tmp_path / "fused", f"{tmp_path / 'fused'}: already exists; "
                                                    "choose another --save-path"),
                               (tmp_path / "file" / "fused",
                                f"{tmp_path / 'file'} is a file, not a directory")):
        line, out = error_line("fuse", ["--model", model_dir, "--adapter-path", adapters,
                                        "--save-path", save_path], capsys)
        assert message in line and "Loading" not in out
    assert files_in(tmp_path) == ["file", "fused"] and files_in(tmp_path / "fused") == []


def test_full_disk_during_fuse_and_convert_leaves_nothing(model_dir, adapters, checkpoint,
                                                          tmp_path, capsys, monkeypatch):
    disk_full(monkeypatch)
    out = tmp_path / "new" / "fused"
    line, _ = error_line("fuse", ["--model", model_dir, "--adapter-path", adapters,
                                  "--save-path", out], capsys)
    assert line == (f"error: {out / 'model.safetensors'}: No space left on device; nothing was "
                    "left behind")
    line, _ = error_line("convert", ["--hf-path", checkpoint("mamba1")[0], "--mlx-path", out],
                         capsys)
    assert line == (f"error: {out / 'model.safetensors'}: No space left on device; nothing was "
                    "left behind")
    assert files_in(tmp_path) == []  # neither the output, its staging nor the parents made


# ---- convert ---------------------------------------------------------------------------------

def test_convert_checks_the_upload_repo_and_the_output_path_first(checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    source = checkpoint("mamba2")[0]
    for flags, message in (
            (["--mlx-path", tmp_path / "out", "--upload-repo", "not a repo"],
             "--upload-repo 'not a repo': not a repo id"),
            (["--mlx-path", tmp_path / "file" / "out"],
             f"{tmp_path / 'file'} is a file, not a directory")):
        line, out = error_line("convert", ["--hf-path", source, *flags], capsys)
        assert message in line and out == ""
    assert files_in(tmp_path) == ["file"]


# ---- transformers without PyTorch ------------------------------------------------------------

def test_no_pytorch_banner_but_other_warnings_stay(tmp_path):
    # Without the variables that silence transformers (mlx_lm, imported by other tests, sets one).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}

    def run(code):
        # torch made unimportable (and invisible to importlib.util.find_spec)
        return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                               + code], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=120)

    plain = run("import transformers")
    assert "PyTorch was not found" in plain.stderr, plain.stderr  # the banner exists
    result = run("import mlx_mamba, transformers; from transformers import AutoTokenizer; "
                 "transformers.logging.get_logger('transformers').warning('still shown')")
    assert result.returncode == 0, result.stderr
    assert "PyTorch was not found" not in result.stderr and "still shown" in result.stderr
