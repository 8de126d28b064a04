"""The C client in the benchmarks: clib/bench_client.c, built with the library, run through a daemon's device file
or in direct mode, with the same environment `vdevctl run` gives a program. It prints one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from interposer.shim_env import C_LIB_PATH, ROOT, shim_env

BINARY = Path(C_LIB_PATH) / "bench_client"


def build() -> Path:
    result = subprocess.run(
        ["make", "-C", str(ROOT / "clib"), f"PYTHON={sys.executable}", "all", "build/bench_client"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the C client failed (make -C clib):\n{result.stderr}")
    return BINARY


def start(args: list[str], device: str | None = None, config: Path | None = None) -> subprocess.Popen:
    """bench_client ARGS through the device file `device`, or in direct mode on `config`'s davinci0; `finish` it."""
    env = shim_env([device]) if device is not None else shim_env(["davinci0"], direct=True, config=str(config))
    return subprocess.Popen([str(build()), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench_client {' '.join(proc.args[1:])} failed: {err.strip()}")
    return json.loads(out)


def run(args: list[str], device: str | None = None, config: Path | None = None) -> dict:
    return finish(start(args, device, config))
