"""`vdevctl bench chaos`: verifying clients under fire, then buffer abuse; nothing wrong, nothing left behind.

For a fixed time N clients (tools/chaos_client.py) each check every result they get (a seeded pattern copied
in, copied across, added by an Add in numeric mode, read back and compared) while, once a second, one of:
a client is killed with SIGKILL (at a random moment of a loop that is copying or launching nearly all the
time) and replaced; garbage, a frame with a wrong length, or a frame announcing 2 GiB is written (each must
be refused with EINVAL and the next frame on the same file answered); a frame announcing 256 MiB is written
in 1 MiB pieces, or copies are asked for and their replies never read, until the buffer limit refuses. At 20 %
and 70 % into the run one physical NPU's process is killed with SIGKILL (vdevfsd restarts it; its clients are told
their device was lost and start over, the other NPU's must see no error); once, 40 % into the run, the daemon
itself is killed with SIGKILL and restarted on its mount point; its clients are told their device was lost and
start over. Then the abuse phase measures daemon RSS while 8 sessions leave
copies of freed device memory unread and 8 send unfinished 256 MiB frames, with the default [daemon] buffer
limits and, as the baseline from the same run, on a daemon whose limits are out of reach. Last, the tenant
phase (issue 15), on a daemon of its own in timing mode at real time: one tenant's graphs that replay graphs,
streams and events and sessions until refused, copies queued behind kernels, each while another process's
client times its memset + synchronize on the same chip (tools/chaos_bystander.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from interposer import limits, wire
from interposer.config import Config
from interposer.shim.flexnpu_client.client import FileTransport
from tools import chaos_abuse, launch
from tools.chaos_abuse import DEVICES, Vandal
from tools.chaos_client import GONE_EXIT
from workloads.tables import plain

CONFIG = """
[daemon]
time_scale = 0

[[physical]]
name = "npu0"
chip = "910B2"
mode = "numeric"

[[virtual]]
name = "davinci0"
physical = "npu0"
memory = "2GiB"

[[virtual]]
name = "davinci1"
physical = "npu0"
memory = "2GiB"

[[physical]]
name = "npu1"
chip = "910B2"
mode = "numeric"

[[virtual]]
name = "davinci2"
physical = "npu1"
memory = "2GiB"
"""
CLIENT_DEVICES = ("davinci0", "davinci2")  # verifying clients on both physical NPUs (each has its process)
MiB = 1 << 20
ABUSERS = 8
TENANT_CONFIG = """
[daemon]
time_scale = 1.0

[[physical]]
name = "npu0"
chip = "910B2"
mode = "timing"

[[virtual]]
name = "davinci0"
physical = "npu0"
memory = "8GiB"

[[virtual]]
name = "davinci1"
physical = "npu0"
memory = "8GiB"
"""


class Sampler(threading.Thread):
    """Daemon RSS, open file descriptors and buffer bytes held, every 50 ms (the pid changes on a restart): of
    vdevfsd and its NPU processes together (where the sessions' buffers are)."""

    def __init__(self, pid: int, mount: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.mount = pid, mount
        self.peak_rss = self.peak_fds = self.peak_held = 0
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.generation = 0

    def now(self) -> tuple[float, int]:
        pids = [self.pid, *(p["pid"] for p in _status(self.mount)["physical"] if p.get("pid"))]
        rss = fds = 0
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            rss += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        return rss / 1024, fds

    def sample(self) -> None:
        generation = self.generation
        with contextlib.suppress(OSError, StopIteration, ValueError):  # the daemon may be restarting
            rss, fds = self.now()
            held = _status(self.mount)["daemon"]["buffers"]["held"]
            with self.lock:
                if generation == self.generation:  # not a sample from before a reset_peak
                    self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
                    self.peak_held = max(self.peak_held, held)

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.sample()

    def reset_peak(self) -> None:
        with self.lock:
            self.generation += 1
            self.peak_rss = self.peak_fds = self.peak_held = 0


class Clients:
    """The verifying clients: started, killed and replaced; their reports summed at the end."""

    def __init__(self, mount: Path, reports: Path, deadline: float) -> None:
        self.mount, self.reports, self.deadline = mount, reports, deadline
        self.running: dict[int, subprocess.Popen] = {}
        self.lives = itertools.count()
        self.killed = 0
        self.unexpected_exits: list[str] = []

    def start(self, slot: int) -> None:
        life = next(self.lives)
        node = self.mount / CLIENT_DEVICES[slot % len(CLIENT_DEVICES)]
        seconds = max(0.0, self.deadline - time.monotonic())
        args = [sys.executable, "-m", "tools.chaos_client", str(node), str(life), f"{seconds:.1f}"]
        with open(self.reports / f"{life}.err", "wb") as err:
            self.running[slot] = subprocess.Popen(
                [*args, str(self.reports / f"{life}.json")], stderr=err, cwd=Path(__file__).parent.parent
            )

    def kill_one(self) -> None:
        slot = random.choice(list(self.running))
        self.running[slot].send_signal(signal.SIGKILL)
        self.running[slot].wait()
        self.killed += 1
        self.start(slot)

    def reap(self, restart: bool) -> None:
        for slot, proc in list(self.running.items()):
            if proc.poll() is None:
                continue
            if proc.returncode not in (0, GONE_EXIT, -signal.SIGKILL):
                err = Path(proc.args[-1]).with_suffix(".err").read_text()  # beside the client's report
                self.unexpected_exits.append(f"exit {proc.returncode}: {err[-300:]}")
            del self.running[slot]
            if restart and time.monotonic() < self.deadline - 1:
                self.start(slot)

    def totals(self) -> dict:
        total = {"calls": 0, "rounds": 0, "wrong": 0}
        errors: Counter[str] = Counter()
        for report in self.reports.glob("*.json"):
            data = json.loads(report.read_text())
            for key in total:
                total[key] += data[key]
            errors.update(data["errors"])
        expected = errors.pop("daemon_gone", 0)
        return total | {"lives": len(list(self.reports.glob("*.json"))), "expected_errors": expected, "errors": errors}


def _kill_an_npu_process(mount: Path, turn: int) -> dict:
    """SIGKILL one physical NPU's process (vdevfs/npus.py; in turn, each NPU's): its clients are told their
    device was lost and start over, every other NPU's go on; how long until it serves again."""
    physical = _status(mount)["physical"]
    victim = physical[turn % len(physical)]
    os.kill(victim["pid"], signal.SIGKILL)
    t = time.monotonic()
    while time.monotonic() - t < 60:
        now = next(p for p in _status(mount)["physical"] if p["name"] == victim["name"])
        if now["up"] and now["pid"] != victim["pid"]:
            break
        time.sleep(0.05)
    return {"npu": victim["name"], "pid": victim["pid"], "serving_again_s": time.monotonic() - t}


def _status(mount: Path) -> dict:
    return json.loads((mount / "status").read_text())


def _leftovers(mount: Path, timeout: float = 30.0) -> dict:
    """Sessions, device memory and buffer bytes still held; FUSE releases a killed process's files
    asynchronously, so this waits (with a deadline) for them to reach zero."""
    deadline = time.monotonic() + timeout
    while True:
        status = _status(mount)
        left = {
            "sessions": sum(len(v["sessions"]) for v in status["virtual"]),
            "memory_bytes": sum(v["memory_used"] for v in status["virtual"]),
            "buffer_bytes": status["daemon"]["buffers"]["held"],
        }
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


ABUSES = {
    "unread_copies": "copies of freed memory left unread",
    "frames_256MiB": "unfinished frames announcing 256 MiB",
    "frames_under_limit": "unfinished frames just under the session limit",
}


def _abuse(mount: Path, sampler: Sampler) -> dict:
    """Daemon RSS while ABUSERS sessions each hold what the daemon will take, one way after the other: copies
    of freed device memory left unread, or unfinished frames (of 256 MiB, as in the report that led to the
    limits, and just under the session limit, where the daemon-wide limit is what stops the later ones)."""
    figures: dict = {"rss_idle_MiB": sampler.now()[0]}
    for name in ABUSES:
        _leftovers(mount)  # the sessions of the abuse before are gone, so the peak is this abuse's own
        sampler.reset_peak()
        nodes = [mount / DEVICES[i % 2] for i in range(ABUSERS)]
        if name == "unread_copies":
            sessions = [FileTransport(str(node)) for node in nodes]
            fds, refused = [t.fd for t in sessions], 0
            for transport in sessions:
                # Free the device memory too: the quota then shows 0 bytes used, as in the reported abuse (once
                # the daemon's buffers are full even that small frame may be refused: the memory then stays).
                ptr = chaos_abuse.unread_copies(transport, Config.session_buffer // chaos_abuse.COPY - 1)
                with contextlib.suppress(OSError):
                    chaos_abuse.free(transport, ptr)
        else:
            size = wire.MAX_FRAME if name == "frames_256MiB" else Config.session_buffer - MiB
            opened = [chaos_abuse.unfinished_frame(node, size) for node in nodes]
            fds, refused = [fd for fd, _ in opened], sum(r for _, r in opened)
        sampler.sample()
        figures[name] = {
            "rss_peak_MiB": sampler.peak_rss,
            "held_peak_MiB": sampler.peak_held / MiB,
            "sessions_refused": refused,
        }
        for fd in fds:
            os.close(fd)
    figures["left"] = _leftovers(mount)
    figures["rss_after_MiB"] = sampler.now()[0]
    return figures


def _abuse_without_limits(base: Path) -> dict:
    """The baseline for the abuse figures, from the same run: the same abuse against a daemon whose buffer
    limits are out of reach (1 TiB), which is what every daemon was before it had them."""
    config, mount = base / "unlimited.toml", base / "unlimited"
    config.write_text(CONFIG.replace("[daemon]\n", '[daemon]\nsession_buffer = "1024GiB"\ndaemon_buffer = "1024GiB"\n'))
    with launch.daemon(mount, config, base / "unlimited.log") as proc:
        sampler = Sampler(proc.pid, mount)
        sampler.start()
        try:
            return _abuse(mount, sampler)
        finally:
            sampler.stopped.set()


TENANT_ATTACKS = {
    "graphs": "graphs replaying graphs twice a level, until refused; the largest launched 4 times",
    "objects": "streams, then events, in one session until refused",
    "sessions": "sessions of one user until refused",
    "queued_copies": "16 MiB copies queued behind kernels until refused",
}


def _tenants(base: Path, quick: bool) -> dict:
    """One tenant against the others: each attack while another process's client (tools/chaos_bystander.py,
    on the other virtual NPU of the same chip) times memset + synchronize; daemon RSS before, at its peak
    during each attack and after."""
    config, mount = base / "tenants.toml", base / "tenants"
    config.write_text(TENANT_CONFIG)
    with launch.daemon(mount, config, base / "tenants.log") as proc:
        sampler = Sampler(proc.pid, mount)
        sampler.start()
        try:
            node, other = mount / DEVICES[0], mount / DEVICES[1]
            attacks = {
                "graphs": lambda: chaos_abuse.graph_amplification(node),
                "objects": lambda: chaos_abuse.objects(node, events=2_000 if quick else limits.EVENTS + 1),
                "sessions": lambda: chaos_abuse.sessions(node),
                "queued_copies": lambda: chaos_abuse.queued_copies(node),
            }
            figures: dict = {"rss_idle_MiB": sampler.now()[0]}
            bystander = chaos_abuse.Bystander(other)
            time.sleep(1 if quick else 3)
            figures["alone"] = bystander.stop()
            for name, attack in attacks.items():
                _leftovers(mount)
                sampler.reset_peak()
                bystander = chaos_abuse.Bystander(other)
                t = time.monotonic()
                outcome = attack()
                seconds = time.monotonic() - t
                sampler.sample()
                figures[name] = {
                    **outcome,
                    "seconds": seconds,
                    "rss_peak_MiB": sampler.peak_rss,
                    "held_peak_MiB": sampler.peak_held / MiB,
                    "bystander": bystander.stop(),
                }
            figures["left"] = _leftovers(mount)
            figures["rss_after_MiB"] = sampler.now()[0]
            return figures
        finally:
            sampler.stopped.set()


def run(quick: bool = False, seconds: float | None = None, workers: int | None = None) -> dict:
    seconds = seconds or (30.0 if quick else 150.0)
    workers = workers or (4 if quick else 8)
    random.seed(10)
    with tempfile.TemporaryDirectory(prefix="flexnpu-chaos-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        config, mount, reports, log = base / "chaos.toml", base / "dev", base / "reports", base / "daemon.log"
        config.write_text(CONFIG)
        reports.mkdir()
        proc = stack.enter_context(launch.daemon(mount, config, log))
        sampler = Sampler(proc.pid, mount)
        sampler.start()
        rss_before, fds_before = sampler.now()
        started = time.monotonic()
        clients = Clients(mount, reports, started + seconds)
        vandal = Vandal(mount)
        for slot in range(workers):
            clients.start(slot)
        restarted_after = None
        npu_kills = [0.2, 0.7]  # fractions of the run at which one NPU's process is killed
        npu_restarts: list[dict] = []
        for tick in itertools.count():
            if time.monotonic() >= started + seconds:
                break
            if npu_kills and time.monotonic() >= started + npu_kills[0] * seconds:
                npu_kills.pop(0)
                npu_restarts.append(_kill_an_npu_process(mount, len(npu_restarts)))
            if restarted_after is None and time.monotonic() >= started + 0.4 * seconds:
                proc.kill()
                proc.wait()
                t = time.monotonic()
                proc = stack.enter_context(launch.daemon(mount, config, log))  # recovers the stale mount
                restarted_after = time.monotonic() - t
                sampler.pid = proc.pid
            clients.reap(restart=True)
            if tick % 2 == 0 and clients.running:
                clients.kill_one()
            else:
                vandal.act()
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started) % 1.0))  # the pace of the chaos, once a second
        while clients.running:
            clients.reap(restart=False)
            time.sleep(0.1)
        left = _leftovers(mount)
        rss_after, fds_after = sampler.now()
        chaos_peak = (sampler.peak_rss, sampler.peak_fds)
        abuse = _abuse(mount, sampler)
        sampler.stopped.set()
        recovered = "stale_mount_recovered" in log.read_text()
        totals = clients.totals()
        unlimited = _abuse_without_limits(base)
        tenants = _tenants(base, quick or seconds < 30)
    return {
        "seconds": seconds,
        "clients": workers,
        **totals,
        "clients_killed": clients.killed,
        "unexpected_exits": clients.unexpected_exits,
        "vandal": dict(vandal.done),
        "vandal_unexpected": dict(vandal.unexpected),
        "daemon_restarted_in_s": restarted_after,
        "npu_processes_killed": npu_restarts,
        "stale_mount_recovered": recovered,
        "left": left,
        "daemon_rss_MiB": {"before": rss_before, "peak": chaos_peak[0], "after": rss_after},
        "daemon_fds": {"before": fds_before, "peak": chaos_peak[1], "after": fds_after},
        "abuse": abuse,
        "abuse_without_limits": unlimited,
        "tenants": tenants,
        "limits_MiB": {"session_buffer": Config.session_buffer / MiB, "daemon_buffer": Config.daemon_buffer / MiB},
        "targets": {"wrong": 0, "unexpected errors": 0, "left": "0 sessions, 0 bytes", "rss": "back to idle"},
    }


def render(r: dict) -> str:
    rss, fds, left, abuse = r["daemon_rss_MiB"], r["daemon_fds"], r["left"], r["abuse"]
    unexpected = sum(r["errors"].values()) + sum(r["vandal_unexpected"].values()) + len(r["unexpected_exits"])
    rows = [
        ("what", "value", "target"),
        ("run", f"{r['seconds']:.0f} s, {r['clients']} verifying clients, {r['lives']} client lives", ""),
        ("calls made / rounds verified", f"{r['calls']:,} / {r['rounds']:,}", ""),
        ("wrong results", str(r["wrong"]), "0"),
        ("clients killed (SIGKILL)", str(r["clients_killed"]), ""),
        ("bad frames and buffer fills", ", ".join(f"{k} {v}" for k, v in sorted(r["vandal"].items())), ""),
        *(
            (f"{k['npu']}'s process killed (SIGKILL)", f"serving again in {k['serving_again_s']:.2f} s", "seconds")
            for k in r.get("npu_processes_killed", [])
        ),
        ("daemon killed and restarted", f"once, serving again in {r['daemon_restarted_in_s']:.2f} s", ""),
        ("expected errors (device lost)", str(r["expected_errors"]), ""),
        ("other errors", str(unexpected), "0"),
        (
            "left after: sessions / memory / buffers",
            f"{left['sessions']} / {left['memory_bytes']} / {left['buffer_bytes']} B",
            "0 / 0 / 0",
        ),
        (
            "daemon RSS, all processes: before / peak / after",
            f"{rss['before']:.0f} / {rss['peak']:.0f} / {rss['after']:.0f} MiB",
            "",
        ),
        ("daemon fds: before / peak / after", f"{fds['before']} / {fds['peak']} / {fds['after']}", ""),
    ]
    out = [plain(rows)]
    lim = r["limits_MiB"]

    def column(a: dict) -> list[str]:
        cells = [f"{a['rss_idle_MiB']:.0f} MiB"]
        for name in ABUSES:
            f = a[name]
            refused = f", {f['sessions_refused']} of {ABUSERS} refused" if name != "unread_copies" else ""
            cells.append(f"{f['rss_peak_MiB']:.0f} MiB (held {f['held_peak_MiB']:.0f}{refused})")
        return [*cells, f"{a['rss_after_MiB']:.0f} MiB"]

    labels = ["idle", *(f"{label}: peak" for label in ABUSES.values()), "after"]
    out.append(
        f"\nabuse, {ABUSERS} sessions each: daemon RSS\n"
        + plain(
            [
                ("", f"limits {lim['session_buffer']:.0f} / {lim['daemon_buffer']:.0f} MiB", "no limits (baseline)"),
                *zip(labels, column(abuse), column(r["abuse_without_limits"]), strict=True),
            ]
        )
    )
    out.append("\none tenant against another process's memset + synchronize on the same chip\n" + _render_tenants(r))
    problems = [*r["unexpected_exits"], *r["vandal_unexpected"], *r["errors"]]
    if problems:
        out.append("unexpected:\n  " + "\n  ".join(problems))
    return "\n".join(out)


def _render_tenants(r: dict) -> str:
    t = r["tenants"]

    def other(b: dict) -> str:
        errors = f", {b['errors']} errors" if b["errors"] else ""
        return f"{b['median_ms']:.2f} / {b['max_ms']:.0f} ms{errors}"

    outcome = {
        "graphs": lambda f: (
            f"{f['levels']} levels ({f['largest_tasks']:,} tasks), the next refused {f['refused']}; "
            f"4 launches: sync {f['sync']}"
        ),
        "objects": lambda f: (
            f"{f['streams']:,} streams (then {f['stream_refused']}), {f['events']:,} events"
            + (f" (then {f['event_refused']})" if f["event_refused"] else "")
            + f"; status read in {f['status_s'] * 1e3:.0f} ms"
        ),
        "sessions": lambda f: f"{f['sessions']} sessions, the next refused {f['refused']}",
        "queued_copies": lambda f: (
            f"{f['copies']} copies, the next refused {f['refused']}; {f['held_MiB']:.0f} MiB held"
        ),
    }
    rows = [("attack", "what the daemon did", "other client: median / worst", "daemon RSS peak")]
    rows.append(("none", "", other(t["alone"]), f"{t['rss_idle_MiB']:.0f} MiB idle"))
    for name, label in TENANT_ATTACKS.items():
        f = t[name]
        rows.append((label, outcome[name](f), other(f["bystander"]), f"{f['rss_peak_MiB']:.0f} MiB"))
    left = t["left"]
    rows.append(
        (
            "after",
            f"left: {left['sessions']} sessions, {left['memory_bytes']} B, {left['buffer_bytes']} B held",
            "",
            f"{t['rss_after_MiB']:.0f} MiB",
        )
    )
    return plain(rows)
