"""The daemon's Prometheus endpoint (vdevfs/metrics.py) without FUSE: the collector over a real topology in timing
mode driven sans-IO, the exposition parsed as Prometheus parses it, the ASGI app, binding errors, the address in
the config and on the command line. A real daemon scraped by a real Prometheus: tests/integration/test_metrics.py."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import httpx
import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from translator_client import Client

from interposer import config, wire
from interposer.wire import Op, OpDescription
from npu.errors import AclError
from tests.conftest import ROOT
from vdevfs import metrics

MiB = 1 << 20
CONFIG = {
    "daemon": {"time_scale": 0},
    "physical": [{"name": "npu0", "mode": "timing"}, {"name": "npu1", "mode": "timing", "policy": "flex"}],
    "virtual": [
        {"name": "davinci0", "physical": "npu0", "memory": "1GiB"},
        {"name": "davinci1", "physical": "npu0", "role": "decode"},
        {"name": "davinci2", "physical": "npu1"},
    ],
}
ADD = OpDescription.build(
    {
        "op_type": "Add",
        "inputs": [{"dtype": 0, "format": 2, "dims": [1024]}] * 2,
        "outputs": [{"dtype": 0, "format": 2, "dims": [1024]}],
        "attrs": [],
    }
)


def scrape(registry) -> dict[str, float]:
    """Every sample as `name{label=value,...}` (labels sorted) -> value, the way Prometheus parses the text."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


@pytest.fixture
def topology():
    return config.build(config.parse(CONFIG), driver="sync")


def run_kernel(topology) -> Client:
    """Allocate 4 MiB on davinci0 and run one Add on it to the end; the session stays open."""
    client = Client(topology.virtual[0], pid=100)
    status, fields = client.call(Op.MALLOC, size=4 * MiB, policy=0)
    assert status == AclError.SUCCESS, fields
    client.send(Op.OP_TEMPLATE, ADD, template=1)
    operands = struct.pack("<3Q", fields.ptr, fields.ptr, fields.ptr)
    client.send(Op.OP_LAUNCH, operands, template=1, stream=0, count=3, limits=wire.OWN_LIMITS)
    assert client.call(Op.STREAM_SYNC, handle=0)[0] == AclError.SUCCESS
    return client


def test_the_exposition_is_the_topology_status_now(topology):
    registry = metrics.registry(topology.status)
    idle = scrape(registry)
    assert idle["flexnpu_vnpu_memory_used_bytes{npu=npu0,vnpu=davinci0}"] == 0
    assert idle["flexnpu_vnpu_memory_quota_bytes{npu=npu0,vnpu=davinci0}"] == 1 << 30
    assert idle["flexnpu_vnpu_sessions{npu=npu0,vnpu=davinci0}"] == 0
    assert idle["flexnpu_npu_policy_info{npu=npu1,policy=flex}"] == 1
    assert idle["flexnpu_vnpu_info{npu=npu0,role=decode,vnpu=davinci1}"] == 1

    client = run_kernel(topology)
    m = scrape(registry)  # read again at the scrape: nothing cached
    status = topology.status()
    vnpu = next(v for v in status["virtual"] if v["name"] == "davinci0")
    npu = next(p for p in status["physical"] if p["name"] == "npu0")
    assert m["flexnpu_vnpu_memory_used_bytes{npu=npu0,vnpu=davinci0}"] == vnpu["memory_used"] >= 4 * MiB
    assert m["flexnpu_npu_memory_used_bytes{npu=npu0}"] == npu["memory_used"] >= 4 * MiB
    assert m["flexnpu_npu_memory_total_bytes{npu=npu0}"] == npu["memory_total"]
    assert m["flexnpu_vnpu_sessions{npu=npu0,vnpu=davinci0}"] == 1
    assert m["flexnpu_daemon_sessions{}"] == 1
    assert m["flexnpu_vnpu_kernels_total{npu=npu0,vnpu=davinci0}"] == vnpu.get("kernels", 0)
    assert m["flexnpu_vnpu_busy_core_seconds_total{npu=npu0,vnpu=davinci0}"] == vnpu.get("busy_core_seconds", 0)
    held = npu.get("busy_core_seconds", {})
    for phase in metrics.PHASES:
        assert m[f"flexnpu_npu_busy_core_seconds_total{{npu=npu0,phase={phase}}}"] == held.get(phase, 0)
    if "kernels" in vnpu:  # the dispatch records (being added to the status): the Add ran and held cores
        assert vnpu["kernels"] >= 1 and vnpu["busy_core_seconds"] > 0
    for phase in ("prefill", "decode"):
        assert m[f"flexnpu_npu_cores_busy{{npu=npu0,phase={phase}}}"] == 0  # nothing runs after the sync
    assert m["flexnpu_vnpu_core_limit{npu=npu0,vnpu=davinci0}"] == npu["cores"]["total"]
    assert m["flexnpu_npu_queued_tasks{npu=npu0}"] == 0 and m["flexnpu_npu_up{npu=npu0}"] == 1
    client.translator.close()
    assert scrape(registry)["flexnpu_vnpu_sessions{npu=npu0,vnpu=davinci0}"] == 0


def test_virtual_npus_that_come_and_go_appear_and_vanish_at_the_next_scrape(topology):
    registry = metrics.registry(topology.status)
    gone = topology.virtual.pop()
    m = scrape(registry)
    assert f"flexnpu_vnpu_memory_quota_bytes{{npu=npu1,vnpu={gone.name}}}" not in m
    assert m["flexnpu_daemon_vnpus{}"] == 2
    topology.virtual.append(gone)
    assert f"flexnpu_vnpu_memory_quota_bytes{{npu=npu1,vnpu={gone.name}}}" in scrape(registry)


class StatusOnly:
    """A topology as the collector sees it: its status, here with the optional fields as given."""

    def __init__(self, physical: dict, virtual: list[dict]) -> None:
        self._status = {"physical": [physical], "virtual": virtual}

    def status(self) -> dict:
        return self._status


PHYSICAL = {
    "name": "npu0",
    "chip": "910B2",
    "mode": "timing",
    "policy": "static",
    "memory_used": 0,
    "memory_total": 64 << 30,
    "queued": 3,
    "running": 2,
    "cores": {"decode": 4, "prefill": 12, "total": 24},
    "modeled_time_s": 2.5,
}
VIRTUAL = {"name": "davinci0", "physical": "npu0", "role": "any", "memory_used": 0, "memory_quota": 1, "sessions": []}


def test_fields_an_older_status_lacks_read_as_zero_and_up():
    m = scrape(metrics.registry(StatusOnly(PHYSICAL, [VIRTUAL]).status))
    assert m["flexnpu_npu_up{npu=npu0}"] == 1
    assert m["flexnpu_vnpu_kernels_total{npu=npu0,vnpu=davinci0}"] == 0
    assert m["flexnpu_vnpu_busy_core_seconds_total{npu=npu0,vnpu=davinci0}"] == 0
    assert m["flexnpu_npu_busy_core_seconds_total{npu=npu0,phase=unknown}"] == 0
    assert m["flexnpu_vnpu_core_limit{npu=npu0,vnpu=davinci0}"] == 24  # no cap: the whole chip
    assert m["flexnpu_npu_cores_busy{npu=npu0,phase=prefill}"] == 12
    assert m["flexnpu_npu_cores_busy{npu=npu0,phase=decode}"] == 4
    assert m["flexnpu_npu_queued_tasks{npu=npu0}"] == 3 and m["flexnpu_npu_running_tasks{npu=npu0}"] == 2
    assert m["flexnpu_npu_modeled_seconds_total{npu=npu0}"] == 2.5


def test_the_dispatch_records_and_the_core_cap_when_the_status_has_them():
    physical = PHYSICAL | {"up": False, "busy_core_seconds": {"prefill": 1.5, "decode": 0.5, "unknown": 0.25}}
    capped = VIRTUAL | {"cores": 6, "kernels": 7, "busy_core_seconds": 3.0, "sessions": [{}, {}]}
    whole = VIRTUAL | {"name": "davinci1", "cores": None}
    m = scrape(metrics.registry(StatusOnly(physical, [capped, whole]).status))
    assert m["flexnpu_npu_up{npu=npu0}"] == 0
    assert m["flexnpu_npu_busy_core_seconds_total{npu=npu0,phase=prefill}"] == 1.5
    assert m["flexnpu_npu_busy_core_seconds_total{npu=npu0,phase=unknown}"] == 0.25
    assert m["flexnpu_vnpu_core_limit{npu=npu0,vnpu=davinci0}"] == 6
    assert m["flexnpu_vnpu_core_limit{npu=npu0,vnpu=davinci1}"] == 24
    assert m["flexnpu_vnpu_kernels_total{npu=npu0,vnpu=davinci0}"] == 7
    assert m["flexnpu_vnpu_busy_core_seconds_total{npu=npu0,vnpu=davinci0}"] == 3.0
    assert m["flexnpu_vnpu_sessions{npu=npu0,vnpu=davinci0}"] == 2 and m["flexnpu_daemon_sessions{}"] == 2


async def test_serve_answers_metrics_at_slash_metrics_on_the_socket_listen_bound(topology):
    listener = metrics.listen(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    async def status() -> dict:
        return topology.status()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(metrics.serve, status, listener)
            async with httpx.AsyncClient(base_url=url) as client:
                ok, other = await client.get("/metrics"), await client.get("/")
            nursery.cancel_scope.cancel()
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(ok.text)}
    assert {"flexnpu_vnpu_memory_used_bytes", "flexnpu_npu_cores_busy", "flexnpu_vnpu_kernels"} <= families
    assert other.status_code == 404 and "/metrics" in other.text


def test_listen_says_what_is_wrong_with_the_address():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(metrics.MetricsError, match=f"127.0.0.1:{port}.*port {port} is in use; choose a free port"):
            metrics.listen(("127.0.0.1", port))
    with pytest.raises(metrics.MetricsError, match="cannot resolve 'no-such-host.invalid'"):
        metrics.listen(("no-such-host.invalid", 9400))
    with pytest.raises(metrics.MetricsError, match="192.0.2.1 is not an address of this machine"):
        metrics.listen(("192.0.2.1", 9400))  # TEST-NET-1: never a local address


@pytest.mark.parametrize(
    ("value", "address"),
    [("127.0.0.1:9400", ("127.0.0.1", 9400)), ("[::1]:9400", ("::1", 9400)), (":9400", ("", 9400)), ("h:0", ("h", 0))],
)
def test_the_address_forms(value, address):
    assert config.address(value) == address
    assert config.parse(CONFIG | {"daemon": {"metrics": value}}).metrics == address


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("nonsense", "must be HOST:PORT"),
        ("127.0.0.1:", "must be HOST:PORT"),
        ("127.0.0.1:65536", "port 0-65535"),
        ("::1:9400", "IPv6 host goes in brackets"),
        (9400, "must be HOST:PORT"),
    ],
)
def test_a_bad_metrics_key_names_the_key_and_the_value(value, why):
    with pytest.raises(config.ConfigError, match=f"daemon.metrics = {value!r}: .*{why}"):
        config.parse(CONFIG | {"daemon": {"metrics": value}})


def test_no_metrics_key_serves_none():
    assert config.parse(CONFIG).metrics is None


def mount(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vdevfs.cli", "mount", str(tmp_path / "mnt"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_daemon_exits_2_before_mounting_on_a_bad_metrics_option(tmp_path):
    bad = mount(tmp_path, "--metrics", "nonsense")
    assert bad.returncode == 2 and "Invalid value for '--metrics': 'nonsense': must be HOST:PORT" in bad.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = mount(tmp_path, "--metrics", f"127.0.0.1:{port}")
    assert busy.returncode == 2
    assert f"vdevfsd: metrics address 127.0.0.1:{port}" in busy.stderr and "choose a free port" in busy.stderr
    assert not (tmp_path / "mnt").exists()  # it stopped before preparing the mount point


def test_the_option_wins_over_the_config(tmp_path):
    """The config's address is busy, the option's is not: a daemon that fails for another reason (the mount
    point is a file) got past the metrics bind, so it used the option's address."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        toml = tmp_path / "m.toml"
        toml.write_text(
            f'[daemon]\nmetrics = "127.0.0.1:{port}"\n[[physical]]\nname = "npu0"\nmode = "timing"\n'
            '[[virtual]]\nname = "davinci0"\nphysical = "npu0"\n'
        )
        assert "is in use" in mount(tmp_path, "--config", str(toml)).stderr
        (tmp_path / "mnt").write_text("")
        result = mount(tmp_path, "--config", str(toml), "--metrics", "127.0.0.1:0")
    assert result.returncode == 2 and "metrics" not in result.stderr and str(tmp_path / "mnt") in result.stderr


def test_scrapes_cost_the_daemons_loop_one_status_per_refresh_whatever_their_rate():
    """HTTP runs in a thread of its own; the loop takes a snapshot every REFRESH_S while scrapes come (found in
    review: a scrape flood in the loop made device clients 40x slower)."""

    class Counting:
        calls = 0

        async def status(self):
            Counting.calls += 1
            return {"physical": [], "virtual": []}

    snapshot = metrics.Snapshot()
    answers = []

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(snapshot.keep, Counting().status)

            def scrape_a_lot():
                for _ in range(200):
                    answers.append(snapshot.get())

            await trio.to_thread.run_sync(scrape_a_lot)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(answers) == 200 and all(a == {"physical": [], "virtual": []} for a in answers)
    assert Counting.calls <= 3  # 200 scrapes in well under a second: one snapshot, maybe two


def test_a_scrape_gives_up_when_the_loop_takes_no_snapshot(monkeypatch):
    monkeypatch.setattr(metrics, "WAIT_S", 0.05)
    with pytest.raises(TimeoutError, match="took no snapshot"):
        metrics.Snapshot().get()
