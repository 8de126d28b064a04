"""Start a vdevfsd (or the bare echo filesystem) in a child process and wait until its mount answers.

Used by `vdevctl bench`, `vdevctl serve` and the tests: the daemon under test is always a real process on a real
mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import trio

from vdevfs.daemon import is_stale
from workloads import deploy
from workloads.spec import ServeSpec

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


@contextlib.asynccontextmanager
async def deployment(
    kind: str, spec: ServeSpec, workdir: Path | None = None, on_failure: Callable[[str], None] | None = None
) -> AsyncIterator[deploy.Deployment]:
    """A serving deployment and what it needs: the daemon on a private mount under `workdir` (all but direct).
    `on_failure(why)`: a worker or the daemon died (the daemon is watched too: its death is news at once, not at
    the next request)."""
    failed = on_failure or (lambda why: None)
    with contextlib.ExitStack() as stack:
        work = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="flexnpu-serve-")))
        mount, proc = None, None
        if kind != "direct":
            config = work / f"{kind}.toml"
            config.write_text(deploy.topology(kind, spec))
            mount = work / "dev"
            proc = stack.enter_context(daemon(mount, config, log=work / "daemon.log"))
        async with deploy.deployment(kind, spec, work, mount, failed) as engine, trio.open_nursery() as nursery:
            if proc is not None:
                nursery.start_soon(_watch_daemon, proc, failed)
            yield engine
            nursery.cancel_scope.cancel()


async def _watch_daemon(proc: subprocess.Popen, failed: Callable[[str], None]) -> None:
    code = await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
    failed(f"the FlexNPU daemon (pid {proc.pid}) exited with {code}: every engine's virtual NPU is lost")


def echofs(mount: Path):
    return running(["tools.echofs", str(mount)], lambda proc: os.path.ismount(mount), mount)


def _serving_pid(mount: Path) -> int | None:
    """The pid in the status file: only the daemon itself can answer that (a stale mount's cached entries can't)."""
    try:
        return json.loads((mount / "status").read_text())["daemon"]["pid"]
    except (OSError, ValueError, KeyError):
        return None


def one_npu_config(mode: str = "timing", time_scale: float = 0, chip: str = "910B2") -> str:
    """The TOML of one emulated NPU exposed whole as davinci0: what benchmarks and tests run single programs on."""
    return (
        f"[daemon]\ntime_scale = {time_scale}\n"
        f'[[physical]]\nname = "npu0"\nchip = "{chip}"\nmode = "{mode}"\n'
        '[[virtual]]\nname = "davinci0"\nphysical = "npu0"\n'
    )
