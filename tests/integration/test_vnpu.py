"""Virtual NPUs made, resized and destroyed at run time through a real mount, as an operator does it with
`vdevctl vnpu`: a client sees a new quota at once, a destroy is refused while it runs and `--force` ends it with
the device-lost error while another tenant carries on, and every change survives a restart of the daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import PROGRAMS, ROOT, VDEVCTL, acl_program, requires_mount, vdevctl
from tools import launch

MiB = 1 << 20
CONFIG = launch.one_npu_config("numeric")


@pytest.fixture
def work(tmp_path):
    config = tmp_path / "vnpu.toml"
    config.write_text(CONFIG)
    return tmp_path, config


def ok(mount, *args) -> str:
    result = vdevctl(mount, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def refused(mount, *args) -> str:
    result = vdevctl(mount, *args)
    assert result.returncode == 1, result.stdout
    return result.stderr.strip()


class Client:
    """tests/programs/vnpu_client.py on one virtual NPU: a line in, a line out."""

    def __init__(self, mount, device: int, size: int) -> None:
        args = ["--mount", str(mount), "run", "--devices", str(device), "--", sys.executable]
        self.proc = subprocess.Popen(
            [*VDEVCTL, *args, str(PROGRAMS / "vnpu_client.py"), "0", str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.ask(None) == "ready", self.proc.stderr.read()

    def ask(self, command: str | None) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.communicate(timeout=30)  # closes its stdin: it ends


@requires_mount
def test_create_resize_under_a_client_and_forced_destroy_while_another_tenant_carries_on(work):
    tmp, config = work
    mount = tmp / "mnt"
    with launch.daemon(mount, config, tmp / "daemon.log"):
        assert ok(mount, "vnpu", "create", "--physical", "npu0", "--memory", "32MiB", "--cores", "6") == "davinci1"
        assert {"davinci0", "davinci1"} <= set(os.listdir(mount))
        created = json.loads(ok(mount, "ls", "--json"))["virtual"][1]
        assert (created["name"], created["cores"], created["memory_quota"]) == ("davinci1", 6, 32 * MiB)

        client = Client(mount, 1, 4 * MiB)
        try:
            assert client.ask("meminfo").split()[1] == str(32 * MiB)
            ok(mount, "vnpu", "resize", "davinci1", "--memory", "48MiB", "--cores", "8")
            assert client.ask("meminfo").split()[1] == str(48 * MiB)  # at once, in the running session
            assert "below the 4194336 bytes its sessions hold" in refused(
                mount, "vnpu", "resize", "davinci1", "--memory", "1MiB"
            )
            assert "1 session(s) open" in refused(mount, "vnpu", "destroy", "davinci1")
            assert client.ask("check") == "intact"

            assert ok(mount, "vnpu", "destroy", "davinci1", "--force") == "ok: davinci1 destroyed (1 session(s) ended)"
            lost = client.ask("check")
            assert lost.startswith("error 507901 ") and "destroyed by the operator" in lost
        finally:
            client.close()
        assert not (mount / "davinci1").exists()
        status = json.loads(ok(mount, "ls", "--json"))
        assert [v["name"] for v in status["virtual"]] == ["davinci0"]
        assert status["physical"][0]["memory_used"] == 0  # the ended session's memory went back to the chip
        result = acl_program(mount, "roundtrip.py")  # the other tenant never noticed
        assert result.returncode == 0, result.stderr


@requires_mount
def test_run_time_changes_and_chmod_survive_a_restart(work):
    tmp, config = work
    mount = tmp / "mnt"
    with launch.daemon(mount, config, tmp / "daemon.log"):
        ok(mount, "vnpu", "create", "--physical", "npu0", "--memory", "8MiB", "--cores", "4", "--name", "davinci5")
        ok(mount, "vnpu", "resize", "davinci0", "--memory", "16MiB")
        os.chmod(mount / "davinci0", 0o600)
    (state,) = tmp.glob("vnpu.*mnt.state.json")  # named for the config and the mount point
    with launch.daemon(mount, config, tmp / "daemon2.log"):
        virtual = {v["name"]: v for v in json.loads(ok(mount, "ls", "--json"))["virtual"]}
        assert (virtual["davinci0"]["memory_quota"], virtual["davinci0"]["cores"]) == (16 * MiB, None)
        assert (virtual["davinci5"]["memory_quota"], virtual["davinci5"]["cores"]) == (8 * MiB, 4)
        assert (mount / "davinci0").stat().st_mode & 0o777 == 0o600

    def refused_start(why: str) -> None:
        args = [sys.executable, "-m", "vdevfs.cli", "mount", str(mount), "--config", str(config)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert why in result.stderr and str(state) in result.stderr and "delete it" in result.stderr, result.stderr

    kept = json.loads(state.read_text())
    state.write_text(json.dumps(kept | {"virtual": [{"name": "davinci0", "physical": "npu7"}]}))
    refused_start("npu7")
    state.write_text(json.dumps(kept | {"virtual": [kept["virtual"][0], kept["virtual"][0]]}))
    refused_start("davinci0: a virtual NPU of that name exists")
    config.write_text(CONFIG + 'memory = "32MiB"\n')  # the operator edits the config: never ignored silently
    state.write_text(json.dumps(kept))
    refused_start("the config's [[virtual]] NPUs changed since this state was written")
