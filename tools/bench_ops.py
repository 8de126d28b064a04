"""`vdevctl bench ops`: operator launch cost through the daemon vs direct mode, eager vs graph replay, for the
Python client and the C client (libascendcl.so, clib/bench_client.c) alike; then launches with one and two
physical NPUs busy, each NPU served by its own process or (the baseline, `[daemon] processes = "one"`) every NPU
by vdevfsd alone: launches/s and the serving processes' CPU-seconds per 1,000 launches, from which the scaling to
more NPUs on a host with more cores can be read off (this machine has 2 cores, shared with the clients).

The device is an emulated 910B2 in timing mode with no clock (time_scale 0), so the chip never holds a launch
back: every figure is the software path. Each launch is a small Add (float16[16]) on one stream.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import COMMANDS, Op
from tools import c_client, launch
from workloads.tables import plain

CONFIG = launch.one_npu_config("timing")
TWO_NPUS = """
[daemon]
time_scale = 0
processes = "{processes}"
[[physical]]
name = "npu0"
mode = "timing"
[[physical]]
name = "npu1"
mode = "timing"
[[virtual]]
name = "davinci0"
physical = "npu0"
[[virtual]]
name = "davinci1"
physical = "npu1"
"""
TICK = os.sysconf("SC_CLK_TCK")

ACL_FLOAT16, ACL_FORMAT_ND = 1, 2
GRAPH_OPS = 300


def _figures(runtime: Runtime, launches: int, replays: int) -> dict:
    runtime.set_device(0)
    try:
        stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
        x = runtime.malloc(64, 0)
        operand = (ACL_FLOAT16, ACL_FORMAT_ND, (16,), x)

        def add():
            runtime.launch("Add", [operand, operand], [operand], {}, stream)

        def sync():
            runtime.call(Op.STREAM_SYNC, stream, handle=stream)

        add()
        sync()  # the template is sent once, before timing
        issue, total = [], []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(launches):
                add()
            t_issued = time.perf_counter()
            sync()
            issue.append((t_issued - t) / launches * 1e6)
            total.append(time.perf_counter() - t)

        runtime.call(Op.GRAPH_CAPTURE_BEGIN, stream, stream=stream, mode=0)
        for _ in range(GRAPH_OPS):
            add()
        reply = runtime.call(Op.GRAPH_CAPTURE_END, stream, stream=stream)
        graph = COMMANDS[Op.GRAPH_CAPTURE_END].reply.parse(reply).handle
        runtime.adopt(graph, stream)
        client = runtime.client(stream)
        before = client.records_sent
        runtime.submit(Op.GRAPH_LAUNCH, graph, graph=graph, stream=stream)
        records_per_replay = client.records_sent - before
        sync()
        t = time.perf_counter()
        for _ in range(replays):
            runtime.submit(Op.GRAPH_LAUNCH, graph, graph=graph, stream=stream)
        sync()
        replay_s = (time.perf_counter() - t) / replays
        return {
            "eager_issue_us_per_launch": statistics.median(issue),
            "eager_launches_per_s": launches / statistics.median(total),
            "eager_us_per_launch": statistics.median(total) / launches * 1e6,
            "graph_ops": GRAPH_OPS,
            "graph_records_per_replay": records_per_replay,
            "graph_replay_us": replay_s * 1e6,
            "graph_us_per_op": replay_s / GRAPH_OPS * 1e6,
            "graph_ops_per_s": GRAPH_OPS / replay_s,
        }
    finally:
        runtime.reset_device(0, force=True)


def run(quick: bool = False) -> dict:
    launches, replays = (2000, 10) if quick else (20000, 50)
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(CONFIG)
        c_args = ["ops", str(launches), str(replays)]
        with launch.daemon(Path(tmp) / "dev", config):
            device = str(Path(tmp) / "dev" / "davinci0")
            daemon = _figures(Runtime(devices=[device]), launches, replays)
            c_daemon = c_client.run(c_args, device=device)
        direct = _figures(Runtime(direct=True, devices=["davinci0"], config=str(config)), launches, replays)
        c_direct = c_client.run(c_args, config=config)
        busy = {processes: _busy_npus(Path(tmp), processes, launches) for processes in ("per-npu", "one")}
    overhead = daemon["eager_us_per_launch"] - direct["eager_us_per_launch"]
    return {
        "busy_npus": busy,
        "daemon": daemon,
        "direct": direct,
        "c_daemon": c_daemon,
        "c_direct": c_direct,
        "daemon_overhead_us_per_launch": overhead,
        "c_daemon_overhead_us_per_launch": c_daemon["eager_us_per_launch"] - c_direct["eager_us_per_launch"],
        "targets": {"eager_launches_per_s": ">= 30000 through the daemon", "graph_records_per_replay": "1"},
    }


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _busy_npus(tmp: Path, processes: str, launches: int) -> dict:
    """C clients launching on 1, then 2 physical NPUs at once: launches/s per client, and each serving process's
    CPU-seconds per 1,000 launches (per-npu: each NPU's process; one: vdevfsd, which serves both)."""
    config = tmp / f"busy-{processes}.toml"
    config.write_text(TWO_NPUS.format(processes=processes))
    mount = tmp / f"busy-{processes}"
    figures = {}
    with launch.daemon(mount, config) as proc:
        status = json.loads((mount / "status").read_text())
        servers = [p["pid"] for p in status["physical"]] if processes == "per-npu" else [proc.pid]
        per_client = 3 * launches + 3 + 2 * GRAPH_OPS  # bench_client ops L 1: 3 timed loops, warm-up, capture, replay
        for busy in (1, 2):
            before = [_cpu_s(pid) for pid in servers]
            clients = [c_client.start(["ops", str(launches), "1"], str(mount / f"davinci{i}")) for i in range(busy)]
            results = [c_client.finish(c) for c in clients]
            cpu = [_cpu_s(pid) - b for pid, b in zip(servers, before, strict=True)]
            served = [per_client * busy] if processes == "one" else [per_client] * busy  # the busy NPUs' processes
            figures[str(busy)] = {
                "launches_per_s": [r["eager_launches_per_s"] for r in results],
                "cpu_s_per_1000_launches": [c / n * 1000 for c, n in zip(cpu, served, strict=False)],
            }
    return figures


def _render_busy(busy: dict) -> str:
    rows = [("NPUs busy", "serving", "launches/s per client", "CPU-s per 1,000 launches, per serving process")]
    for processes, label in (("per-npu", "a process per NPU"), ("one", "vdevfsd alone")):
        for n, f in busy[processes].items():
            rows.append(
                (
                    n,
                    label,
                    " / ".join(f"{x:,.0f}" for x in f["launches_per_s"]),
                    " / ".join(f"{x:.3f}" for x in f["cpu_s_per_1000_launches"]),
                )
            )
    return plain(rows)


def render(r: dict) -> str:
    columns = [r["daemon"], r["direct"], r["c_daemon"], r["c_direct"]]

    def row(label: str, key: str, fmt: str, target: str = "") -> tuple[str, ...]:
        # the C client cannot count its records per replay (the library keeps them to itself)
        return (label, *(format(c[key], fmt) if key in c else "-" for c in columns), target)

    table = plain(
        [
            ("what", "Python: daemon", "Python: direct", "C: daemon", "C: direct", "target"),
            row("eager: client issue (us/launch)", "eager_issue_us_per_launch", ".2f"),
            row("eager: launch to completion (us/launch)", "eager_us_per_launch", ".2f"),
            row("eager: launches/s", "eager_launches_per_s", ",.0f", ">= 30,000"),
            row(f"graph of {columns[0]['graph_ops']} ops: records per replay", "graph_records_per_replay", "d", "1"),
            row("graph: replay (us)", "graph_replay_us", ".0f"),
            row("graph: ops/s", "graph_ops_per_s", ",.0f"),
        ]
    )
    return (
        table
        + f"\ndaemon overhead per eager launch: {r['daemon_overhead_us_per_launch']:.2f} us (Python), "
        + f"{r['c_daemon_overhead_us_per_launch']:.2f} us (C)\n\n"
        + "C clients on 1 and 2 physical NPUs at once (vdevfsd alone: its CPU is shared by both NPUs' launches)\n"
        + _render_busy(r["busy_npus"])
    )
