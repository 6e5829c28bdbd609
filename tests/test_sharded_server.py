"""The server sharded over two processes (`mlx.launch --backend ring` on the loopback interface),
tensor and pipeline parallel, on a tiny Nemotron-H hybrid (its KV caches are sharded and cached
too), spoken to with the official `openai` client: the texts equal one process's token for
token (greedy, seeded, concurrent requests of different lengths, n choices), the next turn of a
conversation comes from the prefix cache; Ctrl-C on rank 0, or a process that dies, stops every
process, and a bad setting stops every process with one error line."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_mamba
from server_fixtures import write_tokenizer
from test_distributed import free_ports, launcher
from test_server import START_SECONDS, chat, complete, complete_together, rendered

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--max-batch-size", "3", "--prefill-step-size", "16", "--log-level", "warning"]


class ShardedServer:
    """`python -m mlx_mamba.server` under mlx.launch on two local processes; rank 0's output
    goes to a log file (mlx.launch relays it)."""

    def __init__(self, model_dir, flags, log):
        self.log = Path(log)
        command = [launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
                   "--starting-port", str(free_ports(2)), "--", sys.executable, "-m",
                   "mlx_mamba.server", "--model", str(model_dir), "--port", "0", *flags]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(log, "w") as out:
            self.launch = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
        deadline = time.monotonic() + START_SECONDS
        while not re.search(r"at http://127\.0\.0\.1:(\d+)", self.output()):
            if self.launch.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the sharded server did not start:\n{self.output()}")
            time.sleep(0.2)
        self.port = int(re.search(r"at http://127\.0\.0\.1:(\d+)", self.output()).group(1))
        self.ranks = ranks(self.launch.pid)
        assert sorted(self.ranks) == [0, 1]

    def output(self):
        return self.log.read_text()

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none",
                             max_retries=0, timeout=120)

    def kill(self):
        for pid in ranks(self.launch.pid).values():
            os.kill(pid, signal.SIGKILL)
        self.launch.kill()
        self.launch.wait()


def ranks(parent):
    """rank -> pid of the processes that mlx.launch (pid `parent`) started (Linux's /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and \
                    int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                environ = (entry / "environ").read_bytes().split(b"\0")
                rank = [v for v in environ if v.startswith(b"MLX_RANK=")]
                if rank:
                    found[int(rank[0].split(b"=")[1])] = int(entry.name)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return found


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("served-sharded")
    for file in checkpoint("nemotron_h")[0].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def one_process(model_dir):
    return mlx_mamba.load(model_dir)


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def server(request, model_dir, tmp_path_factory):
    flags = FLAGS + (["--pipeline"] if request.param == "pipeline" else [])
    started = ShardedServer(model_dir, flags, tmp_path_factory.mktemp("log") / "log")
    assert f"{request.param} parallel over 2 processes" in started.output()
    yield started
    if started.launch.poll() is None:
        started.kill()


def expected(one_process, prompt, max_tokens, **settings):
    model, tokenizer = one_process
    return mlx_mamba.generate(model, tokenizer, prompt, max_tokens=max_tokens, **settings)


def test_greedy_completion_and_chat_equal_one_process(server, one_process):
    client = server.client()
    for prompt in ("Hello there, how are you?", [5, 17, 42, 8, 99, 3]):
        reply = complete(client, prompt, 20, temperature=0)
        assert reply.choices[0].text == expected(one_process, prompt, 20)
    messages = [{"role": "user", "content": "Tell me a story."}]
    reply = chat(client, messages, 20, temperature=0)
    assert reply.choices[0].message.content == \
        expected(one_process, rendered(one_process[1], messages), 20)


def test_sampling_with_a_seed_equals_one_process(server, one_process):
    client = server.client()
    reply = complete(client, "Once upon a time", 16, temperature=0.9, top_k=40, seed=7)
    assert reply.choices[0].text == expected(one_process, "Once upon a time", 16, temp=0.9,
                                             top_k=40, seed=7)
    # Unseeded: rank 0 draws the seed. The state after the sampled tokens is then cached on
    # every rank, and a prompt that continues the text resumes from it (a rank that drew other
    # tokens would not hold that state, and would stop with an error).
    prompt = "In a land far away"
    text = "".join(c.choices[0].text for c in complete(client, prompt, 16, temperature=1.5,
                                                       ignore_eos=True, stream=True))
    reply = complete(client, prompt + text, 8, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens > len(one_process[1].encode(prompt))
    assert reply.choices[0].text == expected(one_process, prompt + text, 8)


def test_concurrent_requests_get_the_texts_they_get_alone(server, one_process):
    # Four requests for three batch places: one waits, then joins while the others decode.
    client = server.client()
    requests = [("Hi", 24, dict(temperature=0)),
                ("A much longer prompt, which takes more prefill than the others.", 12,
                 dict(temperature=0.8, seed=11)),
                ("Middle-sized prompt here", 18, dict(temperature=0, repetition_penalty=1.4)),
                ([7, 9, 11], 8, dict(temperature=0.7, top_p=0.9, seed=3))]
    texts, settings = complete_together(client, requests)
    for (prompt, max_tokens, _), text, setting in zip(requests, texts, settings):
        assert text == expected(one_process, prompt, max_tokens, **setting)


def test_the_next_turn_comes_from_the_prefix_cache(server, one_process):
    client = server.client()
    messages = [{"role": "user", "content": "Good morning! What is new today?"}]
    first = chat(client, messages, 12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Tell me more."}]
    second = chat(client, messages, 12, temperature=0)
    # Everything up to the end of the first reply came from the cache: only the new turn's
    # tokens were prefilled.
    assert second.usage.prompt_tokens_details.cached_tokens >= \
        first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.choices[0].message.content == \
        expected(one_process, rendered(one_process[1], messages), 12)


def test_n_choices_each_equal_one_process(server, one_process):
    reply = complete(server.client(), "The sea", 10, temperature=0.8, seed=21, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:  # choice i draws from seed + i
        assert choice.text == expected(one_process, "The sea", 10, temp=0.8,
                                       seed=21 + choice.index)


def test_ctrl_c_on_rank_0_or_a_dead_process_stops_every_process(server):
    """Tensor: Ctrl-C (SIGINT) on rank 0, which stops the others (they ignore SIGINT) and exits
    cleanly. Pipeline: rank 1 killed; mlx.launch stops rank 0 (SIGTERM), which exits at most
    STOP_SECONDS later (a message to a dead process may never complete)."""
    if "--pipeline" not in server.launch.args:
        os.kill(server.ranks[0], signal.SIGINT)
        assert server.launch.wait(60) == 0, server.output()
        assert "exited with code" not in server.output()
    else:
        os.kill(server.ranks[1], signal.SIGKILL)
        server.launch.wait(60)
        assert "Node with rank 1 exited with code -9" in server.output()
        # Rank 0 was told to stop (SIGTERM); it may or may not notice that rank 1 is gone.
        errors = [line for line in server.output().splitlines() if line.startswith("error")]
        assert all(line.startswith("error: another process stopped") for line in errors)
    assert not any(Path(f"/proc/{pid}").exists() for pid in server.ranks.values())
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("flags, message", [
    (["--prompt-cache-dir", "states"], "error: --prompt-cache-dir keeps the states of one "
                                       "process: a model sharded over several keeps them in "
                                       "memory only"),
    (["--port", "TAKEN"], "error: cannot listen on 127.0.0.1:"),
])
def test_a_bad_setting_stops_every_process_with_one_error(model_dir, flags, message):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    flags = [str(taken.getsockname()[1]) if flag == "TAKEN" else flag for flag in flags]
    command = [launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
               "--starting-port", str(free_ports(2)), "--", sys.executable, "-m",
               "mlx_mamba.server", "--model", str(model_dir), *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                                timeout=START_SECONDS)
    finally:
        taken.close()
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(message), output
    # mlx.launch itself exits 0 here; it reports each process's exit code.
    codes = re.findall(r"Node with rank (\d+) exited with code (-?\d+)", output)
    assert sorted(int(rank) for rank, _ in codes) == [0, 1] and "Traceback" not in output
