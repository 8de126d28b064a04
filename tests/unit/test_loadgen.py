"""The load generator: its draws and arithmetic, then real runs against hypercorn on loopback with a fake engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import trio
from fake_engine import FakeEngine

from workloads.loadgen import plot_cdfs, render, run_load
from workloads.server import serve
from workloads.traffic import (
    CODE,
    CONVERSATION,
    Length,
    Lengths,
    RequestResult,
    Slo,
    aggregate,
    arrival_times,
    draw_requests,
)

MODEL = FakeEngine.model


def test_lognormal_keeps_the_traces_mean_and_std():
    rng = np.random.default_rng(1)
    for length in (CONVERSATION.output, CODE.prompt, CODE.output):
        draws = length.draw(rng, 400_000)
        assert draws.min() >= 1
        assert draws.mean() == pytest.approx(length.mean, rel=0.03)
        assert draws.std() == pytest.approx(length.std, rel=0.1)
    assert CONVERSATION.prompt.draw(rng, 100_000).max() <= 14050
    assert (Length(7).draw(rng, 5) == 7).all()


def test_requests_are_seeded_and_fit_the_context():
    a = draw_requests(CONVERSATION, 50, seed=3, max_model_len=512)
    assert a == draw_requests(CONVERSATION, 50, seed=3, max_model_len=512)
    assert a != draw_requests(CONVERSATION, 50, seed=4, max_model_len=512)
    for prompt, max_tokens in a:
        assert 1 <= len(prompt) <= 511 and max_tokens >= 1 and len(prompt) + max_tokens <= 512
        assert all(0 <= i < 256 for i in prompt)
    assert [(len(p), o) for p, o in draw_requests(Lengths.fixed(10, 4), 3, 0, 64)] == [(10, 4)] * 3


def test_arrivals_are_poisson_or_a_burst():
    assert arrival_times(math.inf, 4, seed=0) == [0.0] * 4
    times = arrival_times(50.0, 20_000, seed=0)
    assert times == arrival_times(50.0, 20_000, seed=0) and times[0] == 0.0
    gaps = np.diff(times)
    assert (gaps > 0).all() and gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std = mean


def test_aggregate_percentiles_throughput_and_goodput():
    def done(ttft, tpot, n=11):
        e2e = ttft + tpot * (n - 1)
        return RequestResult(5, n, 0.0, n, ttft, tpot, e2e, [tpot] * (n - 1))

    results = [done(0.1, 0.01), done(0.5, 0.02), done(3.0, 0.01), done(0.2, 0.08), done(1.0, 0.04)]
    results.append(RequestResult(5, 11, 0.0, error="HTTP 503: engine error"))
    a = aggregate(results, duration_s=10.0, slo=Slo())
    assert (a["completed"], a["failed"]) == (5, 1)
    assert a["request_throughput"] == 0.5 and a["output_throughput"] == 5.5
    assert a["goodput"] == pytest.approx(0.3)  # TTFT 3.0 and TPOT 0.08 miss their SLOs
    assert a["ttft_s"]["p50"] == 0.5 and a["ttft_s"]["mean"] == pytest.approx(0.96)
    assert a["tpot_s"]["p99"] == pytest.approx(np.percentile([0.01, 0.02, 0.01, 0.08, 0.04], 99))
    assert aggregate(results, 10.0, Slo(ttft_s=5, tpot_s=0.1))["goodput"] == 0.5


@pytest.fixture
async def server(nursery):
    async def start(engine: FakeEngine) -> str:
        return (await nursery.start(serve, engine, "127.0.0.1", 0))[0]

    yield start
    nursery.cancel_scope.cancel()


async def test_burst_against_a_real_server(server, tmp_path):
    engine = FakeEngine(first_delay=0.2, token_delay=0.01)
    url = await server(engine)
    with trio.fail_after(30):
        r = await run_load(url, MODEL, math.inf, 6, Lengths.fixed(10, 5), seed=0, progress=False)
    json.dumps(r)  # serialisable as is
    assert (r["completed"], r["failed"]) == (6, 0)
    assert all(len(prompt) == 10 and max_tokens == 5 and ignore for _, prompt, max_tokens, ignore in engine.calls)
    for q in r["requests"]:
        assert q["output_tokens"] == 5 and len(q["itl_s"]) == 4
        # Wall time on a shared machine: bounds from the fake's delays, generous above.
        assert 0.2 <= q["ttft_s"] < 2.0
        assert 0.005 <= q["tpot_s"] < 0.5
        assert q["e2e_s"] == pytest.approx(q["ttft_s"] + 4 * q["tpot_s"])
        assert sum(q["itl_s"]) == pytest.approx(q["e2e_s"] - q["ttft_s"])
    assert 0.2 <= r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] < 2.0
    assert r["output_throughput"] == pytest.approx(r["request_throughput"] * 5)
    assert r["goodput"] == r["request_throughput"]  # every request well inside the default SLOs

    # A second deployment: a slower first token, so its TTFT curve lies to the right.
    slow = await server(FakeEngine(first_delay=0.4, token_delay=0.01))
    r2 = await run_load(slow, MODEL, math.inf, 4, Lengths.fixed(10, 5), seed=0, progress=False)
    assert r2["ttft_s"]["p50"] > r["ttft_s"]["p50"]
    table = render({"fast": r, "slow": r2}, baseline="fast")
    assert table.splitlines()[0].split()[:2] == ["run", "rate"] and "goodput x" in table
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["fast", "slow"]
    png = tmp_path / "cdf.png"
    plot_cdfs({"fast": r, "slow": r2}, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_poisson_arrivals_with_trace_lengths_against_a_real_server(server):
    engine = FakeEngine(first_delay=0.05, token_delay=0.002)
    url = await server(engine)
    with trio.fail_after(60):
        r = await run_load(url, MODEL, 20.0, 8, CONVERSATION, seed=7, progress=False)
    assert (r["completed"], r["failed"]) == (8, 0)
    expected = draw_requests(CONVERSATION, 8, seed=7, max_model_len=FakeEngine.max_model_len)
    assert sorted(call[1:3] for call in engine.calls) == sorted(expected)  # clipped to the 64-token context
    arrivals = arrival_times(20.0, 8, seed=7)
    for q, at in zip(r["requests"], arrivals, strict=True):
        assert q["sent_s"] >= at - 1e-3 and q["output_tokens"] == q["max_tokens"]
        assert q["ttft_s"] >= 0.05
    assert r["settings"]["rate"] == 20.0 and r["settings"]["lengths"]["prompt"]["max"] == 14050


async def test_failed_requests_are_counted_not_raised_and_progress_goes_to_stderr(server, capsys):
    url = await server(FakeEngine(fail_after=2))
    r = await run_load(url, MODEL, math.inf, 3, Lengths.fixed(4, 6), seed=0)
    assert "3/3" in capsys.readouterr().err
    assert (r["completed"], r["failed"]) == (0, 3) and r["goodput"] == 0
    assert all("decode process 4242 died" in q["error"] for q in r["requests"])
    assert r["ttft_s"]["p50"] is None and "-" in render({"broken": r})
