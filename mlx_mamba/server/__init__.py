"""An OpenAI-compatible server: `python -m mlx_mamba.server --model M`.

A state-space model's whole past is a fixed-size state, so the server keeps the state at the end
of every request, and every `--prefill-step-size` tokens of a long prompt: a request resumes from
the longest cached prefix of its tokens, and the next turn of a conversation costs only its new
tokens. Requests decode together, joining and leaving the batch between steps, and each gets
exactly the tokens it gets alone.

The engine (engine.py, the main thread, which does all MLX work) runs the library's generation
engine; the HTTP side (app.py) is FastAPI on uvicorn in a thread of its own, the `server` extra,
imported only when serving.
"""

import ipaddress
import logging
import signal
import socket
import sys
import threading

from .. import cli
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..cli_model import add_draft_arguments
from ..decoder import GenerationError
from ..prompt_cache import PREFILL_STEP_SIZE, PromptCacheError
from ..speculative import DraftError
from ..tool_calls import FORMATS
from .engine import Engine


class ServerError(ValueError):
    """A server setting that cannot be used, or a missing web stack; the message says which."""


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m mlx_mamba.server",
        description="Serve a model over OpenAI's completions and chat completions API, keeping "
                    "the state of every conversation so that the next turn costs only its new "
                    "tokens.")
    add = parser.add_argument
    add("--model", required=True,
        help="a converted, transformers or original directory, or a repo id")
    add("--tokenizer", default=None,
        help="a directory, tokenizer.json file or repo id with the tokenizer, instead of the "
             "model's own (default: the model's)")
    add("--host", default="127.0.0.1",
        help="address to listen on; 127.0.0.1 takes requests from this machine only")
    add("--port", type=cli.integer(0, 65535), default=8080, help="0 picks a free port")
    add("--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on every request (default: none)")
    add("--max-batch-size", type=cli.integer(1), default=8, help="requests decoded together")
    add("--max-queue", type=cli.integer(0), default=32,
        help="requests waiting for a batch place; more are refused with 503")
    add("--prompt-cache-bytes", type=cli.integer(0), default=4 * 2 ** 30,
        help="memory for cached states; 0 turns the cache off")
    add("--prompt-cache-dir", default=None,
        help="also keep the cached states in this directory, for the next run (default: in "
             "memory only)")
    add("--max-prompt-tokens", type=cli.integer(1), default=32768,
        help="longer prompts are refused")
    add("--max-tokens", type=cli.integer(1), default=4096,
        help="the most tokens a request may generate; also what it gets without max_tokens")
    add("--max-body-bytes", type=cli.integer(1024), default=4 * 2 ** 20,
        help="larger request bodies are refused with 413")
    add("--prefill-step-size", type=cli.integer(1), default=PREFILL_STEP_SIZE,
        help="prompt tokens per parallel forward; a state is kept after each")
    add_draft_arguments(parser)
    add("--tool-parser", choices=sorted(FORMATS), default=None,
        help="the format of the model's tool calls (default: read from the chat template's "
             "tags; hermes when it has none)")
    add("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
        help="what the server logs to stderr")
    return parser


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
    if args.api_key is not None and not args.api_key.strip():
        raise ServerError("--api-key is empty")
    if args.draft_model is not None and args.prompt_lookup is not None:
        raise ServerError("--prompt-lookup and --draft-model exclude each other: draft with one")
    try:
        import uvicorn

        from .app import make_app
    except ImportError as e:
        raise ServerError(f"the server needs the web stack ({e.name} is missing): "
                          "pip install 'mlx-mamba[server]'") from None
    sock = listen(args.host, args.port)
    engine = Engine(args)
    server = uvicorn.Server(uvicorn.Config(make_app(engine, args), log_level=args.log_level,
                                           timeout_graceful_shutdown=2))
    # The web stack runs in a thread of its own; this thread, which loaded the model, runs the
    # engine, and takes the signals for both (uvicorn shuts down, then the engine stops).
    web = threading.Thread(target=_serve_web, args=(server, sock, engine), name="web")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, server.handle_exit)
    web.start()
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr)
    print(f"Serving {args.model} at http://{host}:{port} (OpenAI API under /v1)",
          file=sys.stderr, flush=True)
    engine.run()
    web.join()
    if not server.started:
        raise ServerError("the web server did not start (see the messages above)")


def _serve_web(server, sock, engine):
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    return cli.run(lambda: serve(args), (ServerError, ConfigError, CheckpointError,
                                         PromptCacheError, GenerationError, DraftError,
                                         OSError))
