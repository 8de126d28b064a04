"""`vdevctl bench serve`: LLM serving on the emulated NPUs.

1. Overhead: Qwen2.5-7B decode steps (timing mode, batch 32, 1024 cached tokens, the modeled chip at its real
   speed) through the daemon and in direct mode, same run, same modeled chip: tokens/s, wall ms and host work
   per step — launched op by op (eager) and replayed as captured graphs (as the serving engines run them).
2. Serving: each deployment (direct, colocated, disaggregated) behind the real HTTP front end, driven by the load
   generator (a real HTTP client) at several request rates: TTFT, TPOT, ITL, E2E, throughput and goodput, a
   table, JSON and a PNG of TTFT/TPOT CDFs. `time_scale` is chosen so that the host (2 cores here) is never the
   bottleneck: the report gives each decode step's host time beside its modeled time and warns when the host
   could not keep up.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from interposer.shim_env import shim_env
from tools import launch
from workloads.tables import plain


def _generate(env: dict, command: str, **options) -> dict:
    """A step program of its own (workloads/generate.py COMMAND), interposed as `env` says; its JSON line."""
    args = [f"--{k.replace('_', '-')}" + ("" if v is None else f"={v}") for k, v in options.items()]
    done = subprocess.run(
        [sys.executable, "-m", "workloads.generate", command, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"workloads.generate {command} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _decode(env: dict, batch: int, context: int, steps: int, graph: bool) -> dict:
    mode = {"graph": None} if graph else {"eager": None}  # a replay of the batch's captured graph, or a launch per op
    return _generate(env, "decode", batch=batch, context=context, steps=steps, **mode)


def _summary(runs: list[dict], batch: int) -> dict:
    """Per step (the first warms up): wall ms, the host's own work in it (inputs and launches), modeled device
    ms between its events, and tokens/s."""

    def median(key: str) -> float:
        return statistics.median(ms for run in runs for ms in run[key][1:])

    wall = median("host_ms")
    return {
        "wall_ms_per_step": wall,
        "host_work_ms": median("issue_ms"),
        "modeled_ms_per_step": median("device_ms"),
        "tokens_per_s": batch / wall * 1e3,
    }


def overhead(quick: bool) -> dict:
    """Daemon vs direct mode, interleaved, on one modeled chip at its real speed (time_scale 1), for decode steps
    launched op by op (eager) and replayed as captured graphs (as the serving engines run them)."""
    batch, context, steps, rounds = 32, 1024, (4 if quick else 12), (1 if quick else 3)
    modes = {}
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as tmp:
        config = Path(tmp) / "decode.toml"
        config.write_text(launch.one_npu_config("timing", 1.0))
        mount = Path(tmp) / "dev"
        with launch.daemon(mount, config):
            through = shim_env([str(mount / "davinci0")], mount)
            direct = shim_env(["davinci0"], direct=True, config=str(config))
            for graph in (True, False):
                runs: dict[str, list[dict]] = {"daemon": [], "direct": []}
                for _ in range(rounds):
                    runs["daemon"].append(_decode(through, batch, context, steps, graph))
                    runs["direct"].append(_decode(direct, batch, context, steps, graph))
                d, x = (_summary(runs[k], batch) for k in ("daemon", "direct"))
                slower = (x["tokens_per_s"] / d["tokens_per_s"] - 1) * 100
                modes["graph" if graph else "eager"] = {"daemon": d, "direct": x, "daemon_slower_pct": slower}
    return {
        "model": "qwen2.5-7b",
        "batch": batch,
        "context": context,
        "time_scale": 1.0,
        "modes": modes,
        "target": "daemon <= 1 % slower than direct",
    }


# -- the modeled chip beside public serving figures ------------------------------------------------------------


VLLM_ASCEND = "vllm-ascend issue #776 (v0.7.3, Qwen2.5-7B, one 910B, median)"
FIDELITY = [  # (quantity, generate.py command and options, public figure in ms or None, source, note)
    (
        "TPOT, batch 1 (decode step, 1024 cached)",
        ("decode", {"batch": 1}),
        23.4,
        VLLM_ASCEND + ", MindIE Turbo at 1 req/s",
        "served TPOT includes the host's scheduling, sampling and launches; eager mode measured 36.5 ms",
    ),
    (
        "decode step, batch 8",
        ("decode", {"batch": 8}),
        33.4,
        VLLM_ASCEND + ", offline batch 8: 4275 ms for 128 tokens, eager",
        "eager mode launches every op from the host",
    ),
    ("TPOT, batch 32 (decode step, 1024 cached)", ("decode", {"batch": 32}), None, "no public figure found", ""),
    (
        "TTFT, 1k-token prompt (prefill step)",
        ("prefill", {"prompt_len": 1024}),
        None,
        "no public figure found (#776: 97.9 ms median TTFT at 1 req/s, prompt lengths not stated)",
        "",
    ),
    ("TTFT, 4k-token prompt (prefill step)", ("prefill", {"prompt_len": 4096}), None, "no public figure found", ""),
]


def fidelity() -> list[dict]:
    """Modeled device time of the steps the public figures measure, in virtual time (no pacing)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as tmp:
        config = Path(tmp) / "virtual.toml"
        config.write_text(launch.one_npu_config("timing", 0))
        env = shim_env(["davinci0"], direct=True, config=str(config))
        for what, (command, options), public, source, note in FIDELITY:
            extra = {"context": 1024, "steps": 2} if command == "decode" else {}
            result = _generate(env, command, **options, **extra)
            device = result["device_ms"][-1] if command == "decode" else result["device_ms"]
            rows.append(
                {
                    "what": what,
                    "modeled_ms": device,
                    "public_ms": public,
                    "source": source,
                    "note": note,
                    "ratio": device / public if public else None,
                }
            )
    return rows


# -- serving under load ---------------------------------------------------------------------------------------

SERVE_TIME_SCALE = 8.0  # a prefill step's ~50 ms of host work (400 launches) stays well under its paced time


def to_modeled(result: dict, time_scale: float) -> dict:
    """A load run measured in wall time, restated in the emulated chip's modeled time."""
    out = dict(result)
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        out[key] = {k: (v / time_scale if isinstance(v, float) else v) for k, v in result[key].items()}
    for key in ("request_throughput", "output_throughput", "goodput"):
        out[key] = result[key] * time_scale
    slo = {k: v / time_scale for k, v in result["settings"]["slo"].items()}
    out["settings"] = dict(result["settings"], rate=_modeled_rate(result["settings"]["rate"], time_scale), slo=slo)
    out["requests"] = [_scaled(r, time_scale) for r in result["requests"]]
    return out


def _scaled(request: dict, time_scale: float) -> dict:
    times = ("sent_s", "ttft_s", "tpot_s", "e2e_s")
    scaled = {k: (v / time_scale if k in times and v is not None else v) for k, v in request.items()}
    scaled["itl_s"] = [gap / time_scale for gap in request["itl_s"]]
    return scaled


def _modeled_rate(rate, time_scale: float):
    return rate if rate == "inf" else round(rate * time_scale, 6)


async def _serve_and_load(kind: str, spec, rates: list[float], num_requests: int, lengths, slo) -> dict:
    import trio

    from workloads.loadgen import run_load
    from workloads.server import serve
    from workloads.traffic import Slo

    wall_slo = Slo(slo.ttft_s * spec.time_scale, slo.tpot_s * spec.time_scale)  # judged in modeled time
    runs = {}
    async with launch.deployment(kind, spec) as engine, trio.open_nursery() as nursery:
        (url,) = await nursery.start(serve, engine, "127.0.0.1", 0)
        for rate in rates:
            for worker in engine.workers.values():
                worker.timings.clear()
            wall = await run_load(url, engine.model, rate / spec.time_scale, num_requests, lengths, slo=wall_slo)
            run = to_modeled(wall, spec.time_scale)
            run["host_share"] = _host_share(engine, spec.time_scale)
            runs[f"{kind} @ {rate:g}/s"] = run
        nursery.cancel_scope.cancel()
    return runs


def _host_share(engine, time_scale: float) -> dict:
    """Per step kind: the median host work (inputs and launches) beside the step's device time paced to the wall,
    and their ratio: it must stay well under 1 for the emulated device, not the host, to decide the figures."""
    shares = {}
    for kind in ("prefill", "decode"):
        steps = [(h, d * time_scale) for w in engine.workers.values() for k, h, d, _ in w.timings if k == kind]
        if steps:
            host, paced = statistics.median(h for h, _ in steps), statistics.median(p for _, p in steps)
            shares[kind] = {"host_ms": host, "paced_device_ms": paced, "ratio": host / paced if paced else None}
    return shares


def serving(quick: bool, out_png: str) -> dict:
    import trio

    from workloads.loadgen import plot_cdfs
    from workloads.spec import DEPLOYMENTS, ServeSpec
    from workloads.traffic import CONVERSATION, DEFAULT_SLO, Length, Lengths

    if quick:
        rates, num_requests, lengths = [4.0, 16.0], 8, Lengths.fixed(512, 32)
    else:  # the Azure conversation trace, outputs capped at 128 tokens to keep the run within ~20 minutes
        rates, num_requests = [2.0, 4.0, 8.0, 16.0, 32.0], 32
        lengths = Lengths(CONVERSATION.prompt, Length(211, 163, 128))
    spec = ServeSpec.for_model("qwen2.5-7b", time_scale=SERVE_TIME_SCALE)
    runs: dict[str, dict] = {}
    for kind in DEPLOYMENTS:
        runs |= trio.run(_serve_and_load, kind, spec, rates, num_requests, lengths, DEFAULT_SLO)
    plot_cdfs(runs, out_png)
    return {
        "model": spec.model,
        "time_scale": spec.time_scale,
        "lengths": repr(lengths),
        "num_requests": num_requests,
        "rates_modeled": rates,
        "runs": runs,
        "cdf_png": out_png,
    }


def run(quick: bool = False) -> dict:
    return {"overhead": overhead(quick), "fidelity": fidelity(), "serving": serving(quick, "bench-serve-cdf.png")}


def render(r: dict) -> str:
    from workloads.loadgen import render as render_runs

    o = r["overhead"]
    rows = [("decode, qwen2.5-7b, batch 32", "daemon", "direct", "daemon slower")]
    for mode, m in o["modes"].items():
        d, x = m["daemon"], m["direct"]
        rows += [
            (
                f"{mode}: wall ms per step",
                f"{d['wall_ms_per_step']:.2f}",
                f"{x['wall_ms_per_step']:.2f}",
                f"{m['daemon_slower_pct']:+.2f} %",
            ),
            (f"{mode}: host work ms per step", f"{d['host_work_ms']:.2f}", f"{x['host_work_ms']:.2f}", ""),
            (f"{mode}: modeled ms per step", f"{d['modeled_ms_per_step']:.2f}", f"{x['modeled_ms_per_step']:.2f}", ""),
            (f"{mode}: tokens/s", f"{d['tokens_per_s']:.0f}", f"{x['tokens_per_s']:.0f}", ""),
        ]
    fid = plain(
        [("qwen2.5-7b on 910B2, modeled", "modeled ms", "public ms", "ratio", "source")]
        + [
            (
                f["what"],
                f"{f['modeled_ms']:.1f}",
                "-" if f["public_ms"] is None else f"{f['public_ms']:.1f}",
                "-" if f["ratio"] is None else f"{f['ratio']:.2f}",
                f["source"],
            )
            for f in r["fidelity"]
        ]
    )
    notes = "".join(f"\n  {f['what']}: {f['note']}" for f in r["fidelity"] if f["note"])
    sv = r["serving"]
    serving_table = render_runs(sv["runs"], baseline=next(iter(sv["runs"])))
    worst = max(
        (s["ratio"] for run in sv["runs"].values() for s in run["host_share"].values() if s["ratio"]), default=0.0
    )
    host_note = (
        f"host work per step is at most {worst:.0%} of the step's paced device time: the emulated device decides"
        if worst < 0.8
        else f"WARNING: host work reached {worst:.0%} of a step's paced device time: raise SERVE_TIME_SCALE"
    )
    return (
        f"{fid}{notes}\n\n"
        f"Serving {sv['model']} (timing mode), {sv['num_requests']} requests per rate, {sv['lengths']}; rates and "
        f"latencies in modeled time (paced at time_scale {sv['time_scale']}); CDFs: {sv['cdf_png']}\n"
        f"{serving_table}\n{host_note}\n\n"
        f"{plain(rows)}\n{o['context']} cached tokens, the modeled chip at its real speed (time_scale 1); target: "
        "the daemon <= 1 % slower"
    )
