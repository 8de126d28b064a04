"""Scheduling policies on a running daemon: per-NPU policies from the config, switched at run time through the
`control` node (which only the daemon's user and root may open) or by `vdevctl policy`, and shown by `vdevctl ls`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import Daemon, acl_popen, requires_mount, vdevctl
from tools import launch

pytestmark = requires_mount

CONFIG = """
[daemon]
time_scale = 0

[[physical]]
name = "npu0"
chip = "910B2"
mode = "numeric"

[[physical]]
name = "npu1"
chip = "910B4"
mode = "numeric"
policy = "static"

[[virtual]]
name = "davinci0"
physical = "npu0"

[[virtual]]
name = "davinci1"
physical = "npu1"

[policy.static]
prefill_cores = 8

[policy.flex]
tpot_target_ms = 40
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon of its own: these tests change its policies (each puts back what it changed)."""
    base = tmp_path_factory.mktemp("policy")
    config = base / "policy.toml"
    config.write_text(CONFIG)
    with launch.daemon(base / "mnt", config, base / "daemon.log") as proc:
        yield Daemon(base / "mnt", proc.pid, base / "daemon.log", config)


def command(daemon: Daemon, line: str) -> str:
    fd = os.open(daemon.mount / "control", os.O_RDWR)
    try:
        os.write(fd, line.encode())
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def policies(daemon: Daemon) -> dict[str, tuple[str, dict]]:
    return {p["name"]: (p["policy"], p["policy_state"]) for p in daemon.status()["physical"]}


def test_each_npu_starts_with_its_configured_policy_and_options(daemon):
    assert policies(daemon) == {"npu0": ("fifo", {}), "npu1": ("static", {"prefill_cores": 8})}


def test_a_command_written_to_the_control_node_is_answered_in_one_line(daemon):
    try:
        assert command(daemon, "policy npu0 flex\n") == "ok: npu0 policy flex (was fifo)\n"
        policy, state = policies(daemon)["npu0"]
        assert (policy, state["tpot_target_ms"]) == ("flex", 40)
        event = [e for e in daemon.log_events() if e["event"] == "policy_switched"][-1]
        logged = (event["npu"], event["policy"], event["was"], event["options"], event["uid"])
        assert logged == ("npu0", "flex", "fifo", {"tpot_target_ms": 40}, os.getuid())
    finally:
        command(daemon, "policy npu0 fifo")
    assert policies(daemon)["npu0"] == ("fifo", {})


def test_the_control_node_is_the_daemon_users_alone(daemon):
    node = daemon.mount / "control"
    st = os.stat(node)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.getuid(), os.getgid(), 0o600)
    # The tests run as root (requires_mount): another user is staged by the child dropping to uid 1000.
    refused = subprocess.run(
        ["sh", "-c", "echo policy npu0 flex > control"], cwd=daemon.mount, user=1000, group=1000, capture_output=True
    )
    assert refused.returncode != 0 and b"Permission denied" in refused.stderr
    assert policies(daemon)["npu0"] == ("fifo", {})
    with pytest.raises(PermissionError):
        os.chmod(node, 0o666)


def test_vdevctl_policy_switches_an_npu_under_a_live_session_and_ls_shows_it(daemon):
    listed = vdevctl(daemon.mount, "policy")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[2:] == ["npu0  fifo", "npu1  static (prefill cores 8)"]
    holder = acl_popen(daemon.mount, "hold.py", "0", "4096", run_opts=("--devices", "0", "--phase", "decode"))
    try:
        assert json.loads(holder.stdout.readline())["devices"] == 1
        switched = vdevctl(daemon.mount, "policy", "npu0", "flex")
        assert (switched.returncode, switched.stdout) == (0, "ok: npu0 policy flex (was fifo)\n"), switched.stderr
        shown = vdevctl(daemon.mount, "ls").stdout
        npu0 = next(line for line in shown.splitlines() if line.startswith("| npu0 "))
        assert "| flex (tpot target 40 ms) " in npu0  # its decode reserve is set when it first dispatches
        session = next(line for line in shown.splitlines() if f"| {holder.pid} " in line)
        assert "| decode (client) " in session
        out, err = holder.communicate("check\n", timeout=30)  # a copy back, dispatched by flex
        assert (holder.returncode, out.strip()) == (0, "intact"), err
        listed = vdevctl(daemon.mount, "policy").stdout.splitlines()
        # The decode step was that copy: it needs no AI core and sizes nothing, so the reserve is still half the chip.
        assert listed[2] == "npu0  flex (decode reserve 12, tpot target 40 ms)"
        status = json.loads(vdevctl(daemon.mount, "ls", "--json").stdout)
        assert status["physical"][0]["policy_state"] == {"decode_reserve": 12, "tpot_target_ms": 40}
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()  # closes its pipes
        command(daemon, "policy npu0 fifo")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("npu9", "flex"), "Error: npu9: no such physical NPU (have npu0, npu1; see vdevctl policy)"),
        (("npu0", "rr"), "Error: rr: no such policy (have fifo, static, flex)"),
    ],
    ids=["npu", "policy"],
)
def test_vdevctl_policy_mistakes_name_what_is_valid_and_change_nothing(daemon, args, error):
    result = vdevctl(daemon.mount, "policy", *args)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.strip() == error
    assert policies(daemon) == {"npu0": ("fifo", {}), "npu1": ("static", {"prefill_cores": 8})}


def test_vdevctl_policy_as_another_user_is_refused_with_who_may(daemon):
    # The child imports vdevctl as root, then becomes uid 1000: the interpreter itself may live where only root
    # can read (a pyenv under /root), and the mount under pytest's root-only temporary directory.
    drop_then_run = (
        "import os, sys; from tools.vdevctl import main; os.setgid(1000); os.setuid(1000); "
        "main(['--mount', '.', 'policy', 'npu0', 'flex'])"
    )
    refused = subprocess.run(
        [sys.executable, "-c", drop_then_run], cwd=daemon.mount, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr == "Error: control: permission denied: only the daemon's user (uid 0) or root may use it\n"
    assert policies(daemon)["npu0"] == ("fifo", {})
