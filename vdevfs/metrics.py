"""The daemon's Prometheus endpoint: `http://HOST:PORT/metrics`, served by hypercorn in a thread of its own.

HTTP is handled off the daemon's event loop: anyone who can reach the port could otherwise slow every device
client by flooding it (found in review: 900 scrapes/s made a client's 300 calls 40x slower, and 404s cost as
much as scrapes). The values come from the daemon's status (its NPU processes asked, or `Topology.status()`),
which only the loop's thread may take (it reads state the loop changes): while someone scrapes, a task in the loop
takes a snapshot at most every REFRESH_S and hands it over (`Snapshot`); a scrape answers with a snapshot no older
than that, so the loop pays one status per REFRESH_S whatever the request rate. Virtual NPUs created or destroyed
at run time appear and vanish with the next snapshot. Utilisation is the daemon's own record of the kernels it
dispatched: modeled device time, not a measurement of hardware. Fields of the status that an older daemon lacks
read as 0 (up: 1).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import hypercorn.trio
import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger()

PHASES = ("prefill", "decode", "unknown")  # of busy core-seconds; cores held now are split prefill / decode
MODELED = "modeled device time from the daemon's own dispatch records, not a hardware counter"


class MetricsError(Exception):
    pass


REFRESH_S = 0.5  # a scrape's values are at most this old; the daemon's loop takes one snapshot per this
IDLE_S = 30.0  # no scrape for this long: no more snapshots until the next one
WAIT_S = 5.0  # a scrape waits this long for a snapshot (the loop busy in a long numeric kernel), then 503s


class Snapshot:
    """The daemon's status, handed from its loop (`keep`) to the metrics thread (`get`)."""

    def __init__(self) -> None:
        self.status: dict | None = None
        self.taken = float("-inf")
        self.wanted = float("-inf")  # the last scrape's time: snapshots are taken only while someone scrapes
        self.fresh = threading.Event()

    def get(self) -> dict:
        self.wanted = time.monotonic()
        if time.monotonic() - self.taken > 2 * REFRESH_S:  # idle until now, or the loop is busy: wait for one
            self.fresh.clear()
            if not self.fresh.wait(WAIT_S):
                raise TimeoutError(f"the daemon took no snapshot of its status within {WAIT_S:g} s")
        assert self.status is not None
        return self.status

    async def keep(self, status: Callable[[], Awaitable[dict]]) -> None:
        """In the daemon's loop: a snapshot every REFRESH_S while scrapes come."""
        while True:
            if time.monotonic() - self.wanted < IDLE_S:
                self.status, self.taken = await status(), time.monotonic()
                self.fresh.set()
            await trio.sleep(REFRESH_S)


class TopologyCollector(Collector):
    def __init__(self, status: Callable[[], dict]) -> None:
        self._status = status

    def collect(self):
        status = self._status()
        physical, virtual = status["physical"], status["virtual"]
        yield from _npu_families(physical)
        yield from _vnpu_families(virtual, {p["name"]: p["cores"]["total"] for p in physical})
        yield GaugeMetricFamily(
            "flexnpu_daemon_sessions", "Sessions open on all virtual NPUs.", sum(len(v["sessions"]) for v in virtual)
        )
        yield GaugeMetricFamily("flexnpu_daemon_vnpus", "Virtual NPUs the daemon serves now.", len(virtual))


def _npu_families(physical: list[dict]):
    npu = ["npu"]
    info = GaugeMetricFamily(
        "flexnpu_npu_info", "Chip and mode of each physical NPU (always 1).", labels=[*npu, "chip", "mode"]
    )
    policy = GaugeMetricFamily(
        "flexnpu_npu_policy_info", "The scheduling policy each NPU runs (always 1).", labels=[*npu, "policy"]
    )
    up = GaugeMetricFamily(
        "flexnpu_npu_up", "1 while the NPU can serve; 0 while its virtual NPUs are unhealthy.", labels=npu
    )
    cores = GaugeMetricFamily("flexnpu_npu_cores", "AI (cube) cores of the chip.", labels=npu)
    busy = GaugeMetricFamily(
        "flexnpu_npu_cores_busy",
        "AI cores held now by running kernels, by phase (prefill includes unknown).",
        labels=[*npu, "phase"],
    )
    busy_s = CounterMetricFamily(
        "flexnpu_npu_busy_core_seconds",
        f"AI-core-seconds held by finished kernels, by the kernel's phase; {MODELED}.",
        labels=[*npu, "phase"],
    )
    modeled = CounterMetricFamily(
        "flexnpu_npu_modeled_seconds",
        "The NPU's modeled device clock: average cores held = delta(busy_core_seconds) / delta(this).",
        labels=npu,
    )
    used = GaugeMetricFamily("flexnpu_npu_memory_used_bytes", "Device memory allocated on the NPU.", labels=npu)
    total = GaugeMetricFamily("flexnpu_npu_memory_total_bytes", "Device memory of the NPU.", labels=npu)
    queued = GaugeMetricFamily("flexnpu_npu_queued_tasks", "Tasks waiting for the NPU's scheduler.", labels=npu)
    running = GaugeMetricFamily("flexnpu_npu_running_tasks", "Tasks running on the NPU.", labels=npu)
    for p in physical:
        name = [p["name"]]
        info.add_metric([*name, p["chip"], p["mode"]], 1)
        policy.add_metric([*name, p["policy"]], 1)
        up.add_metric(name, int(p.get("up", True)))
        cores.add_metric(name, p["cores"]["total"])
        for phase in ("prefill", "decode"):
            busy.add_metric([*name, phase], p["cores"][phase])
        held = p.get("busy_core_seconds", {})
        for phase in PHASES:
            busy_s.add_metric([*name, phase], held.get(phase, 0.0))
        modeled.add_metric(name, p["modeled_time_s"])
        used.add_metric(name, p["memory_used"])
        total.add_metric(name, p["memory_total"])
        queued.add_metric(name, p["queued"])
        running.add_metric(name, p["running"])
    return info, policy, up, cores, busy, busy_s, modeled, used, total, queued, running


def _vnpu_families(virtual: list[dict], chip_cores: dict[str, int]):
    labels = ["vnpu", "npu"]
    info = GaugeMetricFamily("flexnpu_vnpu_info", "Role of each virtual NPU (always 1).", labels=[*labels, "role"])
    used = GaugeMetricFamily("flexnpu_vnpu_memory_used_bytes", "Device memory the virtual NPU holds.", labels=labels)
    quota = GaugeMetricFamily(
        "flexnpu_vnpu_memory_quota_bytes", "Device memory the virtual NPU may hold.", labels=labels
    )
    sessions = GaugeMetricFamily("flexnpu_vnpu_sessions", "Sessions open on the virtual NPU.", labels=labels)
    kernels = CounterMetricFamily("flexnpu_vnpu_kernels", "Kernels of the virtual NPU that finished.", labels=labels)
    busy_s = CounterMetricFamily(
        "flexnpu_vnpu_busy_core_seconds",
        f"AI-core-seconds held by the virtual NPU's finished kernels; {MODELED}.",
        labels=labels,
    )
    limit = GaugeMetricFamily(
        "flexnpu_vnpu_core_limit",
        "AI cores each kernel of the virtual NPU may hold (the chip's when uncapped).",
        labels=labels,
    )
    for v in virtual:
        name = [v["name"], v["physical"]]
        info.add_metric([*name, v["role"]], 1)
        used.add_metric(name, v["memory_used"])
        quota.add_metric(name, v["memory_quota"])
        sessions.add_metric(name, len(v["sessions"]))
        kernels.add_metric(name, v.get("kernels", 0))
        busy_s.add_metric(name, v.get("busy_core_seconds", 0.0))
        limit.add_metric(name, v.get("cores") or chip_cores[v["physical"]])
    return info, used, quota, sessions, kernels, busy_s, limit


def registry(status: Callable[[], dict]) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(TopologyCollector(status))
    return reg


def listen(address: tuple[str, int]) -> socket.socket:
    """Bind the endpoint now, before the daemon mounts: a bad address stops it with nothing half started."""
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted daemon's old connections linger
        sock.bind((host, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        where = f"metrics address {_hostport(host, port)} (--metrics or [daemon] metrics)"
        raise MetricsError(f"{where}: {_why(exc, host, port)}") from None
    return sock


def _why(exc: OSError, host: str, port: int) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r} ({exc.strerror}); use an IP address of this machine"
    return {
        errno.EADDRINUSE: f"port {port} is in use; choose a free port",
        errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; use one of its own",
        errno.EACCES: f"port {port} needs privileges; choose a port above 1023",
    }.get(exc.errno, f"cannot listen there ({exc.strerror}); choose another HOST:PORT")


async def serve(status: Callable[[], Awaitable[dict]], listener: socket.socket) -> None:
    """Serve the metrics of the daemon's `status` on `listener` (from `listen`) until cancelled."""
    config = HypercornConfig()
    host, port = listener.getsockname()[:2]
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket from here on
    # Hypercorn's own lines through the daemon's log; its "Running on" is the metrics_serving line below.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.errorlog.setLevel(logging.WARNING)
    log.info("metrics_serving", url=f"http://{_hostport(host, port)}/metrics")
    snapshot = Snapshot()
    app = App(registry(snapshot.get))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(snapshot.keep, status)
        # A daemon thread with a trio loop of its own; abandoned (with the process) when the daemon stops.
        await trio.to_thread.run_sync(trio.run, hypercorn.trio.serve, app, config, abandon_on_cancel=True)


class App:
    """ASGI: /metrics is prometheus_client's exposition (text or OpenMetrics, as the scraper asks); else 404."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self._metrics = make_asgi_app(reg)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["path"] == "/metrics":
            try:
                await self._metrics(scope, receive, send)
            except TimeoutError as exc:  # the daemon's loop is busy: say so rather than hang the scraper
                await _plain(send, 503, f"FlexNPU daemon: {exc}")
        else:
            await _plain(send, 404, "FlexNPU daemon: the metrics are at /metrics")


async def _plain(send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode() + b"\n"})


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
