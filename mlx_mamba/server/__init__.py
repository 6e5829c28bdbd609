"""An OpenAI-compatible server: `python -m mlx_mamba.server --model M`.

A state-space model's whole past is a fixed-size state, so the server keeps the state at the end
of every request, and every `--prefill-step-size` tokens of a long prompt: a request resumes from
the longest cached prefix of its tokens, and the next turn of a conversation costs only its new
tokens. Requests decode together, joining and leaving the batch between steps, and each gets
exactly the tokens it gets alone.

The engine (engine.py, the main thread, which does all MLX work) runs the library's generation
engine; the HTTP side (app.py) is FastAPI on uvicorn in a thread of its own, the `server` extra,
imported only when serving.

Under `mlx.launch` with several processes the model is sharded over them (tensor parallel, or
pipeline with --pipeline): rank 0 alone listens and serves, and the engines of the other ranks
follow its engine turn by turn (see engine.py).
"""

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

import mlx.core as mx

from .. import cli
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..cli_model import add_draft_arguments
from ..decoder import GenerationError
from ..models.sharding import ShardingError
from ..prompt_cache import PREFILL_STEP_SIZE, PromptCacheError
from ..sharded import agree, quiet_unless_first
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
    cli.add_model_arguments(parser)
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
    cli.add_switch(parser, "--pipeline",
                   help="under mlx.launch with several processes: pipeline parallel (each "
                        "process holds a range of layers) instead of tensor parallel")
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
    world = mx.distributed.init()
    if world.size() > 1 and args.prompt_cache_dir is not None:
        raise ServerError("--prompt-cache-dir keeps the states of one process: a model sharded "
                          "over several keeps them in memory only")
    if world.rank() > 0:
        return _follow(args, world)
    error = None
    try:  # the web stack and the port, before the model loads: a taken port fails fast
        import uvicorn

        from .app import make_app
        sock = listen(args.host, args.port)
    except ImportError as e:
        error = ServerError(f"the server needs the web stack ({e.name} is missing): "
                            "pip install 'mlx-mamba[server]'")
    except ServerError as e:
        error = e
    if world.size() > 1:
        agree(world, error)  # the other ranks stop too
    elif error is not None:
        raise error
    engine = Engine(args, world)
    server = uvicorn.Server(uvicorn.Config(make_app(engine, args), log_level=args.log_level,
                                           timeout_graceful_shutdown=2))
    # The web stack runs in a thread of its own; this thread, which loaded the model, runs the
    # engine, and takes the signals for both (uvicorn shuts down, then the engine stops).
    web = threading.Thread(target=_serve_web, args=(server, sock, engine, world.size() > 1),
                           name="web")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, server.handle_exit)
    web.start()
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr)
    sharded = "" if world.size() == 1 else \
        f", {'pipeline' if args.pipeline else 'tensor'} parallel over {world.size()} processes"
    print(f"Serving {args.model} at http://{host}:{port} (OpenAI API under /v1{sharded})",
          file=sys.stderr, flush=True)
    try:
        engine.run()
    except RuntimeError as e:  # sharded: the group's connection, when another rank is gone
        if world.size() == 1:
            raise
        raise ServerError(f"another process stopped: {e}") from None
    finally:  # the web side stops too
        server.should_exit = True
        web.join()
    if not server.started:
        raise ServerError("the web server did not start (see the messages above)")


def _follow(args, world):
    """A rank other than 0: load its shard and follow rank 0's engine until it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops every rank
    agree(world, None)
    engine = Engine(args, world)
    try:
        engine.run()
    except RuntimeError as e:  # the group's connection: rank 0 is gone
        raise ServerError(f"rank 0 stopped: {e}") from None


STOP_SECONDS = 10  # sharded: how long the engine may take to stop the other processes


def _serve_web(server, sock, engine, sharded):
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        if sharded:
            # A message to a process that is gone can wait forever (MLX's ring backend); the
            # process must end all the same, or mlx.launch waits for it.
            watchdog = threading.Timer(STOP_SECONDS, _abandon)
            watchdog.daemon = True
            watchdog.start()


def _abandon():
    print("error: another process stopped: the engine's last message to it never completed",
          file=sys.stderr, flush=True)
    os._exit(1)


def main(argv=None):
    quiet_unless_first(mx.distributed.init())
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    return cli.run(lambda: serve(args), (ServerError, ConfigError, CheckpointError,
                                         PromptCacheError, GenerationError, DraftError,
                                         OSError, ShardingError))
