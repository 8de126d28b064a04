"""Start a vdevfsd (or the bare echo filesystem) in a child process and wait until its mount answers.

Used by `vdevctl bench` and the tests: the daemon under test is always a real process on a real mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import interposer.shim
from vdevfs.daemon import is_stale

SHIM_PATH = str(Path(interposer.shim.__file__).parent)  # holds acl/ and flexnpu_client/, standard library only

READY_TIMEOUT_S = 20.0


@contextlib.contextmanager
def running(
    args: list[str], ready: Callable[[subprocess.Popen], bool], mount: Path, log: Path | None = None
) -> Iterator[subprocess.Popen]:
    if not is_stale(mount):  # a killed daemon's mount cannot even be stat'ed: the daemon recovers it
        mount.mkdir(parents=True, exist_ok=True)
    sink = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=sink, stderr=sink if log else subprocess.PIPE)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready(proc):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else f"see {log}"
                raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(args)}: not serving {mount} within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.ismount(mount) or is_stale(mount):
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True)
        if log:
            sink.close()


def daemon(mount: Path, config: Path | None = None, log: Path | None = None):
    args = ["vdevfs.cli", "--log-json", "mount", str(mount), *(["--config", str(config)] if config else [])]
    return running(args, lambda proc: _serving_pid(mount) == proc.pid, mount, log)


def echofs(mount: Path):
    return running(["tools.echofs", str(mount)], lambda proc: os.path.ismount(mount), mount)


def _serving_pid(mount: Path) -> int | None:
    """The pid in the status file: only the daemon itself can answer that (a stale mount's cached entries can't)."""
    try:
        return json.loads((mount / "status").read_text())["daemon"]["pid"]
    except (OSError, ValueError, KeyError):
        return None


def shim_env(
    devices: list[str] | None,
    mount: Path | None = None,
    direct: bool = False,
    config: str | None = None,
    phase: str | None = None,
) -> dict[str, str]:
    """The environment of an interposed program: the shim first on PYTHONPATH, and which virtual NPUs it sees —
    device files through a daemon, or virtual NPU names of `config`'s topology in its own process (direct)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SHIM_PATH, env.get("PYTHONPATH")]))
    for key in ("FLEXNPU_DEVICES", "FLEXNPU_DIRECT", "FLEXNPU_CONFIG", "FLEXNPU_PHASE"):
        env.pop(key, None)
    if mount is not None:
        env["FLEXNPU_MOUNT"] = str(mount)
    if phase:
        env["FLEXNPU_PHASE"] = phase
    if direct:
        env["FLEXNPU_DIRECT"] = "1"
        if config:
            env["FLEXNPU_CONFIG"] = str(Path(config).resolve())
    if devices:
        env["FLEXNPU_DEVICES"] = ",".join(devices)
    return env


def one_npu_config(mode: str = "timing", time_scale: float = 0, chip: str = "910B2") -> str:
    """The TOML of one emulated NPU exposed whole as davinci0: what benchmarks and tests run single programs on."""
    return (
        f"[daemon]\ntime_scale = {time_scale}\n"
        f'[[physical]]\nname = "npu0"\nchip = "{chip}"\nmode = "{mode}"\n'
        '[[virtual]]\nname = "davinci0"\nphysical = "npu0"\n'
    )
