"""Scheduling policies on a running daemon: per-NPU policies from the config, switched at run time through the
`control` node, which only the daemon's user and root may open."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import Daemon, requires_mount
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
