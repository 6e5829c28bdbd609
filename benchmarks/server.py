"""Serving, mlx_mamba.server beside mlx_lm.server on the same checkpoint:

- time to first token of the 8th turn of a conversation (warm: the server has seen the turns
  before) against a cold request of a prompt of the same length (another system message, so
  that no cached prefix applies);
- throughput (generated tokens per second, all clients together) of 8 clients at once against
  the same 8 requests one after another;
- agents (mlx_mamba.server only: mlx_lm.server has neither response_format nor n): time per
  generated token with and without a JSON-schema grammar (response_format), and one request
  for n = 4 choices against 4 separate requests at once (of 4 prompts of the same length, so
  that the prompt cache cannot serve the others from the first's prefill).

Time to first token is the latency of a request for one token. The checkpoint is random weights
at a model's shapes, written in the transformers layout that both servers read, with a
character-level tokenizer: a reply's text then encodes back to the very tokens generated, as a
real model's replies nearly always do (random weights under a BPE tokenizer give token runs that
encode back otherwise, which would hide the cache of the replies). The chat template is plain
text and the EOS token lies outside the model's vocabulary, so replies run to max_tokens. Each
server runs as a subprocess on 127.0.0.1.

    python benchmarks/server.py                       # mamba2-130m shapes, ~2k-token turn 8
    python benchmarks/server.py --shape small         # a model small enough for a CPU
    python benchmarks/server.py --shape small --servers mlx_mamba.server --only agents
"""

import argparse
import concurrent.futures
import json
import platform
import re
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_mamba.config import ModelConfig
from mlx_mamba.convert import save_model
from mlx_mamba.models import Model

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare-excerpt.txt"
CHARACTERS = string.printable[:95] + "\n" + "àáâä"  # 100 ids, each one character
SHAPES = {
    "small": dict(arch="mamba2", d_model=256, n_layer=8, d_state=64, head_dim=32),
    "mamba2-130m": dict(arch="mamba2", d_model=768, n_layer=24, d_state=128, head_dim=64),
    "mamba2-370m": dict(arch="mamba2", d_model=1024, n_layer=48, d_state=128, head_dim=64),
}
CHAT_TEMPLATE = ("{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}")
SERVERS = {
    "mlx_mamba.server": lambda model, port: [sys.executable, "-m", "mlx_mamba.server", "--model",
                                             model, "--port", str(port), "--log-level",
                                             "warning"],
    "mlx_lm.server": lambda model, port: [sys.executable, "-m", "mlx_lm", "server", "--model",
                                          model, "--port", str(port), "--log-level", "WARNING"],
}


def write_checkpoint(directory, shape):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # mlx-lm also stops at the config's EOS: the tokenizer's, which the model never produces.
    config = ModelConfig(vocab_size=len(CHARACTERS), eos_token_id=len(CHARACTERS),
                         **SHAPES[shape])
    mx.random.seed(0)
    model = Model(config)
    save_model(directory, dict(tree_flatten(model.parameters())), config)
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(CHARACTERS)}, []))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["</s>"])  # id 100: never generated
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(directory)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, model):
        self.model, self.port = model, free_port()
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(SERVERS[name](model, self.port), stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                sys.exit(f"{name} exited:\n{self.log.read().decode()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        sys.exit(f"{name} did not start in 300 s")

    def post(self, path, body):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())

    def chat(self, messages, max_tokens):
        """(seconds, reply) of a greedy chat request."""
        start = time.perf_counter()
        reply = self.post("/v1/chat/completions", {"model": self.model, "messages": messages,
                                                   "max_tokens": max_tokens, "temperature": 0})
        return time.perf_counter() - start, reply

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def text_of(words, start, count):
    """`count` characters (tokens) of Shakespeare from word `start` on."""
    return " ".join(words[start:start + count])[:count]


def conversation_ttft(server, words, args):
    """(turn-8 prompt tokens, cold seconds, warm seconds): 7 turns, then the 8th for one token
    (warm), then the same for a conversation under another system message (cold)."""
    def turns(system):
        messages = [{"role": "system", "content": system}]
        for turn in range(args.turns):
            messages.append({"role": "user", "content": text_of(
                words, turn * args.turn_tokens, args.turn_tokens)})
            if turn == args.turns - 1:
                return messages
            _, reply = server.chat(messages, args.reply_tokens)
            messages.append({"role": "assistant",
                             "content": reply["choices"][0]["message"]["content"]})

    messages = turns("You are a helpful assistant.")
    warm_seconds, reply = server.chat(messages, 1)
    print(f"turn {args.turns} usage: {reply['usage']}", file=sys.stderr)
    cold = [dict(m) for m in messages]
    cold[0]["content"] = "You are a careful assistant."  # the same length, another prefix
    cold_seconds, _ = server.chat(cold, 1)
    return reply["usage"]["prompt_tokens"], cold_seconds, warm_seconds


def throughput(server, words, args, at_once, offset):
    """Generated tokens per second of `args.clients` requests, at once or one by one."""
    requests = [{"model": server.model, "prompt": f"Client {offset + i}: " + text_of(
        words, 5000 + 97 * (offset + i), args.client_prompt_tokens),
        "max_tokens": args.decode_tokens, "temperature": 0} for i in range(args.clients)]
    start = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            replies = list(pool.map(lambda r: server.post("/v1/completions", r), requests))
    else:
        replies = [server.post("/v1/completions", r) for r in requests]
    seconds = time.perf_counter() - start
    return sum(r["usage"]["completion_tokens"] for r in replies) / seconds


# A string that outlasts the replies: the grammar masks every step, and the reply never ends
# early (this tokenizer's EOS is outside the model's vocabulary).
LONG_STRING = {"type": "json_schema", "json_schema": {"name": "text", "schema": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 4000}},
    "required": ["text"]}}}


def decode_seconds(server, body, tokens):
    """Seconds per generated token of `body` at temperature 1: (a request for `tokens` minus
    one for 1 token) / (tokens - 1), both from the cached prompt: the prompt is left out."""
    times = {}
    server.post("/v1/chat/completions", dict(body, max_tokens=1))  # the prompt cache is warm
    for count in (1, tokens):
        start = time.perf_counter()
        reply = server.post("/v1/chat/completions", dict(body, max_tokens=count, seed=0))
        times[count] = time.perf_counter() - start
        assert reply["usage"]["completion_tokens"] == count, reply["usage"]
    return (times[tokens] - times[1]) / (tokens - 1)


def agents(server, words, args):
    """(seconds per token without, with the grammar; seconds of n=4; of 4 separate)."""
    body = {"model": server.model, "temperature": 1.0,
            "messages": [{"role": "user", "content": text_of(words, 0, 64)}]}
    free = decode_seconds(server, body, args.decode_tokens)
    constrained = decode_seconds(server, dict(body, response_format=LONG_STRING),
                                 args.decode_tokens)

    def prompt(i):
        return f"{i}: " + text_of(words, 9000, args.choice_prompt_tokens)

    request = {"model": server.model, "max_tokens": args.decode_tokens, "temperature": 1.0}
    start = time.perf_counter()
    reply = server.post("/v1/completions", dict(request, prompt=prompt("n"), n=4, seed=0))
    together = time.perf_counter() - start
    assert len(reply["choices"]) == 4
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: server.post("/v1/completions", dict(
            request, prompt=prompt(i), seed=i)), range(4)))
    separate = time.perf_counter() - start
    return free, constrained, together, separate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="mamba2-130m", choices=sorted(SHAPES))
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=32, help="user tokens per turn")
    parser.add_argument("--reply-tokens", type=int, default=240, help="assistant tokens per turn")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client-prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--choice-prompt-tokens", type=int, default=1024,
                        help="prompt tokens of the n = 4 comparison")
    parser.add_argument("--only", choices=["serving", "agents"], default=None,
                        help="run one part (default: both)")
    args = parser.parse_args()
    words = re.findall(r"\S+", TEXT.read_text())

    rows, agent_rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        model = str(Path(scratch) / args.shape)
        write_checkpoint(model, args.shape)
        for name in args.servers.split(","):
            server = Server(name, model)
            try:
                if args.only != "agents":
                    prompt_tokens, cold, warm = conversation_ttft(server, words, args)
                    print(f"{name}: turn {args.turns}, {prompt_tokens} tokens: cold {cold:.3f} "
                          f"s, warm {warm:.3f} s", file=sys.stderr)
                    sequential = throughput(server, words, args, False, 0)
                    together = throughput(server, words, args, True, args.clients)
                    print(f"{name}: {sequential:.1f} tok/s sequential, {together:.1f} "
                          "concurrent", file=sys.stderr)
                    rows.append((name, prompt_tokens, cold, warm, sequential, together))
                if args.only != "serving" and name == "mlx_mamba.server":
                    agent_rows.append((name, *agents(server, words, args)))
            finally:
                server.stop()

    print(f"{platform.machine()} {platform.system()}, MLX {mx.__version__} on "
          f"{mx.default_device()}; {args.shape} shapes (random weights); turn {args.turns} of a "
          f"conversation ({args.turn_tokens} user + {args.reply_tokens} reply tokens a turn); "
          f"{args.clients} clients x ({args.client_prompt_tokens}-token prompt, "
          f"{args.decode_tokens} tokens)\n")
    print(f"| server | turn-{args.turns} prompt tokens | cold TTFT (s) | warm TTFT (s) | "
          f"cold / warm | {args.clients} sequential (tok/s) | {args.clients} concurrent "
          "(tok/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, prompt_tokens, cold, warm, sequential, together in rows:
        print(f"| {name} | {prompt_tokens} | {cold:.3f} | {warm:.3f} | {cold / warm:.1f}x | "
              f"{sequential:.1f} | {together:.1f} |")
    if agent_rows:
        print(f"\n| server | ms/token | ms/token, JSON schema | grammar cost | n=4 (s) | "
              f"4 requests (s) | 4 requests / n=4 |  ({args.decode_tokens} tokens; n=4: "
              f"{args.choice_prompt_tokens}-token prompt)")
        print("|---|---|---|---|---|---|---|")
        for name, free, constrained, together, separate in agent_rows:
            print(f"| {name} | {free * 1e3:.2f} | {constrained * 1e3:.2f} | "
                  f"{(constrained - free) * 1e3:+.2f} ms | {together:.2f} | {separate:.2f} | "
                  f"{separate / together:.2f}x |")


if __name__ == "__main__":
    main()
