"""Serving, mlx_mamba.server beside mlx_lm.server on the same checkpoint:

- time to first token of the 8th turn of a conversation (warm: the server has seen the turns
  before) against a cold request of a prompt of the same length (another system message, so
  that no cached prefix applies);
- throughput (generated tokens per second, all clients together) of 8 clients at once against
  the same 8 requests one after another.

Time to first token is the latency of a request for one token. The checkpoint is random weights
at a model's shapes, written in the transformers layout that both servers read, with a
character-level tokenizer: a reply's text then encodes back to the very tokens generated, as a
real model's replies nearly always do (random weights under a BPE tokenizer give token runs that
encode back otherwise, which would hide the cache of the replies). The chat template is plain
text and the EOS token lies outside the model's vocabulary, so replies run to max_tokens. Each
server runs as a subprocess on 127.0.0.1.

    python benchmarks/server.py                       # mamba2-130m shapes, ~2k-token turn 8
    python benchmarks/server.py --shape small         # a model small enough for a CPU
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
    args = parser.parse_args()
    words = re.findall(r"\S+", TEXT.read_text())

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model = str(Path(scratch) / args.shape)
        write_checkpoint(model, args.shape)
        for name in args.servers.split(","):
            server = Server(name, model)
            try:
                prompt_tokens, cold, warm = conversation_ttft(server, words, args)
                print(f"{name}: turn {args.turns}, {prompt_tokens} tokens: cold {cold:.3f} s, "
                      f"warm {warm:.3f} s", file=sys.stderr)
                sequential = throughput(server, words, args, False, 0)
                together = throughput(server, words, args, True, args.clients)
                print(f"{name}: {sequential:.1f} tok/s sequential, {together:.1f} concurrent",
                      file=sys.stderr)
            finally:
                server.stop()
            rows.append((name, prompt_tokens, cold, warm, sequential, together))

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


if __name__ == "__main__":
    main()
