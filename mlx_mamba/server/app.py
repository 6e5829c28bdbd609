"""The HTTP face of the engine: OpenAI's completions and chat completions on FastAPI, every
request validated by schema; every refusal is a 4xx with OpenAI's JSON error body."""

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Annotated, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..generate import GenerationError, encode
from ..grammar import GrammarError, from_response_format, logits_processor
from ..sample import MAX_SEED, SamplerError, check_settings
from ..tool_calls import ToolCallParser, forced_call_grammar
from .engine import Job, Overloaded, Piece

log = logging.getLogger("mlx_mamba.server")
MAX_LOGPROBS = 20  # top alternatives a request may ask for, per token
MAX_STOPS = 4
MAX_CHOICES = 16  # n; also at most --max-batch-size


class RequestError(ValueError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, message, status=400, param=None):
        super().__init__(message)
        self.status, self.param = status, param


def busy():
    return RequestError("the server is busy (every batch row and queue place is taken): "
                        "retry later", status=503)


# ---- request schemas -------------------------------------------------------------------------

class Schema(BaseModel):
    # strict: "5" is not a number and true is not 1; fields OpenAI clients send that do not
    # change the result here (user, metadata...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Schema):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1, max_length=256)]


class JsonSchemaSpec(Schema):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # accepted; the schema is always enforced


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class Sampling(Schema):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    ignore_eos: bool = False  # generate max_tokens tokens whatever comes (benchmarks)
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(Schema):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class CalledFunction(Schema):
    name: FunctionName
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(Schema):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(Schema):
    role: str = Field(min_length=1, max_length=64)
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool's answer: to which call
    name: str | None = Field(None, max_length=64)


class Function(Schema):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # accepted; forced calls always follow the parameters


class Tool(Schema):
    type: Literal["function"]
    function: Function


class NamedFunction(Schema):
    name: FunctionName


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # accepted; a forced call is one call
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# ---- the app ---------------------------------------------------------------------------------

def make_app(engine, settings):
    """settings: the server's flags (model, api_key, max_body_bytes, max_prompt_tokens,
    max_tokens)."""
    app = FastAPI(title="mlx-mamba", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    created = int(time.time())
    tokenizer_lock = asyncio.Lock()  # one tokenization at a time, beside the engine's decoding

    async def tokenized(work):
        if engine.busy():  # refused before the work of tokenizing (submit checks again)
            raise busy()
        async with tokenizer_lock:
            ids = await run_in_threadpool(work)
        if not ids:
            raise RequestError("the prompt is empty (it encodes to no tokens)")
        if len(ids) > settings.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server takes at most "
                               f"{settings.max_prompt_tokens} (--max-prompt-tokens)")
        return ids

    @app.exception_handler(RequestError)
    async def refused(request, e):
        return error_response(e.status, str(e), e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        return error_response(400, *validation_message(e.errors()[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def failed(request, e):
        log.exception("request failed")
        return error_response(500, f"internal error: {type(e).__name__}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_requests": engine.active, "prefills": engine.prefills}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model, "object": "model",
                                            "created": created, "owned_by": "mlx-mamba"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids = await tokenized(lambda: prompt_ids(engine, body.prompt))
        grammar = await run_in_threadpool(response_grammar, engine, body.response_format)
        job, queue = submit(engine, settings, body, ids, body.logprobs, grammar)
        reply = Reply("text_completion", settings.model, body.logprobs is not None)
        return await respond(engine, request, body, job, queue, reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        tools, forced = tool_settings(body)
        ids = await tokenized(lambda: chat_ids(engine, body.messages, tools))
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        count = (body.top_logprobs or 0) if body.logprobs else None
        if forced is not None:
            grammar = await run_in_threadpool(tool_grammar, engine, tools, forced)
        else:
            grammar = await run_in_threadpool(response_grammar, engine, body.response_format)
        job, queue = submit(engine, settings, body, ids, count, grammar)
        reply = Reply("chat.completion", settings.model, body.logprobs,
                      engine.tool_format if tools else None, tools)
        return await respond(engine, request, body, job, queue, reply)

    return app


def error_response(status, message, param=None, kind=None):
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else \
        {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param or None,
                                   "code": status}}, status_code=status, headers=headers)


def validation_message(error):
    """(message, the field it is about) for pydantic's first complaint about a request."""
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON ({error['ctx']['error']})", None
    where = ".".join(str(part) for part in error["loc"][1:])
    if not where:
        return ("the request body must be a JSON object, sent with Content-Type: "
                "application/json"), None
    return f"{where}: {error['msg']}", where


def prompt_ids(engine, prompt):
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
    try:
        return encode(engine.model, engine.tokenizer, prompt)
    except GenerationError as e:
        raise RequestError(str(e), param="prompt") from None


def check_text(text, field):
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{field} is not UTF-8 text (a lone surrogate at character "
                           f"{e.start})", param=field) from None


def tool_settings(body):
    """(the tools to render, as dicts, or None; the function a call is forced to: a name,
    "" for any of the tools, None when nothing is forced) of a chat request."""
    choice = body.tool_choice
    if body.tools is None:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice forces a call, and the request has no tools",
                               param="tool_choice")
        return None, None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    check_text(json.dumps(tools, ensure_ascii=False), "tools")
    if choice == "none":
        return None, None
    if choice is None or choice == "auto":
        return tools, None
    if body.response_format is not None and body.response_format.type != "text":
        raise RequestError("tool_choice forces a call and response_format forces its own "
                           "format: send one of them", param="response_format")
    if choice == "required":
        return tools, ""
    if choice.function.name not in {tool["function"]["name"] for tool in tools}:
        raise RequestError(f"tool_choice names {choice.function.name!r}, which is not one of "
                           "the tools", param="tool_choice")
    return tools, choice.function.name


def tool_grammar(engine, tools, name):
    """The Grammar of one call in the model's tool format; a 400 if a function's parameters
    are not a schema it can follow."""
    try:
        grammar = forced_call_grammar(engine.tool_format, tools, name or None)
        logits_processor(grammar, engine.tokenizer, engine.model.config.vocab_size)
        return grammar
    except GrammarError as e:
        raise RequestError(f"tools: {e}", param="tools") from None


def _turn(message):
    """A message as chat templates take it: text content; an assistant's calls with their
    arguments as objects (templates write them as JSON)."""
    content = message.content
    turn = {"role": message.role, "content": content if not isinstance(content, list)
            else "".join(part.text for part in content)}
    turn["content"] = turn["content"] or ""
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = call.function.arguments
            calls.append({"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": arguments}})
        turn["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if getattr(message, key) is not None:
            turn[key] = getattr(message, key)
    return turn


def chat_ids(engine, messages, tools=None):
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template: use /v1/completions",
                           param="messages")
    conversation = [_turn(m) for m in messages]
    for i, turn in enumerate(conversation):
        check_text(json.dumps(turn, ensure_ascii=False), f"messages.{i}")
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                             add_generation_prompt=True)
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise RequestError(f"the chat template refused the messages: {e}",
                           param="messages") from None
    try:
        return encode(engine.model, tokenizer, tokenizer.encode(text, add_special_tokens=False))
    except GenerationError as e:
        raise RequestError(str(e), param="messages") from None


def response_grammar(engine, response_format):
    """The Grammar of a request's response_format (None for free text), checked against the
    model's tokenizer; a 400 naming what is wrong with it."""
    if response_format is None:
        return None
    spec = response_format.json_schema
    try:
        grammar = from_response_format({
            "type": response_format.type,
            "json_schema": None if spec is None else {"schema": spec.schema_ or {}}})
        if grammar is not None:
            logits_processor(grammar, engine.tokenizer, engine.model.config.vocab_size)
        return grammar
    except GrammarError as e:
        raise RequestError(f"response_format: {e}", param="response_format") from None


def submit(engine, settings, body, ids, logprobs, grammar=None):
    """Hand the request to the engine; (job, the asyncio queue its pieces arrive on)."""
    max_tokens = settings.max_tokens if body.max_tokens is None else body.max_tokens
    if body.n > settings.max_batch_size:
        raise RequestError(f"n is {body.n}; this server decodes at most "
                           f"{settings.max_batch_size} sequences together (--max-batch-size)",
                           param="n")
    if max_tokens > settings.max_tokens:
        raise RequestError(f"max_tokens is {max_tokens}; this server generates at most "
                           f"{settings.max_tokens} (--max-tokens)", param="max_tokens")
    if grammar is not None and engine.drafter is not None:
        raise RequestError("this server decodes speculatively (--draft-model or "
                           "--prompt-lookup), which a grammar (response_format, a forced tool "
                           "call) cannot follow", param="response_format")
    try:
        check_settings(body.temperature, body.top_p, body.top_k, body.min_p,
                       body.repetition_penalty, body.seed)
    except SamplerError as e:
        raise RequestError(str(e)) from None
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def deliver(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            pass

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = dict(temp=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    min_p=body.min_p, seed=body.seed)
    job = Job(ids, sampling, body.repetition_penalty, max_tokens, body.ignore_eos, stop,
              logprobs, deliver, grammar=grammar, n=body.n)
    if max_tokens == 0:
        job.finished = True
        for index in range(body.n):
            deliver(Piece("", "length", index=index))
        return job, queue
    try:
        engine.submit(job)
    except Overloaded:
        raise busy() from None
    return job, queue


async def respond(engine, request, body, job, queue, reply):
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(reply.stream(job, queue, usage), on_close=lambda: engine.cancel(job))
    try:
        pieces = await collect(request, queue, job.n)
    finally:
        engine.cancel(job)  # a no-op once it is done; frees the place if the client left
    if pieces is None:
        return error_response(499, "the client closed the connection")
    return reply.whole(job, pieces)


async def collect(request, queue, n):
    """Every piece of a request's n choices, or None if the client disconnects first (looked
    at every second, whether pieces come or not)."""
    pieces, looked, finished = [], time.monotonic(), 0
    while True:
        try:
            piece = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            piece = None
        if time.monotonic() - looked >= 1.0:
            if await request.is_disconnected():
                return None
            looked = time.monotonic()
        if isinstance(piece, Exception):
            raise piece
        if piece is not None:
            pieces.append(piece)
            finished += piece.finish_reason is not None
            if finished == n:
                return pieces


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (a client that leaves
    frees its place in the batch)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# ---- responses -------------------------------------------------------------------------------

class Reply:
    """OpenAI's response objects for completions ("text_completion") and chat completions
    ("chat.completion"), whole or streamed."""

    def __init__(self, kind, model, logprobs, tool_format=None, tools=()):
        """tool_format: the ToolFormat of the calls to find in the text (None: plain text);
        tools: the request's (as dicts)."""
        self.kind, self.model, self.logprobs = kind, model, logprobs
        self.tool_format, self.tools = tool_format, tools
        self.calls = {}  # choice -> tool calls streamed so far
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def whole(self, job, pieces):
        choices = [self._choice(i, [p for p in pieces if p.index == i]) for i in range(job.n)]
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.model, "choices": choices, "usage": usage(job)}

    def _choice(self, index, pieces):
        text, finish = "".join(p.text for p in pieces), pieces[-1].finish_reason
        if self.kind == "text_completion":
            choice = {"index": index, "text": text}
        else:
            choice = {"index": index, "message": {"role": "assistant", "content": text}}
            if self.tool_format is not None:
                parser = ToolCallParser(self.tool_format, self.tools)
                content, calls = parser.feed(text)
                content += parser.finish()[0]
                if calls:
                    choice["message"] = {"role": "assistant", "content": content or None,
                                         "tool_calls": calls}
                    finish = "tool_calls" if finish == "stop" else finish
        choice["logprobs"] = self._logprobs(pieces, 0) if self.logprobs else None
        choice["finish_reason"] = finish
        return choice

    async def stream(self, job, queue, include_usage):
        offsets, finished = [0] * job.n, 0
        parsers = [self.tool_format and ToolCallParser(self.tool_format, self.tools)
                   for _ in range(job.n)]
        if self.kind == "chat.completion":
            for index in range(job.n):
                yield self._event(self._chunk({"role": "assistant", "content": ""}, None, None,
                                              index))
        while True:
            piece = await queue.get()
            if isinstance(piece, Exception):
                log.error("request failed: %s", piece)
                yield self._event({"error": {"message": f"internal error: {type(piece).__name__}",
                                             "type": "server_error", "param": None,
                                             "code": 500}})
                break
            index = piece.index
            if parsers[index]:
                for event in self._tool_events(parsers[index], piece):
                    yield event
            elif piece.text or piece.finish_reason or piece.logprob:
                logprobs = self._logprobs([piece], offsets[index]) if self.logprobs else None
                yield self._event(self._chunk(piece.text, logprobs, piece.finish_reason, index))
                offsets[index] += len(piece.text)
            finished += piece.finish_reason is not None
            if finished == job.n:
                break
        if include_usage:
            yield self._event({"id": self.id, "object": self._chunk_kind(),
                               "created": self.created, "model": self.model, "choices": [],
                               "usage": usage(job)})
        yield "data: [DONE]\n\n"

    def _tool_events(self, parser, piece):
        """The chunks of one piece when tools are on: content, then each call whole (name and
        arguments in one delta, as a tool_calls entry with its index), then the finish."""
        content, calls = parser.feed(piece.text)
        finish, index = piece.finish_reason, piece.index
        if finish:
            content += parser.finish()[0]
        if content or piece.logprob:
            logprobs = self._logprobs([piece], 0) if self.logprobs else None
            yield self._event(self._chunk(content, logprobs, None, index))
        for call in calls:
            number = self.calls.get(index, 0)
            self.calls[index] = number + 1
            yield self._event(self._chunk({"tool_calls": [dict(call, index=number)]}, None, None,
                                          index))
        if finish:
            finish = "tool_calls" if finish == "stop" and parser.called else finish
            yield self._event(self._chunk("", None, finish, index))

    def _chunk_kind(self):
        return "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"

    def _chunk(self, content, logprobs, finish_reason, index=0):
        if self.kind == "text_completion":
            choice = {"index": index, "text": content}
        else:
            delta = content if isinstance(content, dict) else \
                ({"content": content} if content else {})
            choice = {"index": index, "delta": delta}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return {"id": self.id, "object": self._chunk_kind(), "created": self.created,
                "model": self.model, "choices": [choice]}

    def _logprobs(self, pieces, offset):
        scored = [p.logprob for p in pieces if p.logprob is not None]
        if self.kind == "chat.completion":
            return {"content": [
                {"token": text, "logprob": value, "bytes": list(text.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                  for t, v in top]}
                for text, value, top in scored]}
        offsets = []
        for p in pieces:
            if p.logprob is not None:
                offsets.append(offset)
            offset += len(p.text)
        return {"tokens": [text for text, _, _ in scored],
                "token_logprobs": [value for _, value, _ in scored],
                "top_logprobs": [dict(top) for _, _, top in scored],
                "text_offset": offsets}

    @staticmethod
    def _event(data):
        return f"data: {json.dumps(data)}\n\n"


def usage(job):
    return {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt) + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


# ---- authentication and body size, before any route ------------------------------------------

class Guard:
    """ASGI middleware: with an API key, a request without `Authorization: Bearer KEY` is a
    401 (compared in constant time); a body over `max_body_bytes` is a 413, whether announced
    by Content-Length or streamed, and is never held whole beyond that."""

    def __init__(self, app, api_key, max_body_bytes):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.key = None if api_key is None else _digest(b"Bearer " + api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and \
                not hmac.compare_digest(_digest(headers.get(b"authorization", b"")), self.key):
            return await error_response(401, "a valid API key is needed: "
                                             "Authorization: Bearer KEY")(scope, receive, send)
        length = headers.get(b"content-length", b"")  # the HTTP parser checked its form
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        message = f"the request body is over {self.max_body_bytes} bytes (--max-body-bytes)"
        await error_response(413, message)(scope, receive, send)


def _digest(value):
    return hashlib.sha256(value).digest()
