"""The OpenAI-compatible HTTP front end: `/v1/completions` (plain and streamed), `/v1/models`, `/metrics`.

A minimal ASGI app on trio rather than a framework: with three routes, the parts that matter are the ones a
framework hides. A request the engine rejects before its first token must still become a 4xx, so a stream's
200 is sent only after that token; and a client that goes away must reach `engine.abort` at once, whatever
ASGI spec version the server speaks (Starlette's StreamingResponse notices a disconnect by a watcher task
below spec 2.4 and only at the next failed send above it, and says nothing of non-streamed requests). Here one
watcher per request cancels its generation on `http.disconnect`, streamed or not.

Validation (`parse_completion`) is a pure function of the body and the engine; nothing it refuses reaches the
engine. `serve()` runs the app under hypercorn on trio until SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import hypercorn.trio
import trio
from hypercorn.config import Config
from prometheus_client import CONTENT_TYPE_LATEST

from workloads import tokenizer
from workloads.server_metrics import RequestTimer, ServerMetrics
from workloads.serving import Engine, EngineError, RequestRejected

MAX_BODY = 4 << 20  # far above the longest prompt a context of 32768 tokens allows, even as JSON ids
DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error as OpenAI reports it: HTTP status, message, the offending field (`param`), a type."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class Completion:
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage


def parse_completion(body: bytes, engine: Engine) -> Completion:
    """The request a body asks for, or ApiError naming the field and the value. Unknown fields are ignored, as
    OpenAI clients send sampling options (temperature, ...) this server does not use."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(request).__name__}")
    model = request.get("model")
    if model != engine.model:
        raise ApiError(404, f"model {model!r} does not exist (have {engine.model!r})", "model", "not_found_error")
    max_tokens = request.get("max_tokens", DEFAULT_MAX_TOKENS)
    if type(max_tokens) is not int or max_tokens < 1:  # type(), not isinstance: JSON true is not a count
        raise ApiError(400, f"max_tokens must be an integer > 0, got {max_tokens!r}", "max_tokens")
    flags = {}
    for name in ("stream", "ignore_eos"):
        flags[name] = request.get(name, False)
        if not isinstance(flags[name], bool):
            raise ApiError(400, f"{name} must be true or false, got {flags[name]!r}", name)
    options = request.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, f"stream_options must be {{'include_usage': bool}}, got {options!r}", "stream_options")
    prompt = _prompt_ids(request.get("prompt"), engine.vocab_size)
    if len(prompt) + max_tokens > engine.max_model_len:
        field = "prompt" if len(prompt) >= engine.max_model_len else "max_tokens"
        raise ApiError(
            400,
            f"this model's maximum context length is {engine.max_model_len} tokens, but {len(prompt)} prompt "
            f"tokens + max_tokens={max_tokens} were requested; shorten the prompt or lower max_tokens",
            field,
        )
    return Completion(prompt, max_tokens, flags["ignore_eos"], flags["stream"], options.get("include_usage", False))


def _prompt_ids(prompt: object, vocab_size: int) -> list[int]:
    """One prompt, as text or as token ids. OpenAI's batched forms (a list of prompts) are refused."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(type(i) is int for i in prompt):
        ids = prompt
    else:
        raise ApiError(400, f"prompt must be a string or a list of token ids, got {_short(prompt)}", "prompt")
    if not ids:
        raise ApiError(400, "prompt is empty", "prompt")
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ApiError(400, f"prompt holds token id {i}, outside the vocabulary 0..{vocab_size - 1}", "prompt")
    return ids


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class App:
    """The ASGI application. One per engine; its metrics live in `self.metrics.registry`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = ServerMetrics(engine)
        self._routes = {
            "/v1/completions": ("POST", self._completions),
            "/v1/models": ("GET", self._models),
            "/metrics": ("GET", self._metrics),
        }

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websocket: refused by returning without accepting
        method, handler = self._routes.get(scope["path"], (None, None))
        if handler is None:
            await _send_error(send, ApiError(404, f"no route {scope['path']}", kind="not_found_error"))
        elif scope["method"] != method:
            await _send_error(send, ApiError(405, f"{scope['path']} takes {method}, not {scope['method']}"))
        else:
            await handler(receive, send)

    async def _models(self, receive, send) -> None:
        model = {
            "id": self.engine.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "flexnpu",
            "max_model_len": self.engine.max_model_len,  # as vLLM lists it: clients size requests by it
        }
        await _send_json(send, 200, {"object": "list", "data": [model]})

    async def _metrics(self, receive, send) -> None:
        await _send(send, 200, CONTENT_TYPE_LATEST, self.metrics.exposition())

    async def _completions(self, receive, send) -> None:
        try:
            body = await _read_body(receive)
            if body is None:
                return
            request = parse_completion(body, self.engine)
        except ApiError as e:
            self.metrics.requests.labels("rejected").inc()
            await _send_error(send, e)
            return
        self.metrics.prompt_tokens.inc(len(request.prompt))
        run = _Generation(self, request, f"cmpl-{uuid.uuid4().hex}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await (run.stream(send) if request.stream else run.complete(send))
            nursery.cancel_scope.cancel()


class _Generation:
    """One admitted request: runs the engine's generator, and aborts it unless it ended (finished or failed)."""

    def __init__(self, app: App, request: Completion, request_id: str) -> None:
        self.engine, self.metrics, self.request, self.id = app.engine, app.metrics, request, request_id
        self.model = app.engine.model
        self.created = int(time.time())
        self.done = False
        self.tokens = 0
        self.finish: str | None = None

    async def complete(self, send) -> None:
        text = []
        try:
            async with aclosing(self._pieces()) as pieces:
                async for piece, _ in pieces:
                    text.append(piece)
        except ApiError as e:
            await _send_error(send, e)
            return
        body = self._body([{"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": self.finish}])
        await _send_json(send, 200, body | {"usage": self._usage()})

    async def stream(self, send) -> None:
        async with aclosing(self._pieces()) as pieces:
            try:
                first = await anext(pieces)  # a rejection before the first token is still a 4xx, not an event
            except ApiError as e:
                await _send_error(send, e)
                return
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                await self._chunk(send, *first)
                async for piece, finish in pieces:
                    await self._chunk(send, piece, finish)
            except ApiError as e:
                await _send_event(send, e.body())
            else:
                if self.request.include_usage:
                    await _send_event(send, self._body([]) | {"usage": self._usage()})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _chunk(self, send, piece: str, finish: str | None) -> None:
        await _send_event(send, self._body([{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]))

    async def _pieces(self):
        """(text, finish_reason) per token, one per token even when its text is empty (part of a character),
        so that a client counts tokens by chunks. Raises ApiError for an engine's refusal or failure."""
        timer = RequestTimer(self.metrics, trio.current_time())
        decoder = tokenizer.StreamDecoder()
        r = self.request
        try:
            async with aclosing(self.engine.generate(self.id, r.prompt, r.max_tokens, r.ignore_eos)) as outputs:
                async for output in outputs:
                    timer.token(trio.current_time())
                    self.tokens += 1
                    # The EOS token ends the text; it is counted (usage) but not shown, as OpenAI does.
                    piece = "" if output.finish == "stop" else decoder.push(output.token)
                    if output.finish is not None:
                        self.done, self.finish = True, output.finish
                        timer.finished()
                        yield piece + decoder.flush(), output.finish
                        return
                    yield piece, None
        except RequestRejected as e:
            self.done = True
            self.metrics.requests.labels("rejected").inc()
            raise ApiError(400, f"the engine rejected the request: {e}") from None
        except EngineError as e:
            self.done = True
            self.metrics.requests.labels("failed").inc()
            raise ApiError(503, f"engine error: {e}", kind="server_error") from None
        finally:
            if not self.done:  # cancelled (client gone, server stopping) or the engine ended without a finish
                self.metrics.requests.labels("aborted").inc()
                self.engine.abort(self.id)

    def _body(self, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _usage(self) -> dict:
        prompt_tokens = len(self.request.prompt)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": prompt_tokens + self.tokens,
        }


async def _read_body(receive) -> bytes | None:
    """The whole body, or None when the client went away before sending it all."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
        if not message.get("more_body", False):
            return bytes(body)


async def _cancel_on_disconnect(receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send(send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, body: dict) -> None:
    await _send(send, status, "application/json", json.dumps(body).encode())


async def _send_error(send, error: ApiError) -> None:
    await _send_json(send, error.status, error.body())


async def _send_event(send, body: dict) -> None:
    await send(
        {"type": "http.response.body", "body": b"data: " + json.dumps(body).encode() + b"\n\n", "more_body": True}
    )


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    grace_s: float = 5.0,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `engine` over HTTP until SIGINT or SIGTERM (or cancellation), then stop cleanly: no new
    connections, requests in flight get `grace_s` to finish, then are cancelled (and aborted in the engine).
    `task_status` gets the bound URLs once listening (port 0 picks a free port)."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace_s
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def first_signal() -> None:
            async for _ in signals:
                return

        await hypercorn.trio.serve(App(engine), config, shutdown_trigger=first_signal, task_status=task_status)
