"""The daemon's life as an operator sees it: mount, status, signals, stale mounts, the vdevctl commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from interposer.shim.flexnpu_client.client import Client, FileTransport
from tests.conftest import ROOT, TEST_CONFIG, acl_popen, requires_mount, vdevctl
from tests.integration.test_bad_input import wait_until
from tools import launch

pytestmark = requires_mount


def test_mount_holds_the_nodes_containers_expect(daemon):
    names = sorted(os.listdir(daemon.mount))
    assert names == [
        ".npu",  # where each physical NPU's process mounts the device files it serves
        "control",
        "davinci0",
        "davinci1",
        "davinci2",
        "davinci3",
        "davinci_manager",
        "devmm_svm",
        "hisi_hdc",
        "status",
    ]
    assert sorted(os.listdir(daemon.mount / ".npu")) == ["npu0", "npu1"]
    assert os.readlink(daemon.mount / "davinci2") == ".npu/npu1/davinci2"
    assert oct(os.stat(daemon.mount / "davinci0").st_mode & 0o777) == "0o666"
    assert oct(os.stat(daemon.mount / "status").st_mode & 0o777) == "0o444"
    configured = os.stat(daemon.mount / "davinci1")  # owner = "1234:4321", mode = "0660" in the config
    assert (configured.st_uid, configured.st_gid, configured.st_mode & 0o777) == (1234, 4321, 0o660)


def test_ls_shows_every_virtual_npu(daemon):
    result = vdevctl(daemon.mount, "ls")
    assert result.returncode == 0, result.stderr
    for name, chip in [("davinci0", "910B2"), ("davinci3", "910B4")]:
        row = next(line for line in result.stdout.splitlines() if f"| {name} " in line)
        assert chip in row
    assert "64.0 MiB" in result.stdout  # davinci0's quota
    status = json.loads(vdevctl(daemon.mount, "ls", "--json").stdout)
    assert [v["name"] for v in status["virtual"]] == ["davinci0", "davinci1", "davinci2", "davinci3"]
    assert status["daemon"]["pid"] == daemon.pid


def test_ls_without_a_daemon_says_how_to_start_one(tmp_path):
    result = vdevctl(tmp_path, "ls")
    assert result.returncode == 1
    assert f"no FlexNPU daemon at {tmp_path}" in result.stderr and "vdevfsd mount" in result.stderr


def test_run_with_an_unknown_device_names_the_ones_there_are(daemon):
    result = vdevctl(daemon.mount, "run", "--devices", "7", "--", "true")
    assert result.returncode == 1
    assert "davinci7: no such virtual device (have davinci0, davinci1, davinci2, davinci3; see vdevctl ls)" in (
        result.stderr
    )


def _daemon_cmd(mount, config):
    return [sys.executable, "-m", "vdevfs.cli", "--log-json", "mount", str(mount), "--config", str(config)]


def test_sigterm_unmounts_cleanly(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(TEST_CONFIG)
    with launch.daemon(tmp_path / "mnt", config, tmp_path / "log") as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(tmp_path / "mnt")
    assert '"event": "unmounted"' in (tmp_path / "log").read_text()


@pytest.mark.parametrize("clients", [0, 1], ids=["no-clients", "client-attached"])
def test_a_daemon_killed_with_sigkill_restarts_on_its_mount_point(tmp_path, clients):
    config = tmp_path / "c.toml"
    config.write_text(TEST_CONFIG)
    mount = tmp_path / "mnt"
    with launch.daemon(mount, config, tmp_path / "log1") as proc:
        held = [acl_popen(mount, "hold.py", "0", "4096", run_opts=("--devices", "0")) for _ in range(clients)]
        for client in held:
            assert json.loads(client.stdout.readline())["devices"] == 1
        proc.kill()
        proc.wait()
        with pytest.raises(OSError, match="Transport endpoint is not connected"):
            os.listdir(mount)
        # Once the kernel's cached attributes expire even a stat of the mount point fails (the reported case).
        assert wait_until(lambda: _stat_fails(mount)), "lstat kept answering from the cache"
        with launch.daemon(mount, config, tmp_path / "log2"):
            assert (mount / "davinci0").exists()
            for client in held:  # a client of the dead daemon is told what happened, not served by the new one
                _, err = client.communicate("check\n", timeout=30)
                assert client.returncode != 0
                assert "d2h failed: 507901" in err and "the FlexNPU process serving physical NPU npu0 is gone" in err
                assert "this virtual device was lost, as on a device reset" in err
    assert "stale_mount_recovered" in (tmp_path / "log2").read_text()


def _stat_fails(path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return True
    return False


def test_umount_detaches_a_killed_daemons_mount_even_with_clients_attached(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(TEST_CONFIG)
    mount = tmp_path / "mnt"
    with launch.daemon(mount, config, tmp_path / "log") as proc:
        fd = os.open(mount / "davinci0", os.O_RDWR)  # keeps the dead mount busy
        try:
            proc.kill()
            proc.wait()
            result = subprocess.run(
                [sys.executable, "-m", "vdevfs.cli", "umount", str(mount)], capture_output=True, text=True, cwd=ROOT
            )
            assert result.returncode == 0, result.stderr
            assert os.listdir(mount) == []  # the bare directory again
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: its NPU process is gone: the close's flush finds no one
                os.close(fd)


def test_a_second_daemon_on_a_live_mount_is_refused(daemon):
    result = subprocess.run(
        _daemon_cmd(daemon.mount, daemon.config), capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 2
    assert "already serving here" in result.stderr
    assert (daemon.mount / "status").exists()  # the first one is untouched


def status_as(mount, uid: int, gid: int) -> dict:
    """The status file read by another user (vdevctl ls shows what this returns). The child changes into the
    mount before it drops root: pytest's temporary directories are root's alone."""
    result = subprocess.run(["cat", "status"], cwd=mount, user=uid, group=gid, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_shows_a_user_only_the_devices_they_may_open_and_their_sessions(daemon):
    # davinci1 is 1234:4321 0660 in the test config; the other nodes are root's, 0666.
    client = Client(FileTransport(str(daemon.mount / "davinci1")))
    try:
        outsider = status_as(daemon.mount, 1000, 1000)
        assert [v["name"] for v in outsider["virtual"]] == ["davinci0", "davinci2", "davinci3"]
        assert f'"pid": {os.getpid()}' not in json.dumps(outsider)
        for uid, gid in [(1234, 1000), (1000, 4321), (0, 0)]:  # owner, group member, root
            seen = {v["name"]: v for v in status_as(daemon.mount, uid, gid)["virtual"]}
            assert [s["pid"] for s in seen["davinci1"]["sessions"]] == [os.getpid()]
    finally:
        client.close()


def test_chmod_and_chown_of_a_device_node_take_effect_and_other_nodes_refuse(daemon):
    node = daemon.mount / "davinci1"
    try:
        os.chmod(node, 0o600)
        os.chown(node, 1000, 1000)
        st = os.stat(node)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1000, 0o600)
        assert "davinci1" in [v["name"] for v in status_as(daemon.mount, 1000, 1000)["virtual"]]
        assert "davinci1" not in [v["name"] for v in status_as(daemon.mount, 1234, 4321)["virtual"]]
        denied = subprocess.run(
            ["chmod", "666", node.name], cwd=daemon.mount, user=1234, group=4321, capture_output=True, text=True
        )
        assert denied.returncode != 0 and "Operation not permitted" in denied.stderr
        with pytest.raises(PermissionError):
            os.chmod(daemon.mount / "status", 0o666)
        with pytest.raises(PermissionError):
            os.chown(daemon.mount / "hisi_hdc", 1000, 1000)
    finally:
        os.chown(node, 1234, 4321)
        os.chmod(node, 0o660)
    st = os.stat(node)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 4321, 0o660)
