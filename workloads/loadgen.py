"""A load generator for the front end, as vLLM's benchmark_serving is: a real HTTP client of `/v1/completions`.

Requests arrive as a Poisson process at `rate` requests/s (exponential gaps, seeded), or all at once when the
rate is infinite (a burst). Prompts are random byte-level token ids, so their lengths are exact; every request
streams with `ignore_eos`, so it runs to its `max_tokens`. Lengths and arrivals come from workloads/traffic.py,
clipped to the model's context (from `/v1/models`).

Measured at the client, per request: TTFT (sent → first token), ITL (gaps between tokens), E2E (sent → last
token), TPOT = (E2E − TTFT) / (output tokens − 1). The server sends one chunk per token (an empty text where
a token ends mid-character), and the usage chunk gives the token count.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import aclosing
from dataclasses import asdict

import httpx
import numpy as np
import trio
from matplotlib.figure import Figure
from tqdm import tqdm

from workloads.tables import plain
from workloads.traffic import DEFAULT_SLO, Lengths, RequestResult, Slo, aggregate, arrival_times, draw_requests


async def _one(client: httpx.AsyncClient, model: str, prompt: list[int], result: RequestResult, t0: float) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": result.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = trio.current_time()
    result.sent_s = sent - t0
    token_times = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text}"
                return
            async with aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    data = line.removeprefix("data: ")
                    if data == line or data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        result.error = chunk["error"]["message"]
                    elif chunk["choices"]:
                        token_times.append(trio.current_time())
                    elif chunk.get("usage"):
                        result.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    if not token_times:
        result.error = result.error or "the stream ended with no token"
        return
    result.output_tokens = result.output_tokens or len(token_times)  # a server that sends no usage chunk
    result.ttft_s = token_times[0] - sent
    result.e2e_s = token_times[-1] - sent
    result.itl_s = np.diff(token_times).tolist()
    if result.output_tokens > 1:
        result.tpot_s = (result.e2e_s - result.ttft_s) / (result.output_tokens - 1)


async def run_load(
    url: str,
    model: str,
    rate: float,
    num_requests: int,
    lengths: Lengths,
    seed: int = 0,
    slo: Slo = DEFAULT_SLO,
    progress: bool = True,
) -> dict:
    """Send `num_requests` streamed completions to the server at `url` and measure them; a JSON-ready dict:
    the settings, the aggregates (seconds; throughputs per second) and every request. A burst's rate is
    `math.inf`, written "inf" in the results (JSON has no infinity)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # no pool queueing skews TTFT
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        served = {m["id"]: m["max_model_len"] for m in response.json()["data"]}
        if model not in served:
            raise ValueError(f"model {model!r} is not served at {url} (have {', '.join(map(repr, served))})")
        max_model_len = served[model]
        requests = draw_requests(lengths, num_requests, seed, max_model_len)
        results = [RequestResult(len(p), o, 0.0) for p, o in requests]
        bar = tqdm(total=num_requests, desc=f"{rate:g} req/s", unit="req", file=sys.stderr, disable=not progress)

        async def send(at: float, prompt: list[int], result: RequestResult) -> None:
            await trio.sleep_until(t0 + at)
            await _one(client, model, prompt, result, t0)
            bar.update()

        t0 = trio.current_time()
        with bar:
            async with trio.open_nursery() as nursery:
                for at, (prompt, _), result in zip(
                    arrival_times(rate, num_requests, seed), requests, results, strict=True
                ):
                    nursery.start_soon(send, at, prompt, result)
        duration_s = trio.current_time() - t0
    return {
        "settings": {
            "url": url,
            "model": model,
            "rate": rate if math.isfinite(rate) else "inf",
            "num_requests": num_requests,
            "lengths": asdict(lengths),
            "seed": seed,
            "slo": asdict(slo),
        },
        **aggregate(results, duration_s, slo),
        "requests": [asdict(r) for r in results],
    }


def _ms(summary: dict, key: str) -> str:
    return "-" if summary[key] is None else f"{summary[key] * 1e3:.1f}"


def render(runs: dict[str, dict], baseline: str | None = None) -> str:
    """A table of runs by label (e.g. a deployment at a rate); goodput also as a ratio to `baseline`'s."""
    rows = [
        ("run", "rate", "done", "req/s", "tok/s", "goodput", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p99")
    ]
    if baseline is not None:
        rows[0] += ("goodput x",)
    for label, r in runs.items():
        row = (
            label,
            str(r["settings"]["rate"]),
            f"{r['completed']}/{r['settings']['num_requests']}",
            f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.0f}",
            f"{r['goodput']:.2f}",
            _ms(r["ttft_s"], "p50"),
            _ms(r["ttft_s"], "p99"),
            _ms(r["tpot_s"], "p50"),
            _ms(r["tpot_s"], "p99"),
            _ms(r["itl_s"], "p99"),
        )
        if baseline is not None:
            base = runs[baseline]["goodput"]
            row += (f"{r['goodput'] / base:.2f}" if base else "-",)
        rows.append(row)
    slo = next(iter(runs.values()))["settings"]["slo"]
    return (
        plain(rows) + f"\nlatencies in ms; goodput: req/s with TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s']} s"
    )


def plot_cdfs(runs: dict[str, dict], path: str) -> None:
    """A PNG of the TTFT and TPOT CDFs, one curve per run, with the SLO as a dashed line. Drawn on a bare
    Figure (the Agg canvas), never pyplot: no global state, no display needed."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    slo = next(iter(runs.values()))["settings"]["slo"]
    for ax, key, limit, title in zip(
        fig.subplots(1, 2), ("ttft_s", "tpot_s"), (slo["ttft_s"], slo["tpot_s"]), ("TTFT", "TPOT"), strict=True
    ):
        for label, r in runs.items():
            values = np.sort([q[key] for q in r["requests"] if q["error"] is None and q[key] is not None])
            ax.step(values * 1e3, np.arange(1, len(values) + 1) / max(len(values), 1), where="post", label=label)
        ax.axvline(limit * 1e3, color="grey", linestyle="--", label="SLO")
        ax.set(title=f"{title} CDF", xlabel=f"{title} (ms)", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, format="png", dpi=100)
