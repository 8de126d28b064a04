"""Shared fixtures: a real vdevfsd on a real FUSE mount, and helpers to run pyACL programs against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools import launch

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "programs"
VDEVCTL = [sys.executable, "-m", "tools.vdevctl"]

TEST_CONFIG = """
[daemon]
time_scale = 1.0

[[physical]]
name = "npu0"
chip = "910B2"
mode = "numeric"

[[physical]]
name = "npu1"
chip = "910B4"
mode = "numeric"

[[virtual]]
name = "davinci0"
physical = "npu0"
memory = "64MiB"

[[virtual]]
name = "davinci1"
physical = "npu0"
memory = "64MiB"
owner = "1234:4321"
mode = "0660"

[[virtual]]
name = "davinci2"
physical = "npu1"

[[virtual]]
name = "davinci3"
physical = "npu1"
"""


def can_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


requires_mount = pytest.mark.skipif(not can_mount(), reason="needs root and /dev/fuse for a real FUSE mount")


@dataclass
class Daemon:
    mount: Path
    pid: int
    log: Path
    config: Path

    def status(self) -> dict:
        return json.loads((self.mount / "status").read_text())

    def vdev(self, name: str) -> dict:
        return next(v for v in self.status()["virtual"] if v["name"] == name)

    def log_events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def daemon(tmp_path_factory) -> Daemon:
    if not can_mount():
        pytest.skip("needs root and /dev/fuse for a real FUSE mount")
    base = tmp_path_factory.mktemp("flexnpu")
    config = base / "test.toml"
    config.write_text(TEST_CONFIG)
    log = base / "daemon.log"
    with launch.daemon(base / "mnt", config, log) as proc:
        yield Daemon(base / "mnt", proc.pid, log, config)


def vdevctl(mount: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VDEVCTL, "--mount", str(mount), *args], capture_output=True, text=True, timeout=60, cwd=ROOT, **kwargs
    )


def acl_program(mount: Path, program: str, *args: str, run_opts: tuple = (), **kwargs):
    """Run tests/programs/PROGRAM under `vdevctl run`."""
    return vdevctl(mount, "run", *run_opts, "--", sys.executable, str(PROGRAMS / program), *args, **kwargs)


def acl_popen(mount: Path, program: str, *args: str, run_opts: tuple = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*VDEVCTL, "--mount", str(mount), "run", *run_opts, "--", sys.executable, str(PROGRAMS / program), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def in_namespace(script: str, env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """Run `sh -c script` in a private mount namespace (a container's view, without a container runtime); its
    first stdout line, JSON, is what the program inside reports once ready. Skips where the sandbox cannot make
    mount namespaces."""
    container = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = container.stdout.readline()
    if not line:
        err = container.communicate()[1]
        if "Operation not permitted" in err or "cannot" in err:
            pytest.skip(f"this sandbox cannot make mount namespaces: {err.strip()}")
        pytest.fail(err)
    return container, json.loads(line)
