"""The OpenAI-compatible HTTP front end: `/v1/completions` (plain and streamed), `/v1/models`, `/metrics`,
`/health`.

A minimal ASGI app on trio rather than a framework: with four routes, the parts that matter are the ones a
framework hides. A request the engine rejects before its first token must still become a 4xx, so a stream's
200 is sent only after that token; and a client that goes away must reach `engine.abort` at once, whatever
ASGI spec version the server speaks (Starlette's StreamingResponse notices a disconnect by a watcher task
below spec 2.4 and only at the next failed send above it, and says nothing of non-streamed requests). Here one
watcher per request cancels its generation on `http.disconnect`, streamed or not.

The watcher stops before a response's last message: that message ends the response, and with `Connection:
close` (or HTTP/1.0) hypercorn then closes the connection and tells the app `http.disconnect`, which a watcher
still running would take for the client going away and cancel the close half-way (the connection stayed open).

Validation (`parse_completion`) is a pure function of the body and the engine; nothing it refuses reaches the
engine. `serve()` runs the app under hypercorn on trio until SIGINT or SIGTERM.

What one client can hold is bounded (`Limits`): a body must arrive whole within `body_timeout_s` (408, and the
connection closes), be at most `max_body` bytes (413), and at most `max_in_flight` completions run at once
(503 past it, at once); request headers must arrive within hypercorn's `keep_alive_timeout` and fit in its
`h11_max_incomplete_size`. hypercorn's own `read_timeout` is not used: it cuts any connection whose client
sends nothing for that long, a streamed completion included.

Health: a supervisor (workloads/deploy.py) calls `Health.down(why)` once an engine process is gone and
`Health.up()` once one serves again, or waits in `Health.wait_down()` to restart or exit. While down, every
route answers 503 with the reason (`/health` included, 200 otherwise) but `/metrics`, which Prometheus must
still scrape: it shows `flexnpu_engine_healthy 0`. Each change is logged.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import hypercorn.trio
import structlog
import trio
from hypercorn.config import Config
from prometheus_client import CONTENT_TYPE_LATEST

from workloads import tokenizer
from workloads.server_metrics import RequestTimer, ServerMetrics
from workloads.serving import Engine, EngineError, RequestRejected

DEFAULT_MAX_TOKENS = 16
KEEP_ALIVE_TIMEOUT_S = 5.0  # an idle connection, or one whose request headers have not all come, is closed
MAX_HEADERS = 16 << 10  # bytes of request line and headers (hypercorn's h11_max_incomplete_size)

log = structlog.get_logger()


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server."""

    max_body: int = 4 << 20  # far above the longest prompt a context of 32768 tokens allows, even as JSON ids
    body_timeout_s: float = 10.0  # the whole body, from the request's head (a 4 MiB body at 400 KB/s)
    max_in_flight: int = 4096  # completions at once (each holds a connection): past it, 503 at once

    @classmethod
    def for_fds(cls, **changes) -> Limits:
        """max_in_flight within half the process's file descriptors (the rest: connections still sending their
        headers, idle keep-alive ones, the engine's pipes and files)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            changes.setdefault("max_in_flight", max(16, min(cls.max_in_flight, soft // 2)))
        return cls(**changes)


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
    except ValueError:  # Python refuses to convert an integer literal this long (a CPU sink: CVE-2020-10735)
        limit = sys.get_int_max_str_digits()
        raise ApiError(400, f"the body holds an integer of more than {limit} digits; no field takes one") from None
    except RecursionError:
        raise ApiError(
            400, "the body nests arrays or objects too deeply to read (a completion request nests 2 levels)"
        ) from None
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


class Health:
    """Whether the engine behind the front end can serve, as its supervisor says (see the module's docstring).
    `down(why)` and `up()` may be called from any trio task of the server's loop; repeating one is a no-op."""

    def __init__(self, logger=None) -> None:
        self.log = logger or log
        self.reason: str | None = None  # why the engine cannot serve; None while it can
        self.since: float | None = None  # when it went down (time.time())
        self._went_down = trio.Event()

    @property
    def ok(self) -> bool:
        return self.reason is None

    def down(self, why: str) -> None:
        if self.reason is not None:
            return
        self.reason, self.since = why, time.time()
        self.log.error("engine_unhealthy", reason=why, effect="every route but /metrics answers 503")
        self._went_down.set()

    def up(self) -> None:
        if self.reason is None:
            return
        self.log.warning("engine_healthy", was=self.reason, down_s=round(time.time() - (self.since or 0), 1))
        self.reason = self.since = None
        self._went_down = trio.Event()

    async def wait_down(self) -> str:
        """Returns why, once the engine is down (at once if it is)."""
        while self.reason is None:
            await self._went_down.wait()
        return self.reason

    def error(self) -> ApiError:
        return ApiError(
            503,
            f"the engine is down ({self.reason}); no request can be served until it is restarted",
            kind="server_error",
        )


class App:
    """The ASGI application. One per engine; its metrics live in `self.metrics.registry`."""

    def __init__(self, engine: Engine, health: Health | None = None, limits: Limits | None = None, logger=None):
        self.engine = engine
        self.log = logger or log
        self.health = health or Health(self.log)
        self.limits = limits or Limits()
        self.metrics = ServerMetrics(engine, lambda: self.health.ok)
        self.in_flight = 0  # completions being read or generated
        self._routes = {
            "/v1/completions": ("POST", self._completions),
            "/v1/models": ("GET", self._models),
            "/metrics": ("GET", self._metrics),
            "/health": ("GET", self._health),
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
        elif not self.health.ok and handler != self._metrics:
            await _send_error(send, self.health.error())
        else:
            started = False

            async def tracked(message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await handler(scope, receive, tracked)
            except Exception as exc:  # a bug: this request fails with a body that says so; the server goes on
                self.log.exception("request_crashed", path=scope["path"])
                if not started:
                    message = f"the server failed this request ({exc!r}); its log has the traceback"
                    await _send_error(send, ApiError(500, message, kind="server_error"))

    async def _health(self, scope, receive, send) -> None:
        await _send_json(send, 200, {"status": "ok"})  # while down, __call__ answers 503 with the reason

    async def _models(self, scope, receive, send) -> None:
        model = {
            "id": self.engine.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "flexnpu",
            "max_model_len": self.engine.max_model_len,  # as vLLM lists it: clients size requests by it
        }
        await _send_json(send, 200, {"object": "list", "data": [model]})

    async def _metrics(self, scope, receive, send) -> None:
        await _send(send, 200, CONTENT_TYPE_LATEST, self.metrics.exposition())

    async def _completions(self, scope, receive, send) -> None:
        if self.in_flight >= self.limits.max_in_flight:
            self.metrics.requests.labels("rejected").inc()
            message = f"the server is at its limit of {self.limits.max_in_flight} requests at once; retry shortly"
            await _send_error(send, ApiError(503, message, kind="server_error"), close=True)
            return
        self.in_flight += 1
        try:
            await self._complete(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _complete(self, scope, receive, send) -> None:
        try:
            body = await _read_body(scope, receive, self.limits)
            if body is None:
                return
            request = parse_completion(body, self.engine)
        except ApiError as e:
            self.metrics.requests.labels("rejected").inc()
            await _send_error(send, e, close=e.status in (408, 413))  # the rest of the body is not read
            return
        self.metrics.prompt_tokens.inc(len(request.prompt))
        run = _Generation(self, request, f"cmpl-{uuid.uuid4().hex}")
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, watching)

            async def send_last_unwatched(message) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    watching.cancel()  # the disconnect that ending the response may bring is not the client's
                await send(message)

            await (run.stream(send_last_unwatched) if request.stream else run.complete(send_last_unwatched))
            nursery.cancel_scope.cancel()


class _Generation:
    """One admitted request: runs the engine's generator, and aborts it unless it ended (finished or failed)."""

    def __init__(self, app: App, request: Completion, request_id: str) -> None:
        self.engine, self.metrics, self.request, self.id = app.engine, app.metrics, request, request_id
        self.log = app.log
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
            self.log.error("request_failed", request_id=self.id, reason=str(e), tokens=self.tokens)
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


async def _read_body(scope, receive, limits: Limits) -> bytes | None:
    """The whole body, or None when the client went away before sending it all. ApiError 413 past
    `limits.max_body` (at once, when the request's content-length says so), 408 past `limits.body_timeout_s`."""
    length = dict(scope.get("headers", ())).get(b"content-length", b"")
    if length.isdigit() and int(length) > limits.max_body:
        raise ApiError(413, f"the body ({int(length)} bytes) is larger than {limits.max_body} bytes")
    body = bytearray()
    with trio.move_on_after(limits.body_timeout_s):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limits.max_body:
                raise ApiError(413, f"the body is larger than {limits.max_body} bytes")
            if not message.get("more_body", False):
                return bytes(body)
    log.info("body_timeout", received=len(body), announced=length.decode(errors="replace"), client=scope.get("client"))
    raise ApiError(
        408,
        f"the request body did not arrive within {limits.body_timeout_s:g} s ({len(body)} bytes came"
        + (f" of {length.decode()}" if length.isdigit() else "")
        + "); send it whole, at once",
    )


async def _cancel_on_disconnect(receive, scope: trio.CancelScope, watching: trio.CancelScope) -> None:
    with watching:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()


async def _send(send, status: int, content_type: str, body: bytes, close: bool = False) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    if close:  # hypercorn closes the connection once this response is sent
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
    await _send(send, status, "application/json", json.dumps(body).encode(), close)


async def _send_error(send, error: ApiError, close: bool = False) -> None:
    await _send_json(send, error.status, error.body(), close)


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
    health: Health | None = None,
    limits: Limits | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `engine` over HTTP until SIGINT or SIGTERM (or cancellation), then stop cleanly: no new
    connections, requests in flight get `grace_s` to finish, then are cancelled (and aborted in the engine).
    `task_status` gets the bound URLs once listening (port 0 picks a free port). `health`: the supervisor's
    (see the module's docstring); `limits`: by default `Limits.for_fds()` once the soft limit on open files is
    raised to the hard one (connections are files)."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace_s
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.h11_max_incomplete_size = MAX_HEADERS
    if limits is None:
        _raise_fd_limit()
        limits = Limits.for_fds()
    app = App(engine, health, limits)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def first_signal() -> None:
            async for _ in signals:
                return

        await hypercorn.trio.serve(app, config, shutdown_trigger=first_signal, task_status=task_status)


def _raise_fd_limit() -> None:
    """Connections are files: take all the open files the hard limit allows (as Go's runtime does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # above the kernel's nr_open: keep the soft limit
            return
        log.info("open_files_limit_raised", was=soft, now=target)
