"""The server, run as `python -m mlx_mamba.server` on tiny checkpoints (pure Mamba2 and the
Nemotron-H hybrid, whose KV caches join the cached states) and spoken to with the official
`openai` client and with raw HTTP: greedy text equals `generate`, streamed equals whole, the
turns of a conversation come from the prompt cache (also after a restart) with the text of a
cold run, concurrent requests get the texts they get alone, and every bad request is a 4xx with
a JSON error body while the server keeps serving."""

import concurrent.futures
import functools
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

import mlx_mamba
from server_fixtures import write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-4f1c"
FLAVOURS = {"mamba": "mamba2_groups_untied", "hybrid": "nemotron_h"}
# Small limits so that the tests reach them; a prefill step of 16 makes every conversation
# cross chunk boundaries, where states are kept too.
FLAGS = {
    "mamba": ["--max-batch-size", "3", "--max-queue", "1", "--max-tokens", "100000",
              "--prefill-step-size", "16"],
    "hybrid": ["--api-key", API_KEY, "--max-batch-size", "3", "--max-prompt-tokens", "200",
               "--max-body-bytes", "4096", "--prefill-step-size", "16"],
}
START_SECONDS = 180  # loading takes a few seconds; CI machines can be slow
REQUEST_SECONDS = 120


class Server:
    """A server subprocess on a free port of 127.0.0.1; its output goes to a log file."""

    def __init__(self, model_dir, flags, log):
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlx_mamba.server", "--model", str(model_dir),
                 "--port", "0", "--log-level", "warning", *flags],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.port = self._wait_for_port()

    def _wait_for_port(self):
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            match = re.search(r"at http://127\.0\.0\.1:(\d+)", self.output())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                pytest.fail(f"the server exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not start in {START_SECONDS} s:\n{self.output()}")

    def output(self):
        return Path(self.log).read_text()

    def stop(self):
        """SIGTERM; the exit status (0: a clean shutdown)."""
        self.process.terminate()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)

    def client(self, api_key=API_KEY):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key,
                             max_retries=0, timeout=REQUEST_SECONDS)

    def raw(self, method, path, body=None, headers=None):
        """(status, parsed JSON body) of a raw HTTP request; body: bytes or a JSON-able value."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_SECONDS)
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        status, data = response.status, response.read()
        connection.close()
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def active_requests(self):
        return self.raw("GET", "/health", headers=auth())[1]["active_requests"]

    def wait_idle(self, seconds=30):
        deadline = time.monotonic() + seconds
        while self.active_requests() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.active_requests() == 0


def auth(key=API_KEY):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    """flavour -> a copy of its tiny checkpoint with a tokenizer (ids < 100, a chat template)."""
    @functools.cache
    def make(flavour):
        directory = tmp_path_factory.mktemp(f"served-{flavour}")
        shutil.copytree(checkpoint(flavour)[0], directory, dirs_exist_ok=True)
        write_tokenizer(directory)
        return directory

    return make


@pytest.fixture(scope="module")
def loaded(model_dir):
    """kind -> (model, tokenizer), in this process: what the server's text must equal."""
    return {kind: mlx_mamba.load(model_dir(flavour)) for kind, flavour in FLAVOURS.items()}


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    started = {}

    def get(kind):
        if kind not in started:
            logs = tmp_path_factory.mktemp(f"server-{kind}")
            started[kind] = Server(model_dir(FLAVOURS[kind]), FLAGS[kind], logs / "log")
        return started[kind]

    yield get
    for server in started.values():
        server.stop()


def rendered(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def expected(loaded, kind, prompt, max_tokens, **settings):
    model, tokenizer = loaded[kind]
    return mlx_mamba.generate(model, tokenizer, prompt, max_tokens=max_tokens, **settings)


EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos")  # beyond OpenAI's fields


def openai_arguments(kwargs):
    extra = {k: kwargs.pop(k) for k in EXTENSIONS if k in kwargs}
    return dict(kwargs, extra_body=extra) if extra else kwargs


def complete(client, prompt, max_tokens, **kwargs):
    return client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                     **openai_arguments(kwargs))


def complete_together(client, requests):
    """The texts of (prompt, max_tokens, settings) completions sent at once, and each one's
    settings under generate()'s names (temp for temperature)."""
    def run(request):
        prompt, max_tokens, settings = request
        return complete(client, prompt, max_tokens, **settings).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(run, requests))
    return texts, [{("temp" if name == "temperature" else name): value
                    for name, value in settings.items()} for _, _, settings in requests]


def chat(client, messages, max_tokens, **kwargs):
    return client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                          **openai_arguments(kwargs))


# ---- what a request gets ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_greedy_text_equals_generate(servers, loaded, kind):
    client = servers(kind).client()
    for prompt in ("Hello there, how are you?", [5, 17, 42, 8, 99, 3]):
        reply = complete(client, prompt, 24, temperature=0)
        assert reply.choices[0].text == expected(loaded, kind, prompt, 24)
        assert reply.usage.prompt_tokens == len(loaded[kind][1].encode(prompt)
                                                if isinstance(prompt, str) else prompt)
    messages = [{"role": "user", "content": "Tell me a story."}]
    reply = chat(client, messages, 24, temperature=0)
    assert reply.choices[0].message.content == \
        expected(loaded, kind, rendered(loaded[kind][1], messages), 24)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_streamed_equals_whole(servers, kind):
    client = servers(kind).client()
    messages = [{"role": "user", "content": "Streams, please."}]
    for settings in (dict(temperature=0), dict(temperature=0.9, top_k=40, seed=7)):
        whole = chat(client, messages, 20, **settings)
        chunks = list(chat(client, messages, 20, stream=True,
                           stream_options={"include_usage": True}, **settings))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
            whole.choices[0].finish_reason
        whole = complete(client, "Once upon a time", 20, **settings)
        streamed = "".join(c.choices[0].text for c in
                           complete(client, "Once upon a time", 20, stream=True, **settings))
        assert streamed == whole.choices[0].text


def test_streams_end_with_done(servers):
    server = servers("mamba")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_SECONDS)
    connection.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Hi", "max_tokens": 3, "stream": True}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith(
        "text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    connection.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_and_logprobs(servers, loaded):
    client = servers("mamba").client()
    full = expected(loaded, "mamba", "Hello there", 30)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    reply = complete(client, "Hello there", 30, temperature=0, stop=[stop, "@@@@"])
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in complete(
        client, "Hello there", 30, temperature=0, stop=stop, stream=True))
    assert streamed == reply.choices[0].text

    reply = complete(client, "Hello there", 6, temperature=0, logprobs=3, ignore_eos=True)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == 6 == len(logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == reply.choices[0].text
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                 logprobs.top_logprobs):
        assert len(top) <= 3 and value == pytest.approx(max(top.values())) and value <= 0
    reply = chat(client, [{"role": "user", "content": "Hi"}], 4, temperature=0, logprobs=True,
                 top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert reply.choices[0].message.content.startswith("".join(c.token for c in content))

    assert complete(client, "Hello there", 0).choices[0].text == ""


# ---- the prompt cache ------------------------------------------------------------------------

def converse(client, loaded, kind, turns, max_tokens=12):
    """Chat turn after turn; returns each reply's usage. Each text must equal a cold run."""
    messages, usages = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = chat(client, messages, max_tokens, temperature=0)
        text = reply.choices[0].message.content
        assert text == expected(loaded, kind, rendered(loaded[kind][1], messages), max_tokens)
        messages.append({"role": "assistant", "content": text})
        usages.append(reply.usage)
    return usages


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_conversation_turns_come_from_the_cache(servers, loaded, kind):
    client = servers(kind).client()
    turns = ["Good morning! What is new?", "Tell me more about it.", "And then?", "Thanks."]
    usages = converse(client, loaded, kind, turns)
    for before, now in zip(usages, usages[1:]):
        # Everything up to the end of the previous reply (the last generated token, unless
        # it ended the reply, is fed with the next prompt).
        assert now.prompt_tokens_details.cached_tokens >= \
            before.prompt_tokens + before.completion_tokens - 1
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    # The same prompt again: all of it but the token that gives the first logits.
    again = chat(client, [{"role": "user", "content": turns[0]}], 3, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_prompt_cache_survives_a_restart(model_dir, loaded, tmp_path):
    directory = model_dir(FLAVOURS["mamba"])
    flags = ["--prompt-cache-dir", str(tmp_path / "cache")]
    turns = ["Remember this: blue.", "What did I say?"]
    server = Server(directory, flags, tmp_path / "first.log")
    try:
        first = converse(server.client(), loaded, "mamba", turns[:1])[0]
    finally:
        assert server.stop() == 0
    assert list((tmp_path / "cache").glob("*.safetensors"))
    server = Server(directory, flags, tmp_path / "second.log")
    try:
        client = server.client()
        messages = [{"role": "user", "content": turns[0]}]
        reply = chat(client, messages, 12, temperature=0)
        assert reply.usage.prompt_tokens_details.cached_tokens == first.prompt_tokens - 1
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": turns[1]}]
        second = chat(client, messages, 12, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens >= \
            first.prompt_tokens + first.completion_tokens - 1
        assert second.choices[0].message.content == \
            expected(loaded, "mamba", rendered(loaded["mamba"][1], messages), 12)
    finally:
        server.stop()
    # Another model refuses the directory, and leaves it as it was.
    files = sorted((tmp_path / "cache").iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "mlx_mamba.server", "--model", str(model_dir("nemotron_h")),
         "--port", "0", *flags], capture_output=True, text=True, cwd=ROOT, timeout=START_SECONDS)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"error: .*cache.* holds the prompt cache of another model",
                     result.stderr)
    assert sorted((tmp_path / "cache").iterdir()) == files


# ---- batching --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_concurrent_requests_get_the_texts_they_get_alone(servers, loaded, kind):
    # Four requests for three batch places: one waits, then joins while the others decode.
    client = servers(kind).client()
    requests = [("Hi", 30, dict(temperature=0)),
                ("A much longer prompt, which takes more prefill than the others.", 14,
                 dict(temperature=0.8, seed=11)),
                ("Middle-sized prompt here", 22, dict(temperature=0, repetition_penalty=1.4)),
                ([7, 9, 11], 8, dict(temperature=0.7, top_p=0.9, seed=3))]
    texts, settings = complete_together(client, requests)
    for (prompt, max_tokens, _), text, setting in zip(requests, texts, settings):
        assert text == expected(loaded, kind, prompt, max_tokens, **setting)


def open_stream(server, max_tokens=100000):
    """A streamed request generating until stopped; returns the open response once its first
    token came (it is then in the batch)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_SECONDS)
    connection.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Go on and on", "max_tokens": max_tokens, "temperature": 0,
         "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def test_a_client_that_leaves_frees_its_place(servers):
    server = servers("mamba")
    connection, response = open_stream(server)
    assert response.readline().startswith(b"data: ")
    assert server.active_requests() == 1
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert server.wait_idle()  # 100000 tokens would take minutes
    # A whole (not streamed) request whose client leaves.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_SECONDS)
    connection.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Go on", "max_tokens": 100000, "ignore_eos": True}),
        {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while not server.active_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.active_requests() == 1
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert server.wait_idle()


def test_overload_is_a_503_not_a_hang(servers):
    server = servers("mamba")  # 3 batch places and 1 queue place
    streams = [open_stream(server) for _ in range(4)]
    for _, response in streams[:3]:
        assert response.readline().startswith(b"data: ")
    status, body = server.raw("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                              {"Content-Type": "application/json"})
    assert status == 503 and "busy" in body["error"]["message"]
    for connection, _ in streams:
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
    assert server.wait_idle()
    assert complete(server.client(), "x", 2).choices[0].finish_reason in ("stop", "length")


# ---- refusals --------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (path, body, status, words of the message)
    ("/v1/completions", b'{"prompt": "x", ', 400, "not valid JSON"),
    ("/v1/completions", b'["x"]', 400, "JSON object"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": [1, 2, 100]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": [1, -2]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": "\ud800"}, 400, "UTF-8"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfff"}]}, 400,
     "UTF-8"),
    ("/v1/completions", {"prompt": "x" * 300}, 400, "at most 200"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 9}, 400, "--max-tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -3}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "n": 4}, 400, "max-batch-size"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, 400,
     "at most 200"),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, "4096 bytes"),
    ("/v1/nothing", {"prompt": "x"}, 404, "Not Found"),
]


def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(servers):
    server = servers("hybrid")
    for path, body, status, words in BAD_REQUESTS:
        got, reply = server.raw("POST", path, body, auth())
        assert (got, words) == (status, words) and words in reply["error"]["message"], reply
    assert server.raw("GET", "/v1/completions", None, auth())[0] == 405
    # A streamed body over the limit (no Content-Length), and a Content-Length that lies.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_SECONDS)
    connection.request("POST", "/v1/completions", iter([b"{" + b" " * 3000] * 3),
                       auth(), encode_chunked=True)
    assert connection.getresponse().status == 413
    connection.close()
    # Refused by the HTTP parser itself (a plain-text 400).
    assert server.raw("POST", "/v1/completions", b"{}", {**auth(), "Content-Length": "x"})[0] \
        == 400
    assert complete(server.client(), "Still here?", 3).usage.completion_tokens >= 1


def test_api_key_is_required(servers, model_dir):
    server = servers("hybrid")
    for headers in ({}, auth("wrong"), {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/health")):
            status, body = server.raw(method, path, {"prompt": "x"}, headers)
            assert status == 401 and "API key" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        complete(server.client("wrong"), "x", 2)
    models = server.client().models.list()
    assert [m.id for m in models.data] == [str(model_dir(FLAVOURS["hybrid"]))]


def test_bad_flags_and_models_are_one_error_line(model_dir, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    model = str(model_dir(FLAVOURS["mamba"]))
    cases = [(["--model", model, "--max-batch-size", "0"], 2, "--max-batch-size"),
             (["--model", model, "--api-key", " "], 1, "--api-key"),
             (["--model", str(tmp_path / "missing")], 1, "missing"),
             (["--model", model, "--port", str(taken.getsockname()[1])], 1, "cannot listen")]
    try:
        for flags, code, words in cases:
            result = subprocess.run([sys.executable, "-m", "mlx_mamba.server", *flags],
                                    capture_output=True, text=True, cwd=ROOT,
                                    timeout=START_SECONDS)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == code and lines[-1].startswith("error: ") and \
                words in lines[-1] and "Traceback" not in result.stderr, result.stderr
    finally:
        taken.close()
