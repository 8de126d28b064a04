"""The OpenAI-compatible front end over a fake engine, through ASGI in memory (no sockets), and through serve() on
real sockets on 127.0.0.1 wherever the point is a connection: closing it, stalling it, holding many."""

from __future__ import annotations

import json
import os
import signal
from functools import partial

import httpx
import pytest
import trio
from fake_engine import FakeEngine, expected_text
from prometheus_client.parser import text_string_to_metric_families

from workloads import server
from workloads.server import App, Health, Limits, serve
from workloads.tokenizer import encode

MODEL = FakeEngine.model


def client_for(engine: FakeEngine) -> tuple[App, httpx.AsyncClient]:
    app = App(engine)
    return app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front")


def events(response: httpx.Response) -> list:
    """The data of each server-sent event, JSON-decoded but for the final [DONE]."""
    assert response.headers["content-type"] == "text/event-stream"
    data = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in response.text.split("\n\n") if line)
    return [d if d == "[DONE]" else json.loads(d) for d in data]


async def test_completion_of_a_text_prompt():
    engine = FakeEngine()
    _, client = client_for(engine)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "héllo", "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": expected_text(5), "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}  # é is 2 bytes
    assert engine.calls == [(body["id"], encode("héllo"), 5, False)]


async def test_completion_of_token_ids_defaults_and_eos():
    engine = FakeEngine(eos_after=3)
    _, client = client_for(engine)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 255]})
    body = r.json()
    assert engine.calls[0][1:] == ([1, 2, 255], 16, False)  # max_tokens defaults to 16
    # The EOS token counts as generated but adds no text.
    assert body["choices"][0]["text"] == expected_text(3) and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [7], "max_tokens": 6, "ignore_eos": True})
    assert r.json()["choices"][0]["finish_reason"] == "length" and engine.calls[1][3] is True


async def test_streamed_completion_one_chunk_per_token_then_done():
    engine = FakeEngine()
    _, client = client_for(engine)
    n = 20  # TEXT's multi-byte characters split across tokens: those chunks carry "" until the character is whole
    request = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": n,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await client.post("/v1/completions", json=request)
    assert r.status_code == 200
    got = events(r)
    assert got[-1] == "[DONE]"
    chunks, usage = got[:n], got[n]
    assert {c["id"] for c in got[:-1]} == {engine.calls[0][0]}
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text(n)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (n - 1) + ["length"]
    assert "" in [c["choices"][0]["text"] for c in chunks]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == n
    r = await client.post("/v1/completions", json=request | {"stream_options": None})
    assert len(events(r)) == n + 1  # no usage chunk unless asked for


async def test_models_lists_the_engines_model():
    _, client = client_for(FakeEngine())
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert [(m["id"], m["object"], m["max_model_len"]) for m in r.json()["data"]] == [(MODEL, "model", 64)]


def scrape(text: str) -> dict[str, float]:
    return {
        s.name + "".join(f"{{{k}={v}}}" for k, v in s.labels.items() if k != "le"): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "le" not in s.labels
    }


async def test_metrics_histograms_move_and_gauges_read_the_engine(autojump_clock):
    engine = FakeEngine(first_delay=0.3, token_delay=0.02)
    app, client = client_for(engine)
    before = scrape((await client.get("/metrics")).text)
    assert before["flexnpu_time_to_first_token_seconds_count"] == 0
    assert before["flexnpu_kv_blocks_total"] == 96 and before["flexnpu_num_requests_running"] == 0

    await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 5})
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "b", "max_tokens": 3, "stream": True})
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "", "max_tokens": 3})
    engine.waiting = 7
    engine.started = trio.Event()
    async with trio.open_nursery() as nursery:
        long = {"model": MODEL, "prompt": "c", "max_tokens": 50}
        nursery.start_soon(partial(client.post, "/v1/completions", json=long))
        await engine.started.wait()
        r = await client.get("/metrics")
        nursery.cancel_scope.cancel()
    assert r.headers["content-type"].startswith("text/plain")
    m = scrape(r.text)
    # The clock is trio's mock clock: latencies are exactly the fake's delays.
    assert m["flexnpu_time_to_first_token_seconds_count"] == 3
    assert m["flexnpu_time_to_first_token_seconds_sum"] == pytest.approx(0.9)
    assert m["flexnpu_time_per_output_token_seconds_count"] == 2
    assert m["flexnpu_time_per_output_token_seconds_sum"] == pytest.approx(0.04)
    assert m["flexnpu_inter_token_latency_seconds_count"] == 4 + 2
    assert m["flexnpu_e2e_request_latency_seconds_sum"] == pytest.approx(0.3 + 0.08 + 0.3 + 0.04)
    assert m["flexnpu_requests_total{outcome=finished}"] == 2
    assert m["flexnpu_requests_total{outcome=rejected}"] == 1
    assert m["flexnpu_generation_tokens_total"] == 5 + 3 + 1
    assert m["flexnpu_num_requests_running"] == 1 and m["flexnpu_num_requests_waiting"] == 7
    assert m["flexnpu_kv_blocks_used"] == 4 and m["flexnpu_kv_blocks_total"] == 96
    assert app.metrics.registry is not App(engine).metrics.registry


BAD = [
    (b'{"model": "fake-model", "prompt": "a",', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model", "'gpt-4'"),
    ({"prompt": "a"}, 404, "model", "None"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens", "0"),
    ({"model": MODEL, "prompt": "a", "max_tokens": -3}, 400, "max_tokens", "-3"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens", "2.5"),
    ({"model": MODEL, "prompt": "a", "max_tokens": "8"}, 400, "max_tokens", "'8'"),
    ({"model": MODEL, "prompt": "a", "max_tokens": True}, 400, "max_tokens", "True"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    ({"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
    ({"model": MODEL}, 400, "prompt", "null"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", '["a", "b"]'),
    ({"model": MODEL, "prompt": [1, 260]}, 400, "prompt", "260"),
    ({"model": MODEL, "prompt": [-1]}, 400, "prompt", "-1"),
    ({"model": MODEL, "prompt": "x" * 64, "max_tokens": 1}, 400, "prompt", "64 prompt tokens"),
    ({"model": MODEL, "prompt": "x" * 60, "max_tokens": 5}, 400, "max_tokens", "max_tokens=5"),
    ({"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream", "'yes'"),
    ({"model": MODEL, "prompt": "a", "ignore_eos": 1}, 400, "ignore_eos", "1"),
    ({"model": MODEL, "prompt": "a", "stream_options": {"include_usage": "no"}}, 400, "stream_options", "'no'"),
    # Python's json raises ValueError and RecursionError for these, not JSONDecodeError: once a 500, empty.
    (b'{"model": "fake-model", "prompt": [' + b"1" * 5000 + b"]}", 400, None, "integer of more than 4300 digits"),
    (b'{"model": "fake-model", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "nests"),
]


@pytest.mark.parametrize(("body", "status", "param", "names"), BAD)
async def test_bad_request_is_a_4xx_naming_the_field_and_never_reaches_the_engine(body, status, param, names):
    engine = FakeEngine()
    _, client = client_for(engine)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and names in error["message"] and error["type"].endswith("_error")
    assert engine.calls == []


async def test_prompt_and_max_tokens_filling_the_context_exactly_are_accepted():
    _, client = client_for(FakeEngine())
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 60, "max_tokens": 4})
    assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_rejection_is_a_400(stream):
    engine = FakeEngine(reject=True)
    _, client = client_for(engine)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "stream": stream})
    assert r.status_code == 400
    assert "do not fit in 3 KV blocks" in r.json()["error"]["message"]
    assert engine.aborted == []


async def test_unknown_route_and_wrong_method():
    _, client = client_for(FakeEngine())
    assert (await client.get("/v1/chat")).status_code == 404
    r = await client.get("/v1/completions")
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]


async def test_engine_failure_mid_stream_is_an_error_event_and_the_server_goes_on():
    engine = FakeEngine(fail_after=0)
    _, client = client_for(engine)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "stream": True})
    assert r.status_code == 503  # failed before the first token: no stream was started
    engine.fail_after = 3
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 8, "stream": True})
    got = events(r)
    assert r.status_code == 200 and len(got) == 3 + 2 and got[-1] == "[DONE]"
    assert got[3]["error"]["code"] == 503 and "decode process 4242 died" in got[3]["error"]["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 8})
    assert r.status_code == 503 and "decode process 4242 died" in r.json()["error"]["message"]
    engine.fail_after = None
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert engine.aborted == []


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_request(stream, autojump_clock):
    """Driven at the ASGI level: the client goes away once the first token is out."""
    engine = FakeEngine(token_delay=1.0)
    app = App(engine)
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 1000 // 20, "stream": stream}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await engine.started.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    with trio.fail_after(10):
        await app(scope, receive, send)
    assert engine.aborted == [engine.calls[0][0]] and engine.running == 0
    assert len(sent) == (2 if stream else 0)  # stream: the response start and one chunk
    m = scrape(app.metrics.exposition().decode())
    assert m["flexnpu_requests_total{outcome=aborted}"] == 1


async def test_a_client_closing_its_connection_mid_stream_aborts_the_request():
    """The same through hypercorn, with a bare socket as the client: closing it must reach the app as
    http.disconnect."""
    engine = FakeEngine(token_delay=0.05)
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 60, "stream": True}).encode()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, engine, "127.0.0.1", 0)
        port = int(binds[0].rsplit(":", 1)[1])
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n"
            await stream.send_all(head.encode() + body)
            received = b""
            while b"data: " not in received:
                received += await stream.receive_some()
            await stream.aclose()
            await engine.gone.wait()
        nursery.cancel_scope.cancel()
    assert received.startswith(b"HTTP/1.1 200")
    assert engine.aborted == [engine.calls[0][0]] and engine.running == 0


async def test_serve_listens_on_loopback_and_stops_on_sigterm():
    engine = FakeEngine(eos_after=2)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, engine, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=binds[0]) as client:
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        os.kill(os.getpid(), signal.SIGTERM)
    # serve() returned by itself (nothing cancelled the nursery), and the port is closed.
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=binds[0]) as client:
            await client.get("/v1/models")


async def test_sigterm_aborts_what_is_still_running_after_the_grace_period():
    engine = FakeEngine(token_delay=0.05)
    request = {"model": MODEL, "prompt": "a", "max_tokens": 60, "stream": True}

    async def client_cut_off(url):
        async with httpx.AsyncClient(base_url=url) as client:
            with pytest.raises(httpx.RemoteProtocolError):  # the server closed the connection mid-response
                await client.post("/v1/completions", json=request)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, engine, "127.0.0.1", 0, grace_s=0.2))
            nursery.start_soon(client_cut_off, binds[0])
            await engine.started.wait()
            os.kill(os.getpid(), signal.SIGTERM)
        # Both tasks ended by themselves: serve() after the grace period, the client when its stream was cut.
    assert engine.aborted == [engine.calls[0][0]] and engine.running == 0


# -- one client must not hurt the others (issue 15, item 7) ---------------------------------------------------


class Log:
    """Records what is logged (structlog's capture_logs would leave structlog configured for later tests)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def _record(self, level: str):
        return lambda event, **fields: self.events.append({"event": event, "level": level, **fields})

    def __getattr__(self, level: str):
        return self._record(level)

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]


@pytest.fixture
async def http(nursery):
    """serve() on a free port of 127.0.0.1: yields a function that starts one with the given engine and options
    and returns its port."""

    async def start(engine, **options) -> int:
        binds = await nursery.start(partial(serve, engine, "127.0.0.1", 0, **options))
        return int(binds[0].rsplit(":", 1)[1])

    yield start
    nursery.cancel_scope.cancel()


async def exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back until the server closed the connection (True), or what came
    within a moment of the first response when it did not (False)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    received = b""
    async with stream:
        while True:
            # Only to tell "kept open" from "closed": a closed connection reads EOF at once after the response.
            with trio.move_on_after(2.0 if received else 30.0):
                data = await stream.receive_some()
                if not data:
                    return received, True
                received += data
                continue
            return received, False


def post(body: bytes, version: str = "HTTP/1.1", headers: str = "") -> bytes:
    head = f"POST /v1/completions {version}\r\nhost: x\r\n{headers}content-length: {len(body)}\r\n\r\n"
    return head.encode() + body


COMPLETION = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3}).encode()
STREAMED = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True}).encode()


@pytest.mark.parametrize(
    ("version", "headers", "body"),
    [
        ("HTTP/1.1", "connection: close\r\n", COMPLETION),
        ("HTTP/1.1", "connection: close\r\n", STREAMED),
        ("HTTP/1.0", "", COMPLETION),
        ("HTTP/1.0", "", STREAMED),
    ],
)
async def test_connection_close_and_http_1_0_close_the_connection_once_the_completion_is_sent(
    http, version, headers, body
):
    port = await http(FakeEngine())
    with trio.fail_after(20):
        received, closed = await exchange(port, post(body, version, headers))
    assert received.startswith(b"HTTP/1.1 200") and closed, received[-200:]
    assert (b"data: [DONE]\n\n" in received) if body is STREAMED else received.endswith(b"}}")


async def test_a_kept_alive_connection_still_serves_its_next_request(http):
    port = await http(FakeEngine())
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for _ in range(2):
                await stream.send_all(post(COMPLETION))
                received = b""
                while not received.endswith(b"}}"):
                    received += await stream.receive_some()
                assert received.startswith(b"HTTP/1.1 200")


async def test_a_stalled_body_gets_a_408_and_its_connection_is_closed(http):
    engine = FakeEngine()
    port = await http(engine, limits=Limits(body_timeout_s=0.2))
    with trio.fail_after(20):
        received, closed = await exchange(port, post(COMPLETION)[:-5])  # five bytes of the body never come
    assert received.startswith(b"HTTP/1.1 408") and closed
    error = json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
    assert f"did not arrive within 0.2 s ({len(COMPLETION) - 5} bytes came of {len(COMPLETION)})" in error["message"]
    assert engine.calls == []


async def test_stalled_bodies_hold_at_most_the_in_flight_limit_and_the_rest_are_refused_at_once(http, monkeypatch):
    """The attack that exhausted the file descriptors (1,100 stalled bodies), at the scale of a limit of 4: past
    it a completion is refused at once and its connection closed; once the stalled ones time out, all is served."""
    apps = []
    monkeypatch.setattr(server, "App", lambda *args: apps.append(App(*args)) or apps[-1])  # to see its count
    engine = FakeEngine()
    port = await http(engine, limits=Limits(body_timeout_s=1.0, max_in_flight=4))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            stalled: list[tuple[bytes, bool]] = []

            async def stall() -> None:
                stalled.append(await exchange(port, post(COMPLETION)[:-5]))

            for _ in range(4):
                nursery.start_soon(stall)
            while apps[0].in_flight < 4:  # the four are reading their bodies
                await trio.sleep(0.01)
            refused, closed = await exchange(port, post(COMPLETION))
            assert refused.startswith(b"HTTP/1.1 503") and closed
            assert b"at its limit of 4 requests at once" in refused
        assert [(r[:12], c) for r, c in stalled] == [(b"HTTP/1.1 408", True)] * 4
        served, _ = await exchange(port, post(COMPLETION, headers="connection: close\r\n"))
    assert served.startswith(b"HTTP/1.1 200") and len(engine.calls) == 1


async def test_request_headers_that_never_end_are_cut_by_the_keep_alive_timeout(http, monkeypatch):
    monkeypatch.setattr(server, "KEEP_ALIVE_TIMEOUT_S", 0.2)
    port = await http(FakeEngine())
    with trio.fail_after(20):
        received, closed = await exchange(port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
    assert closed and received == b""


async def test_an_engine_declared_down_makes_every_route_but_metrics_answer_503_and_is_logged():
    engine, log = FakeEngine(), Log()
    health = Health(log)
    app = App(engine, health, logger=log)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front")
    assert (await client.get("/health")).json() == {"status": "ok"}
    health.down("decode worker 4242 died (exit -9)")
    for r in (
        await client.get("/health"),
        await client.get("/v1/models"),
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "a"}),
    ):
        assert r.status_code == 503 and "the engine is down (decode worker 4242 died (exit -9))" in r.text
    assert engine.calls == []
    metrics = scrape((await client.get("/metrics")).text)
    assert metrics["flexnpu_engine_healthy"] == 0
    assert [(e["level"], e["reason"]) for e in log.named("engine_unhealthy")] == [
        ("error", "decode worker 4242 died (exit -9)")
    ]
    assert await health.wait_down() == "decode worker 4242 died (exit -9)"
    health.up()  # the supervisor restarted it
    assert (await client.get("/v1/models")).status_code == 200
    assert scrape((await client.get("/metrics")).text)["flexnpu_engine_healthy"] == 1
    assert log.named("engine_healthy")[0]["was"] == "decode worker 4242 died (exit -9)"


async def test_a_supervisor_waiting_for_the_engine_to_go_down_is_woken_with_why():
    health = Health(Log())
    async with trio.open_nursery() as nursery:
        got = []

        async def supervisor() -> None:
            got.append(await health.wait_down())

        nursery.start_soon(supervisor)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        health.down("prefill worker 17 exited with 1")
    assert got == ["prefill worker 17 exited with 1"]


async def test_an_engine_error_is_logged_with_its_reason():
    engine, log = FakeEngine(fail_after=1), Log()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=App(engine, logger=log)), base_url="http://front")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
    assert r.status_code == 503
    (failed,) = log.named("request_failed")
    assert (failed["level"], failed["reason"], failed["tokens"]) == ("error", "decode process 4242 died", 1)


class CrashingEngine(FakeEngine):
    async def generate(self, request_id, prompt, max_tokens, ignore_eos):
        raise KeyError("a bug")
        yield


async def test_a_bug_in_a_request_answers_500_with_a_body_and_the_server_goes_on():
    log = Log()
    app = App(CrashingEngine(), logger=log)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
    assert r.status_code == 500 and "KeyError('a bug')" in r.json()["error"]["message"]
    assert log.named("request_crashed")[0]["path"] == "/v1/completions"
    assert (await client.get("/v1/models")).status_code == 200
