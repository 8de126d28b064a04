"""The daemon's metrics scraped by a real Prometheus: a client holds memory on davinci0, and Prometheus's query API
shows the bytes. The collector's values, one by one, are tested without FUSE in tests/unit/test_metrics.py."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import acl_popen, requires_mount
from tools import launch

pytestmark = requires_mount

PROMETHEUS = Path("/usr/bin/prometheus")
HELD = 3 << 20
QUERY = 'flexnpu_vnpu_memory_used_bytes{vnpu="davinci0"}'
TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prometheus(tmp_path: Path, target: str) -> tuple[subprocess.Popen, str]:
    """A Prometheus scraping `target` every second, on a free port with its storage in tmp_path."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: flexnpu\n    static_configs:\n      - targets: ['{target}']\n"
    )
    address = f"127.0.0.1:{free_port()}"
    args = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
    ]
    with open(tmp_path / "prometheus.log", "wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), f"http://{address}"


def query(url: str) -> list[dict]:
    """The query's samples now, or [] while Prometheus is not answering yet."""
    try:
        response = httpx.get(f"{url}/api/v1/query", params={"query": QUERY}, timeout=5)
    except httpx.TransportError:
        return []
    return response.json()["data"]["result"] if response.status_code == 200 else []


@pytest.mark.skipif(not PROMETHEUS.exists(), reason="needs the Prometheus server: Debian's prometheus package")
def test_prometheus_sees_a_clients_memory_on_davinci0(tmp_path):
    target = f"127.0.0.1:{free_port()}"
    config = tmp_path / "metrics.toml"
    config.write_text(
        f'[daemon]\ntime_scale = 0\nmetrics = "{target}"\n'
        '[[physical]]\nname = "npu0"\nmode = "numeric"\n'
        '[[virtual]]\nname = "davinci0"\nphysical = "npu0"\nmemory = "64MiB"\n'
    )
    mount, log = tmp_path / "mnt", tmp_path / "daemon.log"
    with launch.daemon(mount, config, log):
        server, url = prometheus(tmp_path, target)
        holder = acl_popen(mount, "hold.py", "0", str(HELD), run_opts=("--devices", "0"))
        with server, holder:  # leaving closes their pipes and waits for both
            try:
                line = holder.stdout.readline()
                assert line, f"the client did not start: {holder.communicate(timeout=30)[1]}"
                assert json.loads(line)["devices"] == 1
                status = json.loads((mount / "status").read_text())
                used = next(v["memory_used"] for v in status["virtual"] if v["name"] == "davinci0")
                assert used >= HELD
                deadline, seen = time.monotonic() + TIMEOUT_S, []
                while time.monotonic() < deadline:
                    seen = query(url)
                    if seen and float(seen[0]["value"][1]) == used:
                        break
                    time.sleep(0.25)
                assert seen and float(seen[0]["value"][1]) == used, (
                    f"{QUERY} is {seen} after {TIMEOUT_S:.0f} s, not {used}; "
                    f"Prometheus said: {(tmp_path / 'prometheus.log').read_text()[-2000:]}"
                )
                assert seen[0]["metric"]["npu"] == "npu0"
                out, err = holder.communicate("go\n", timeout=30)
                assert holder.returncode == 0 and out.strip() == "intact", err
            finally:
                for proc in (holder, server):
                    if proc.poll() is None:
                        proc.kill()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [e["url"] for e in events if e["event"] == "metrics_serving"] == [f"http://{target}/metrics"]
