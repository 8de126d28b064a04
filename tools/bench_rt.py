"""`vdevctl bench rt`: the runtime path, each figure beside its baseline from the same run.

- synchronous round trip: bare pyfuse3 echo (write+read) vs a virtual device file vs direct mode;
- batched asynchronous submission, per record, client side (and through to the device);
- memcpy H2D / D2H at 64 MiB through the device file and in direct mode (bare echo as the ceiling);
- daemon RSS in timing mode while 60 GiB of device memory is allocated;
- the C client (libascendcl.so, clib/bench_client.c): its round trip and asynchronous record cost, through the
  device file (on the same CPU as the echo and the daemon) and in direct mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from interposer import config as configuration
from interposer.shim.flexnpu_client.client import FLUSH_RECORDS, Client, FileTransport
from interposer.shim.flexnpu_client.direct import DirectTransport
from interposer.shim.flexnpu_client.runtime import DEVICE_TO_HOST, HOST_TO_DEVICE, Runtime
from interposer.translate import Translator
from interposer.wire import COMMANDS, Op
from tools import c_client, launch
from workloads.tables import plain

CONFIG = """
[daemon]
time_scale = 1.0

[[physical]]
name = "npu0"
chip = "910B2"
mode = "numeric"

[[physical]]
name = "npu1"
chip = "910B2"
mode = "timing"

[[virtual]]
name = "davinci0"
physical = "npu0"

[[virtual]]
name = "davinci1"
physical = "npu1"
"""

COPY = 64 << 20
GiB = 1 << 30


def _interleaved_us(fns: dict, n: int, rounds: int = 25) -> dict[str, float]:
    """Per-call microseconds of each callable: rounds alternate between them (so drift hits all alike), and
    each figure is the median over rounds of the mean time per call."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    per = max(1, n // rounds)
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(per):
                fn()
            samples[name].append((time.perf_counter() - t) / per * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def _pinned(pids: list[int], cpu: int):
    """Run the round-trip comparison with client and servers on one CPU: cross-CPU wake-ups on a small VM
    otherwise swing a round trip by 2x between runs, for echo and daemon alike."""
    everything = os.sched_getaffinity(0)
    if cpu not in everything:
        yield
        return
    for pid in [0, *pids]:
        os.sched_setaffinity(pid, {cpu})
    try:
        yield
    finally:
        for pid in [0, *pids]:
            os.sched_setaffinity(pid, everything)


def _bandwidth(fn, nbytes: int, repeats: int) -> float:
    """Best of `repeats`, in GB/s (10**9 bytes per second)."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _echo_round_trip(fd: int):
    frame = bytes(44)  # the size of a synchronous MEM_INFO request frame

    def round_trip():
        os.write(fd, frame)
        os.read(fd, 1 << 16)

    return round_trip


def _echo_bandwidth(fd: int, repeats: int) -> dict:
    big = bytes(COPY)

    def write_read():
        os.write(fd, big)
        got = 0
        while got < COPY:
            got += len(os.read(fd, COPY))

    return {"write_read_64MiB_GBps": _bandwidth(write_read, 2 * COPY, repeats)}


def _async_figures(client: Client, sustained: int) -> dict:
    """Event records (no device time). `encode`: a batch below the flush threshold, so the figure is the
    client's own cost per record. `sustained`: many batches, so flushes, the daemon's translation and its
    back-pressure are in it. `through device`: the same, until a device synchronisation returns."""
    handle = COMMANDS[Op.EVENT_CREATE].reply.parse(client.call(Op.EVENT_CREATE).payload).handle
    small = FLUSH_RECORDS // 2

    def submit(n: int) -> tuple[float, float]:
        t = time.perf_counter()
        for _ in range(n):
            client.submit(Op.EVENT_RECORD, event=handle, stream=0)
        t_submit = time.perf_counter()
        client.call(Op.DEVICE_SYNC)
        return (t_submit - t) / n * 1e6, (time.perf_counter() - t) / n * 1e6

    encode = statistics.median(submit(small)[0] for _ in range(5))
    runs = [submit(sustained) for _ in range(5)]
    return {
        "async_encode_us_per_record": encode,
        "async_submit_us_per_record": statistics.median(r[0] for r in runs),
        "async_through_device_us_per_record": statistics.median(r[1] for r in runs),
    }


def _memcpy(runtime: Runtime, repeats: int) -> dict:
    runtime.set_device(0)
    try:
        dev = runtime.malloc(COPY, 0)
        host = np.random.default_rng(1).integers(0, 256, COPY, dtype=np.uint8)
        back = np.zeros(COPY, dtype=np.uint8)
        h2d = _bandwidth(lambda: runtime.memcpy(dev, COPY, host.ctypes.data, COPY, HOST_TO_DEVICE), COPY, repeats)
        d2h = _bandwidth(lambda: runtime.memcpy(back.ctypes.data, COPY, dev, COPY, DEVICE_TO_HOST), COPY, repeats)
        if not np.array_equal(host, back):
            raise AssertionError("memcpy bytes came back different")
        runtime.call(Op.FREE, ptr=dev)
        return {"memcpy_h2d_64MiB_GBps": h2d, "memcpy_d2h_64MiB_GBps": d2h}
    finally:
        runtime.reset_device(0)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _daemon_pids(mount: Path, pid: int) -> list[int]:
    """vdevfsd and its NPU processes (vdevfs/npus.py), where the sessions' state lives."""
    physical = json.loads((mount / "status").read_text())["physical"]
    return [pid, *(p["pid"] for p in physical if p.get("pid"))]


def _timing_rss(path: Path, pid: int) -> dict:
    runtime = Runtime(devices=[str(path)])
    runtime.set_device(0)
    pids = _daemon_pids(path.parent, pid)
    try:
        before = sum(_rss_kib(p) for p in pids)
        ptrs = [runtime.malloc(GiB, 0) for _ in range(60)]
        during = sum(_rss_kib(p) for p in pids)
        for ptr in ptrs:
            runtime.call(Op.FREE, ptr=ptr)
        return {
            "allocated_GiB": 60,
            "daemon_processes": len(pids),
            "daemon_rss_before_MiB": before / 1024,
            "daemon_rss_with_60GiB_MiB": during / 1024,
        }
    finally:
        runtime.reset_device(0)


def run(quick: bool = False) -> dict:
    n, batch, repeats = (300, 2000, 2) if quick else (3000, 20000, 5)
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as tmp:
        tmp_path = Path(tmp)
        config_path = tmp_path / "bench.toml"
        config_path.write_text(CONFIG)
        topology = configuration.build(configuration.parse(tomllib.loads(CONFIG)), driver="sync")
        direct_client = Client(DirectTransport(Translator(topology.virtual[0])))
        with launch.echofs(tmp_path / "echo") as echofs, launch.daemon(tmp_path / "dev", config_path) as daemon:
            device_path = tmp_path / "dev" / "davinci0"
            file_client = Client(FileTransport(str(device_path)))
            echo_fd = os.open(tmp_path / "echo" / "echo", os.O_RDWR)
            with _pinned([echofs.pid, daemon.pid], cpu=0):
                rt = _interleaved_us(
                    {
                        "echo": _echo_round_trip(echo_fd),
                        "device_file": lambda: file_client.call(Op.MEM_INFO, attr=1),
                        "direct": lambda: direct_client.call(Op.MEM_INFO, attr=1),
                    },
                    n,
                )
                # The C client runs in a process of its own, so it cannot interleave with the echo: the echo is
                # measured again right after it, and the C figure's ratio is to that one.
                c_file = c_client.run(["rt", str(n)], device=str(device_path))
                c_file["echo_round_trip_us"] = _interleaved_us({"echo": _echo_round_trip(echo_fd)}, n)["echo"]
            echo = {"round_trip_us": rt["echo"]} | _echo_bandwidth(echo_fd, repeats)
            os.close(echo_fd)
            via_file = {"round_trip_us": rt["device_file"]} | _async_figures(file_client, batch)
            via_file |= _memcpy(Runtime(devices=[str(device_path)]), repeats)
            file_client.close()
            rss = _timing_rss(tmp_path / "dev" / "davinci1", daemon.pid)
        direct = {"round_trip_us": rt["direct"]} | _async_figures(direct_client, batch)
        direct |= _memcpy(Runtime(direct=True, devices=["davinci0"], config=str(config_path)), repeats)
        c_direct = c_client.run(["rt", str(n)], config=config_path)
    return {
        "echo": echo,
        "device_file": via_file,
        "direct": direct,
        "c_device_file": c_file,
        "c_direct": c_direct,
        "timing_rss": rss,
        "ratios": {
            "round_trip_vs_echo": via_file["round_trip_us"] / echo["round_trip_us"],
            "round_trip_vs_direct": via_file["round_trip_us"] / direct["round_trip_us"],
            "c_round_trip_vs_echo": c_file["round_trip_us"] / c_file["echo_round_trip_us"],
        },
        "targets": {
            "round_trip_vs_echo": "<= 1.3",
            "async_encode_us_per_record": "<= 10",
            "memcpy_GBps": ">= 1.0 each way",
            "timing_rss": "flat",
        },
        "host": {"cpus": os.cpu_count(), "round_trips_pinned_to_one_cpu": True},
    }


def render(r: dict) -> str:
    e, f, d, rss = r["echo"], r["device_file"], r["direct"], r["timing_rss"]
    rows = [
        ("what", "bare echo", "device file", "direct", "device/echo", "target"),
        (
            "sync round trip (us)",
            f"{e['round_trip_us']:.1f}",
            f"{f['round_trip_us']:.1f}",
            f"{d['round_trip_us']:.1f}",
            f"{r['ratios']['round_trip_vs_echo']:.2f}x",
            "<= 1.3x echo",
        ),
        (
            "C client: sync round trip (us)",
            f"{r['c_device_file']['echo_round_trip_us']:.1f}",
            f"{r['c_device_file']['round_trip_us']:.1f}",
            f"{r['c_direct']['round_trip_us']:.1f}",
            f"{r['ratios']['c_round_trip_vs_echo']:.2f}x",
            "close to echo",
        ),
        (
            "async record, client encode (us)",
            "",
            f"{f['async_encode_us_per_record']:.2f}",
            f"{d['async_encode_us_per_record']:.2f}",
            "",
            "<= 10",
        ),
        (
            "C client: async record, encode (us)",
            "",
            f"{r['c_device_file']['async_encode_us_per_record']:.2f}",
            f"{r['c_direct']['async_encode_us_per_record']:.2f}",
            "",
            "",
        ),
        (
            "async record, sustained submit (us)",
            "",
            f"{f['async_submit_us_per_record']:.2f}",
            f"{d['async_submit_us_per_record']:.2f}",
            "",
            "",
        ),
        (
            "async record, through device (us)",
            "",
            f"{f['async_through_device_us_per_record']:.2f}",
            f"{d['async_through_device_us_per_record']:.2f}",
            "",
            "",
        ),
        (
            "memcpy H2D 64 MiB (GB/s)",
            f"{e['write_read_64MiB_GBps']:.2f}*",
            f"{f['memcpy_h2d_64MiB_GBps']:.2f}",
            f"{d['memcpy_h2d_64MiB_GBps']:.2f}",
            "",
            ">= 1.0",
        ),
        (
            "memcpy D2H 64 MiB (GB/s)",
            "",
            f"{f['memcpy_d2h_64MiB_GBps']:.2f}",
            f"{d['memcpy_d2h_64MiB_GBps']:.2f}",
            "",
            ">= 1.0",
        ),
    ]
    lines = [plain(rows)]
    lines.append("* bare echo: 64 MiB written then read back, bytes both ways per second")
    lines.append(
        f"daemon RSS, timing mode, {rss['daemon_processes']} processes together: "
        f"{rss['daemon_rss_before_MiB']:.0f} MiB before, "
        f"{rss['daemon_rss_with_60GiB_MiB']:.0f} MiB with {rss['allocated_GiB']} GiB allocated"
    )
    return "\n".join(lines)
