"""An OpenAI-compatible server: `python -m mlx_mamba.server --model M`.

A state-space model's whole past is a fixed-size state, so the server keeps the state at the end
of every request, and every `--prefill-step-size` tokens of a long prompt: a request resumes from
the longest cached prefix of its tokens, and the next turn of a conversation costs only its new
tokens. Requests decode together, joining and leaving the batch between steps, and each gets
exactly the tokens it gets alone.

The engine (engine.py, one thread doing all MLX work) is the library's generation engine; the
HTTP side (app.py) is FastAPI on uvicorn, the `server` extra, imported only when serving.
"""

import argparse
import ipaddress
import logging
import socket
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..generate import GenerationError
from ..prompt_cache import PREFILL_STEP_SIZE, PromptCacheError
from .engine import Engine


class ServerError(ValueError):
    """A server flag that cannot be used, or a missing web stack; the message says which."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mlx_mamba.server",
        description="Serve a model over OpenAI's completions and chat completions API, keeping "
                    "the state of every conversation so that the next turn costs only its new "
                    "tokens.")
    parser.add_argument("--model", required=True,
                        help="a converted, transformers or original directory, or a repo id")
    parser.add_argument("--tokenizer", default=None,
                        help="a directory or repo id with the tokenizer, for models shipped "
                             "without one")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="requests waiting for a batch place; more are refused with 503")
    parser.add_argument("--prompt-cache-bytes", type=int, default=4 * 2 ** 30,
                        help="memory for cached states (default 4 GiB); 0 turns the cache off")
    parser.add_argument("--prompt-cache-dir", default=None,
                        help="also keep the cached states in this directory, for the next run")
    parser.add_argument("--max-prompt-tokens", type=int, default=32768,
                        help="longer prompts are refused")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="the most tokens a request may generate, and the default")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2 ** 20,
                        help="larger request bodies are refused with 413")
    parser.add_argument("--prefill-step-size", type=int, default=PREFILL_STEP_SIZE,
                        help="prompt tokens per parallel forward; a state is kept after each")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def check_args(args):
    for flag, value, least in (("--max-batch-size", args.max_batch_size, 1),
                               ("--max-queue", args.max_queue, 0),
                               ("--prompt-cache-bytes", args.prompt_cache_bytes, 0),
                               ("--max-prompt-tokens", args.max_prompt_tokens, 1),
                               ("--max-tokens", args.max_tokens, 1),
                               ("--max-body-bytes", args.max_body_bytes, 1024),
                               ("--prefill-step-size", args.prefill_step_size, 1)):
        if value < least:
            raise ServerError(f"{flag} is {value}: expected at least {least}")
    if not 0 <= args.port <= 65535:
        raise ServerError(f"--port is {args.port}: expected 0..65535")
    if args.api_key is not None and not args.api_key.strip():
        raise ServerError("--api-key is empty")


def listen(host, port):
    """A listening socket on host:port (bound before the model loads: a taken port fails fast)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(args):
    check_args(args)
    try:
        import uvicorn

        from .app import make_app
    except ImportError as e:
        raise ServerError(f"the server needs the web stack ({e.name} is missing): "
                          "pip install 'mlx-mamba[server]'") from None
    sock = listen(args.host, args.port)
    engine = Engine(args)
    engine.start()
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr)
    print(f"Serving {args.model} at http://{host}:{port} (OpenAI API under /v1)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(make_app(engine, args), log_level=args.log_level,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        serve(args)
    except (ServerError, ConfigError, CheckpointError, PromptCacheError, GenerationError,
            OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
