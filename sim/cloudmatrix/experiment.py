"""The paper's comparison on a CloudMatrix384-scale deployment: flex co-location against the best static PD
disaggregation, throughput at the SLO, per workload; and how the gain moves with the constants nobody published.

Throughput at the SLO: the output tokens per second a deployment sustains (sim/run.Outcome.summary's steady-state
count) at the highest request rate at which at least `ATTAINMENT` of requests meet both the TTFT and the TPOT
objective (deployment.SLO). The rate is searched by bisection from the deployment's steady-state capacity (the
published-figure model's tokens/s per NPU for each phase). The static split is searched in two stages: every P:D
split the instance sizes allow is ranked by its steady-state capacity, and the best `SPLITS` are simulated.

Runs are independent: they fan out over local processes by default, or over a Dask cluster when asked (engine
"dask": `pip install flexnpu[cluster]`; a scheduler address, or a local cluster). Dask, not Ray: the work is a map of
a pure function over picklable arguments, which dask.distributed's Client.map is in full, installed with pip and
run on any machine with Python; Ray's runtime (its object store and daemons) buys nothing here.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from sim.cloudmatrix.costs import Sizes
from sim.cloudmatrix.deployment import (
    SLO,
    Deployment,
    Setup,
    decode_point,
    prefill_point,
    splits,
)
from sim.run import Workload, simulate
from workloads.traffic import Lengths

ATTAINMENT = 0.9  # share of requests that must meet the SLO
SPLITS = 2  # static splits simulated (the best by steady-state capacity)
WORKLOADS = {
    # prompt NPU-time about equal to output NPU-time at the published per-NPU rates (1024/6,688 vs 256/1,943 s)
    "balanced": Lengths.fixed(1024, 256),
    # CloudMatrix-Infer's own shape: prefill needs five times decode's NPUs
    "prompt-heavy": Lengths.fixed(4096, 256),
}
ENGINES = ("processes", "dask")


@dataclass(frozen=True)
class Search:
    seconds: float = 30.0  # modeled seconds of arrivals per run (requests last 5-15 s)
    steps: int = 3  # bisection steps on the rate: a resolution of about a tenth of the capacity
    seed: int = 0


def fan_out(fn: Callable, items: Iterable, engine: str = "processes", address: str | None = None) -> list:
    """fn over items, in parallel: local processes, or Dask (`address`: a scheduler; None: a local cluster)."""
    items = list(items)
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: have {', '.join(ENGINES)}")
    if engine == "dask":
        try:
            from dask.distributed import Client
        except ImportError:
            raise RuntimeError("engine dask needs dask.distributed: pip install 'flexnpu[cluster]'") from None
        with Client(address) if address else Client(processes=True) as client:
            return client.gather(client.map(fn, items, pure=False))
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(item) for item in items]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(fn, items, chunksize=1)


def capacity(deployment: Deployment, lengths: Lengths) -> float:
    """Requests per second the deployment sustains in steady state (published-figure model, no queueing)."""
    prompt, output = lengths.prompt.mean, lengths.output.mean
    setup = deployment.setup
    prefill, decode, _, _ = deployment.groups()
    per_prefill = prefill_point(round(prompt), setup, prefill)["tokens_per_s_per_npu"] / prompt
    per_decode = decode_point(round(prompt), round(output), 2 * deployment.sizes.decode_batch, setup, decode)
    per_decode = per_decode["tokens_per_s_per_npu"] / output
    if deployment.kind == "colocated":
        return deployment.npus / (1 / per_prefill + 1 / per_decode)
    return min(deployment.prefill_npus * per_prefill, (deployment.npus - deployment.prefill_npus) * per_decode)


def run_once(deployment: Deployment, lengths: Lengths, rate: float, search: Search) -> dict:
    """One simulated run at `rate` requests/s; its summary under the SLO."""
    workload = Workload(lengths, rate, max(1, round(rate * search.seconds)), search.seed)
    outcome = simulate(deployment.spec(), workload)
    s = outcome.summary(SLO)
    done = max(s["completed"] + s["failed"], 1)
    return {
        "rate": rate,
        "attainment": s["goodput"] * s["duration_s"] / done,
        "tokens_per_s": s["sustained_tokens_per_s"],
        "ttft_p90_s": s["ttft_s"]["p90"] if s.get("ttft_s") else None,
        "tpot_p90_ms": s["tpot_s"]["p90"] * 1e3 if s.get("tpot_s") else None,
        "wall_s": outcome.wall_s,
        "modeled_s": outcome.duration_s,
    }


def at_slo(args: tuple[Deployment, Lengths, Search]) -> dict:
    """The highest rate meeting the SLO (bisection between half and 1.3x the steady-state capacity) and the
    throughput there."""
    deployment, lengths, search = args
    cap = capacity(deployment, lengths)
    low, high = 0.5 * cap, 1.3 * cap
    best = run_once(deployment, lengths, low, search)
    runs = [best]
    if best["attainment"] < ATTAINMENT:
        return {"best": best, "runs": runs, "capacity_rps": cap}
    for _ in range(search.steps):
        mid = (low + high) / 2
        run = run_once(deployment, lengths, mid, search)
        runs.append(run)
        if run["attainment"] >= ATTAINMENT:
            low, best = mid, run
        else:
            high = mid
    return {"best": best, "runs": runs, "capacity_rps": cap}


def describe(d: Deployment) -> str:
    if d.kind == "colocated":
        return f"flex co-location, {d.npus // d.colocated_group_npus} x EP{2 * d.colocated_group_npus}"
    prefill, decode, np_, nd = d.groups()
    return f"static {d.prefill_npus}P:{d.npus - d.prefill_npus}D ({np_} x EP{prefill.dies}, {nd} x EP{decode.dies})"


def compare(
    npus: int = 384,
    workloads: dict[str, Lengths] = WORKLOADS,
    search: Search = Search(),
    setup: Setup | None = None,
    splits_simulated: int = SPLITS,
    engine: str = "processes",
    address: str | None = None,
) -> dict:
    """Flex co-location vs the best static disaggregation of `npus` NPUs, per workload."""
    setup = setup or Setup()
    jobs, keys = [], []
    for name, lengths in workloads.items():
        static = [Deployment("disaggregated", npus, p, setup=setup) for p in splits(npus)]
        static.sort(key=lambda d: capacity(d, lengths), reverse=True)
        for d in [Deployment("colocated", npus, setup=setup), *static[:splits_simulated]]:
            jobs.append((d, lengths, search))
            keys.append((name, d))
    results = fan_out(at_slo, jobs, engine, address)
    out = []
    for name in workloads:
        mine = [(d, r) for (n, d), r in zip(keys, results, strict=True) if n == name]
        flex = next(r for d, r in mine if d.kind == "colocated")
        statics = [(d, r) for d, r in mine if d.kind == "disaggregated"]
        best_d, best = max(statics, key=lambda dr: dr[1]["best"]["tokens_per_s"])
        s, f = best["best"]["tokens_per_s"], flex["best"]["tokens_per_s"]
        out.append(
            {
                "workload": name,
                "prompt_tokens": workloads[name].prompt.mean,
                "output_tokens": workloads[name].output.mean,
                "static_disaggregation_tok_s": s,
                "flex_colocation_tok_s": f,
                "gain": f / s - 1 if s else None,
                "best_static": describe(best_d),
                "best_static_prefill_npus": best_d.prefill_npus,
                "static_runs": {describe(d): r for d, r in statics},
                "flex_run": flex,
            }
        )
    return {"comparison": out}


SENSITIVITY = {  # constant: values swept (the default first)
    "ub_latency_scale": (1.0, 0.5, 2.0),
    "skew": (0.1, 0.0, 0.2),
    "mtp_acceptance": (0.7, 0.5, 0.9),
}


def sensitivity(
    npus: int,
    workload: str,
    best_static: Deployment,
    search: Search,
    constants: dict[str, tuple] = SENSITIVITY,
    engine: str = "processes",
    address: str | None = None,
) -> list[dict]:
    """The gain of flex over the given static split as each unmeasured constant moves off its default."""
    lengths = WORKLOADS[workload]
    jobs, keys = [], []
    for name, values in constants.items():
        for value in values[1:]:
            setup = replace(Setup(), **{name: value})
            for d in (Deployment("colocated", npus, setup=setup), replace(best_static, setup=setup)):
                jobs.append((d, lengths, search))
                keys.append((name, value, d.kind))
    results = fan_out(at_slo, jobs, engine, address)
    rows: dict[tuple, dict] = {}
    for (name, value, kind), r in zip(keys, results, strict=True):
        rows.setdefault((name, value), {"constant": name, "value": value})[kind] = r["best"]["tokens_per_s"]
    for row in rows.values():
        s, f = row.pop("disaggregated"), row.pop("colocated")
        row |= {"static_disaggregation_tok_s": s, "flex_colocation_tok_s": f, "gain": f / s - 1 if s else None}
    return list(rows.values())


def speed(seconds: float, rate_per_npu: float = 0.75, npus: int = 384) -> dict:
    """Wall time of `seconds` modeled seconds of the default static disaggregation at `rate_per_npu` requests/s per
    NPU (prompt-heavy): what the speed target is measured on."""
    d = Deployment("disaggregated", npus, 224, sizes=Sizes())
    began = time.perf_counter()
    run = run_once(d, WORKLOADS["prompt-heavy"], rate_per_npu * npus, Search(seconds=seconds))
    return {"modeled_s": run["modeled_s"], "arrivals_s": seconds, "wall_s": time.perf_counter() - began}
