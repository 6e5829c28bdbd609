"""Data-parallel fine-tuning: two processes started by `mlx.launch` on the loopback interface end
with the same weights as one process that trains on the whole batch."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from comparing import assert_close
from mlx_mamba import lora
from tuning import model_with_tokenizer, write_data

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count=2):
    """A port p with p + 1, ..., p + count - 1 also free on 127.0.0.1: the ring backend listens
    on one per rank."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, s in enumerate(sockets):
                s.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    pytest.fail(f"no {count} consecutive free ports on 127.0.0.1")


def launcher():
    """mlx.launch, installed next to the interpreter that has mlx, which may not be on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.is_file() else shutil.which("mlx.launch")
    assert found, "mlx.launch (installed with mlx) not found"
    return found


def test_two_processes_equal_one_process_with_the_whole_batch(checkpoint, tmp_path, capsys):
    model = model_with_tokenizer(checkpoint("mamba1")[0], tmp_path / "model")
    data = write_data(tmp_path / "data", train=16, valid=4, test=4, kind="prompt_completion")
    args = ["--model", model, "--train", "--data", data, "--iters", 3, "--batch-size", 4,
            "--grad-accumulation-steps", 2, "--learning-rate", 0.05, "--optimizer", "sgd",
            "--train-ssm-params", "--steps-per-eval", 3, "--val-batches", -1, "--seed", 3]

    command = [launcher(), "--hosts", "127.0.0.1", "-n", "2", "--starting-port",
               str(free_ports()), "--", sys.executable, "-m", "mlx_mamba.lora",
               *map(str, args), "--adapter-path", str(tmp_path / "two")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Data-parallel training on 2 processes" in result.stdout
    assert result.stdout.count("Iter 3: Val loss") == 1  # rank 0 alone reports

    assert lora.main([*map(str, args), "--adapter-path", str(tmp_path / "one")]) == 0
    single = capsys.readouterr().out

    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    one = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    assert sorted(two) == sorted(one)
    assert all(np.abs(np.array(v)).max() > 0 for k, v in one.items() if k.endswith("lora_b"))
    differences = assert_close(two, one, 1e-5, floor=1e-3)
    worst = max(differences, key=differences.get)  # every difference is finite and within 1e-5 here
    print(f"2 processes vs 1: worst relative difference {differences[worst]:.1e} ({worst})")
    val = [line for line in single.splitlines() if "Iter 3: Val loss" in line]
    assert val and val[0].split(",")[0] in result.stdout
