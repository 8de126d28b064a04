"""Simulated experiments: a workload (the load generator's draws) through a SimSpec, sharded over processes.

Results are the load generator's own (`RequestResult`, `aggregate`), in modeled seconds, so a simulated run and a
live one are read the same way. A big deployment can be split into `jobs` shards run in parallel: requests are
dealt round-robin to shards of `npus / jobs` chips each (a front tier of load balancers), then routed least-loaded
within a shard — the one change sharding makes to what is simulated.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field, replace

from sim.serving import SimSpec, Simulation
from workloads.traffic import DEFAULT_SLO, Lengths, RequestResult, Slo, aggregate, arrival_times, draw_lengths


@dataclass(frozen=True)
class Workload:
    lengths: Lengths
    rate: float  # requests per modeled second, over the whole deployment
    num_requests: int
    seed: int = 0

    def requests(self, max_model_len: int) -> list[tuple[float, int, int]]:
        """(arrival, prompt tokens, max tokens): the same draws the load generator makes for the same seed."""
        drawn = draw_lengths(self.lengths, self.num_requests, self.seed, max_model_len)
        times = arrival_times(self.rate, self.num_requests, self.seed)
        return [(t, p, o) for t, (p, o) in zip(times, drawn, strict=True)]


@dataclass
class Outcome:
    results: list[RequestResult]
    duration_s: float  # modeled: until the last request finished
    wall_s: float
    timeline: list[tuple] = field(default_factory=list)  # npu0's kernels: (phase, start, end, cube, vector)

    def summary(self, slo: Slo = DEFAULT_SLO) -> dict:
        """The load generator's aggregate, plus the output tokens per second generated in the steady part of the
        arrivals (their last three quarters; a request's tokens counted as spread evenly between its first and
        last). Over the whole run, the few longest outputs at the end decide the throughput, and counting completed
        requests in a window favours short latencies; tokens generated in a window after the ramp-up do neither,
        and a saturated deployment shows as fewer of them."""
        end = max(r.sent_s for r in self.results)
        start = end / 4
        tokens = 0.0
        for r in self.results:
            if r.error is not None or r.ttft_s is None:
                continue
            first, last = r.sent_s + r.ttft_s, r.sent_s + r.e2e_s
            if last <= first:
                tokens += start <= first <= end
                continue
            rate = (r.output_tokens - 1) / (last - first)
            tokens += (start <= first <= end) + rate * max(0.0, min(last, end) - max(first, start))
        sustained = {"sustained_tokens_per_s": tokens / (end - start) if end > start else 0.0}
        return aggregate(self.results, self.duration_s, slo) | sustained | {"wall_s": self.wall_s}


def _shard(args: tuple[SimSpec, list[tuple[float, int, int]], bool]) -> tuple[list[RequestResult], float, list]:
    spec, requests, timeline = args
    sim = Simulation(spec)
    if timeline:
        sim.chips[0].trace = []
    results = sim.run(requests)
    return results, sim.now, sim.chips[0].trace or []


def simulate(spec: SimSpec, workload: Workload, jobs: int = 1, timeline: bool = False) -> Outcome:
    requests = workload.requests(spec.serve.max_model_len)
    jobs = max(1, min(jobs, spec.npus))
    if spec.npus % jobs or (spec.deployment == "disaggregated" and spec.prefill_chips % jobs):
        raise ValueError(f"{jobs} shards do not divide {spec.npus} NPUs ({spec.prefill_chips} prefill) evenly")
    shard = replace(spec, npus=spec.npus // jobs, prefill_npus=spec.prefill_chips // jobs if spec.prefill_npus else 0)
    work = [(shard, requests[i::jobs], timeline and i == 0) for i in range(jobs)]
    began = time.perf_counter()
    if jobs == 1:
        outs = [_shard(work[0])]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            outs = pool.map(_shard, work)
    results: list[RequestResult] = [None] * len(requests)  # type: ignore[list-item]
    for i, (shard_results, _, _) in enumerate(outs):
        results[i::jobs] = shard_results
    return Outcome(results, max(d for _, d, _ in outs), time.perf_counter() - began, outs[0][2])
