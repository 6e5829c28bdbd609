"""Tensor parallel inference: two processes started by `mlx.launch --backend ring` on the loopback
interface give the logits of one process (within 1e-5, relative) and its greedy tokens, for every
family, with `model.shard` and with `sharded_load`; each rank holds its shard of the weights. One
launch runs every family (each launch costs seconds of start-up)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mlx_mamba
from mlx_mamba.generate import main as generate_main
from mlx_mamba.config import ModelConfig
from mlx_mamba.convert import convert
from mlx_mamba.models.sharding import ShardingError, balanced_ranges
from test_distributed import free_ports, launcher
from test_mamba3_model import SSM_CFGS, random_weights
from tuning import model_with_tokenizer, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FLAVOURS = ["mamba1", "falcon_mamba", "mamba2", "mamba2_groups_untied", "bamba",
            "granite_dense", "granite_moe", "granite_rope", "nemotron_h", "falcon_h1",
            "falcon_h1_no_norm", "zamba2", "zamba2_plain", "jamba"]
QUANTIZED = ["mamba1", "mamba2", "mamba3_mimo"]  # 8 bits, groups of 32: every split fits


def launch(script_args, processes=2, timeout=600):
    command = [launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(processes),
               "--starting-port", str(free_ports(processes)), "--", sys.executable,
               *map(str, script_args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_mamba3(flavour, directory):
    """A state-spaces original Mamba-3 checkpoint (tests/test_mamba3_model.py's configs)."""
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 100,
              "ssm_cfg": SSM_CFGS[flavour], "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    weights = random_weights(mlx_mamba.Model(ModelConfig.from_dict(config)), seed=3)
    torch.save({k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()},
               directory / "pytorch_model.bin")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(checkpoint, tmp_path_factory):
    """name -> directory of every family, Mamba-3 SISO and MIMO, and quantized ones."""
    root = tmp_path_factory.mktemp("sharding")
    paths = {name: checkpoint(name)[0] for name in FLAVOURS}
    for flavour in SSM_CFGS:
        paths[f"mamba3_{flavour}"] = write_mamba3(flavour, root / f"mamba3_{flavour}")
    for name in QUANTIZED:
        paths[f"{name}_q8"] = convert(paths[name], root / f"{name}_q8", quantize=True,
                                      q_bits=8, q_group_size=32)
    return paths


def run_worker(checkpoints, names, processes, *flags):
    """The worker's results over `processes` processes: {name: {...}}."""
    result = launch([ROOT / "tests" / "sharded_worker.py", *flags,
                     *(f"{name}={checkpoints[name]}" for name in names)], processes)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout  # rank 0 alone reports
    report = json.loads(lines[0])
    assert report["world"] == processes
    return report["results"]


@pytest.fixture(scope="module")
def sharded(checkpoints):
    return run_worker(checkpoints, list(checkpoints), 2, "--batches")


# Four processes where the tiny sizes allow it (every head, group and hidden count divides by 4
# or 4 by it, at least 4 layers): a B/C group and a KV head then serve two ranks each.
FOUR = ["bamba", "granite_moe", "jamba", "zamba2"]


def test_four_processes_give_one_process_logits_and_tokens(checkpoints):
    results = run_worker(checkpoints, FOUR, 4)
    for name in FOUR:
        for way in ("shard", "sharded_load", "pipeline"):
            outcome = results[name][way]
            print(f"{name} {way} over 4: whole {outcome['whole']:.1e}, "
                  f"prefill + steps {outcome['stepped']:.1e}")
            assert outcome["whole"] <= 1e-5 and outcome["stepped"] <= 1e-5
            assert outcome["tokens_equal"]


# Their B/C groups (n_groups 1) are read by both ranks' heads, and Mamba-3's rotation angles by
# every head; elsewhere the world size divides every count of groups and KV heads.
READ_TWICE = {"mamba2", "zamba2_plain", "mamba3_mimo", "mamba3_siso"}
NAMES = FLAVOURS + [f"mamba3_{f}" for f in SSM_CFGS] + [f"{n}_q8" for n in QUANTIZED]


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_give_one_process_logits_and_tokens(sharded, name):
    result = sharded[name]
    for way in ("shard", "sharded_load", "pipeline"):
        print(f"{name} {way}: whole {result[way]['whole']:.1e}, "
              f"prefill + steps {result[way]['stepped']:.1e}")
        assert result[way]["whole"] <= 1e-5 and result[way]["stepped"] <= 1e-5
        assert result[way]["tokens_equal"]
    assert result["ranks_agree"] == 0.0
    for way, batches in result["batches"].items():  # batch_generate, left-padded and sampled
        assert batches == {"batch_equals_alone": True, "batch_equals_one_process": True}, way
    half = result["pipeline_bfloat16"]
    assert half["dtype"] == "mlx.core.bfloat16" and half["error"] <= 1e-5, half
    assert result["same_weights"]  # sharded_load reads what shard keeps, bit for bit


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_its_shard(sharded, name):
    """Held bytes: the rank's slices of the split tensors plus the whole replicated ones, at most
    1/N of the split tensors plus the replicated ones, except for the rows that several ranks
    read (B/C of a group, a KV head) when the world size is a multiple of their count."""
    b = sharded[name]["bytes"]
    bound = b["sharded"] / 2 + b["replicated"]
    print(f"{name}: held {b['held']} bytes of {b['full']}; 1/N of the split tensors + the "
          f"replicated ones: {bound:.0f}")
    print(f"    bytes of rows that both ranks hold: {b['read_twice']}")
    assert b["held"] == b["shard"] < b["full"]
    assert b["held"] == bound + b["read_twice"] / 2  # the ranks hold equal amounts
    # Only rows read by both ranks' heads (a B/C group, a KV head, angles) are held twice.
    assert (b["read_twice"] > 0) == (name.split("_q8")[0] in READ_TWICE)
    pipeline = sharded[name]["pipeline_bytes"]
    print(f"    pipeline: held {pipeline} bytes")
    assert pipeline < b["full"]


def test_experts_and_shared_expert_share_one_all_sum():
    """The routed experts' and the shared expert's partial sums go through one all_sum, and the
    biases every rank adds (latent_out, the shared expert's down_proj) are counted once."""
    result = launch([ROOT / "tests" / "moe_worker.py"])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["world"] == 2 and report["all_sums"] == 1
    assert report["error"] < 1e-5


@pytest.mark.parametrize("sizes, parts, bounds", [
    ([1, 1, 1, 1], 2, [0, 2, 4]),
    ([1, 1, 10, 1, 1, 1, 1, 1, 1, 1, 1], 2, [0, 3, 11]),  # bytes, not layer counts
    ([5, 1, 1, 1, 1, 1], 3, [0, 1, 3, 6]),
    ([1, 1, 100], 3, [0, 1, 2, 3]),  # never an empty range
])
def test_pipeline_ranges_balance_bytes(sizes, parts, bounds):
    assert balanced_ranges(sizes, parts, "layers") == bounds


def test_fewer_layers_than_ranks_is_an_error():
    with pytest.raises(ShardingError, match="layers is 2, fewer than the world size 3"):
        balanced_ranges([1, 1], 3, "layers")


@pytest.mark.parametrize("how", [[], ["--pipeline"]])
def test_generate_command_shards_under_mlx_launch(checkpoint, tmp_path, capsys, how):
    model = model_with_tokenizer(checkpoint("jamba")[0], tmp_path / "jamba")
    args = ["--model", model, "--prompt", "To be, or not", "--max-tokens", 12, "--temp", 0.8,
            "--seed", 5]
    result = launch(["-m", "mlx_mamba.generate", *args, *how])
    assert result.returncode == 0, result.stdout + result.stderr
    assert generate_main(list(map(str, args))) == 0
    alone = capsys.readouterr().out
    assert alone.strip() and result.stdout == alone  # rank 0 alone prints, the same text
    assert result.stderr.count("Generation: 12 tokens") == 1


@pytest.mark.parametrize("flavour, processes, quantized, message", [
    ("mamba1", 3, False, "Mamba1 channels (d_inner) is 64, which the world size 3 does not "
                         "divide"),
    ("jamba", 2, True, "attention o_proj: its 32 inputs over the world size 2 leave 16 per rank, "
                       "not a multiple of the quantization group size 32"),
])
def test_a_world_size_that_does_not_fit_fails_every_process_at_once(
        checkpoint, tmp_path, flavour, processes, quantized, message):
    model = model_with_tokenizer(checkpoint(flavour)[0], tmp_path / flavour)
    if quantized:
        model = convert(model, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    # Weights that cannot be read: the error must come before any weight is read.
    for file in Path(model).glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[:64])
    start = time.perf_counter()
    result = launch(["-m", "mlx_mamba.generate", "--model", model, "--prompt", "Hi"], processes,
                    timeout=120)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    print(f"{processes} processes failed in {seconds:.1f} s:\n{output}")
    assert [line for line in output.splitlines() if "error" in line] == [f"error: {message}"]
    assert "Traceback" not in output
    # mlx.launch itself exits 0 here; it reports each process's exit code.
    codes = re.findall(r"Node with rank (\d+) exited with code (-?\d+)", output)
    assert sorted(int(rank) for rank, _ in codes) == list(range(processes))
    assert all(int(code) != 0 for _, code in codes)


@pytest.mark.parametrize("how", [[], ["--pipeline"]])
def test_generate_command_saves_and_continues_a_sharded_prompt_cache(checkpoint, tmp_path, capsys,
                                                                     how):
    """Each process saves its part of the state (Jamba's: Mamba states and KV caches) and reads
    it back; the continued, sampled text equals one process's doing the same."""
    model = model_with_tokenizer(checkpoint("jamba")[0], tmp_path / "jamba")
    texts = {}
    for where in ("two", "one"):
        (tmp_path / where).mkdir()
        cache = tmp_path / where / "cache.safetensors"
        save = ["--model", model, "--prompt", "To be, or not", "--max-tokens", 4,
                "--save-prompt-cache", cache]
        resume = ["--model", model, "--prompt", " to be", "--max-tokens", 12, "--temp", 0.8,
                  "--seed", 5, "--prompt-cache-file", cache]
        if where == "two":
            outputs = [launch(["-m", "mlx_mamba.generate", *args, *how]) for args in (save, resume)]
            for result in outputs:
                assert result.returncode == 0, result.stdout + result.stderr
            texts[where] = [result.stdout for result in outputs]
        else:
            texts[where] = []
            for args in (save, resume):
                assert generate_main(list(map(str, args))) == 0
                texts[where].append(capsys.readouterr().out)
    assert all(text.strip() for text in texts["one"]) and texts["two"] == texts["one"]
    assert sorted(f.name for f in (tmp_path / "two").iterdir()) == \
        ["cache.rank0-of-2.safetensors", "cache.rank1-of-2.safetensors"]
    # A part is not the whole state: one process refuses it.
    part = tmp_path / "two" / "cache.rank0-of-2.safetensors"
    assert generate_main(["--model", str(model), "--prompt", "x", "--prompt-cache-file",
                          str(part)]) == 1
    kind = "pipeline" if how else "tensor"
    assert f"holds the state of rank 0 of 2, {kind} parallel, not of this process's model " \
           "(whole)" in capsys.readouterr().err


def test_pipeline_ranks_download_only_the_files_of_their_layers(checkpoint, tmp_path):
    """A hub repo in several files: each rank fetches the config, the tokenizer and the index
    first, then only the files that hold its tensors (huggingface_hub answered locally)."""
    _, transformers_model = checkpoint("jamba")
    repo = tmp_path / "repo"
    transformers_model.save_pretrained(repo, max_shard_size="20KB")
    write_tokenizer(repo)
    index = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    tied = json.loads((repo / "config.json").read_text()).get("tie_word_embeddings", False)
    result = launch([ROOT / "tests" / "pipeline_hub_worker.py", repo])
    assert result.returncode == 0, result.stdout + result.stderr
    reports = sorted((json.loads(line) for line in result.stdout.splitlines()
                      if line.startswith("{")), key=lambda report: report["rank"])
    assert [report["rank"] for report in reports] == [0, 1]
    for report in reports:
        start, stop = report["layers"]
        print(f"rank {report['rank']}: layers {start}-{stop - 1}, error {report['error']:.1e}, "
              f"fetched {report['calls']}")
        assert report["error"] <= 1e-5
        first, weights = report["calls"]
        assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(first)
        assert not [name for name in first if name.endswith(".safetensors")]

        def held(name):  # by layer number, independently of the loader's renaming
            layer = re.search(r"\blayers\.(\d+)\.", name)
            if layer:
                return start <= int(layer.group(1)) < stop
            return "embed_tokens" not in name or start == 0 or tied

        wanted = {file for name, file in index.items() if held(name)}
        assert set(weights) == wanted and wanted < set(index.values())
