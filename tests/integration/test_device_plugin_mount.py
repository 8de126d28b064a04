"""The device plugin over a real daemon: the click command in its own process (given the mount as vdevctl gives
it), a fake kubelet in this one. The daemon is this test's own, as the test stops it and starts it again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import ROOT, TEST_CONFIG, requires_mount
from tests.unit.test_device_plugin import WAIT_S, FakeKubelet, devices_of
from tools import launch
from tools.device_plugin import api_pb2

pytestmark = requires_mount

PLUGIN = (
    "import sys; from pathlib import Path; from tools.device_plugin.command import command; "
    "command.main(sys.argv[2:], obj=Path(sys.argv[1]))"
)
EVERY = [f"davinci{i}" for i in range(4)]  # TEST_CONFIG's


def test_the_plugin_follows_a_real_daemon_and_stops_on_sigterm(tmp_path):
    config = tmp_path / "test.toml"
    config.write_text(TEST_CONFIG)
    mount = tmp_path / "mnt"
    with tempfile.TemporaryDirectory(prefix="kdp-", dir="/tmp") as directory:  # short: a socket path
        kubelet_dir = Path(directory)
        kubelet = FakeKubelet(kubelet_dir)
        with launch.daemon(mount, config, tmp_path / "daemon.log") as first:
            plugin = subprocess.Popen(
                [sys.executable, "-c", PLUGIN, str(mount), "--kubelet-dir", directory, "--poll", "0.1"],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                request = kubelet.registered()
                stub = kubelet.dial(request)
                stream = stub.ListAndWatch(api_pb2.Empty(), timeout=4 * WAIT_S)
                assert devices_of(next(stream)) == dict.fromkeys(EVERY, "Healthy")

                allocate = api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["davinci2"])]
                )
                (answer,) = stub.Allocate(allocate, timeout=WAIT_S).container_responses
                assert [d.name for d in answer.cdi_devices] == ["flexnpu.io/npu=davinci2"]
                mounts = {m.container_path: m.host_path for m in answer.mounts}
                assert mounts["/dev/davinci2"] == str(mount / "davinci2")
                assert all(Path(host).exists() for host in mounts.values()), mounts

                first.terminate()  # the daemon goes: every device Unhealthy
                first.wait(WAIT_S)
                assert devices_of(next(stream)) == dict.fromkeys(EVERY, "Unhealthy")
                with launch.daemon(mount, config, tmp_path / "daemon2.log"):  # and comes back
                    assert devices_of(next(stream)) == dict.fromkeys(EVERY, "Healthy")
                stream.cancel()

                plugin.send_signal(signal.SIGTERM)
                assert plugin.wait(WAIT_S) == 0
                assert not (kubelet_dir / request.endpoint).exists()
                events = [json.loads(line)["event"] for line in plugin.stderr if line.startswith("{")]
                assert "registered" in events and "device health" in events and events[-1] == "stopped"
            finally:
                if plugin.poll() is None:
                    plugin.kill()
                    plugin.wait()
                plugin.stderr.close()
                kubelet.server.stop(grace=None).wait()
