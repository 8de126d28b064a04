"""The front end's Prometheus metrics, in a registry of its own (two apps in one process never share counts).

Latencies are measured in the front end, where a client sees them: from the request's arrival (after its body
was read and validated) to each token leaving for the client. Buckets follow vLLM's, so dashboards built for
it read these the same way. The engine's state (running, waiting, KV blocks) is read from `engine.stats()`
when Prometheus scrapes, never cached; `flexnpu_engine_healthy` says whether the engine can serve (the server's
`Health`).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from workloads.serving import Engine

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)

OUTCOMES = ("finished", "rejected", "failed", "aborted")  # 200 to the end, 4xx, engine error, client gone


class _EngineCollector:
    def __init__(self, engine: Engine, healthy: Callable[[], bool]) -> None:
        self._engine = engine
        self._healthy = healthy

    def collect(self):
        yield GaugeMetricFamily(
            "flexnpu_engine_healthy",
            "1 while the engine can serve; 0 once its supervisor says it is down.",
            value=int(self._healthy()),
        )
        stats = self._engine.stats()
        for name, doc, value in (
            ("flexnpu_num_requests_running", "Requests the engine is running.", stats.running),
            ("flexnpu_num_requests_waiting", "Requests waiting for the engine to admit them.", stats.waiting),
            ("flexnpu_kv_blocks_used", "KV cache blocks in use.", stats.kv_blocks_used),
            ("flexnpu_kv_blocks_total", "KV cache blocks in all.", stats.kv_blocks_total),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine: Engine, healthy: Callable[[], bool] = lambda: True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "flexnpu_time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "flexnpu_time_per_output_token_seconds",
            "Per finished request: (last token - first token) / (output tokens - 1).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "flexnpu_inter_token_latency_seconds", "Gap between consecutive tokens.", buckets=TOKEN_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "flexnpu_e2e_request_latency_seconds", "Arrival to last token.", buckets=E2E_BUCKETS, registry=r
        )
        self.requests = Counter("flexnpu_requests", "Completion requests by outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # present at 0 from the start, so rates need no special case
        self.prompt_tokens = Counter("flexnpu_prompt_tokens", "Prompt tokens sent to the engine.", registry=r)
        self.generation_tokens = Counter("flexnpu_generation_tokens", "Tokens generated.", registry=r)
        r.register(_EngineCollector(engine, healthy))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's latencies, observed as its tokens go out. Times come from the caller (trio's clock)."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._first: float | None = None
        self._last = arrival
        self.tokens = 0

    def token(self, now: float) -> None:
        m = self._metrics
        if self._first is None:
            self._first = now
            m.ttft.observe(now - self._arrival)
        else:
            m.itl.observe(now - self._last)
        self._last = now
        self.tokens += 1
        m.generation_tokens.inc()

    def finished(self) -> None:
        m = self._metrics
        m.requests.labels("finished").inc()
        m.e2e.observe(self._last - self._arrival)
        if self._first is not None and self.tokens > 1:
            m.tpot.observe((self._last - self._first) / (self.tokens - 1))
