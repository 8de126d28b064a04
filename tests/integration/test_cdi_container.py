"""The CDI spec applied as a container runtime applies it, then a stock `python3` using the virtual NPUs inside.

A private mount namespace holds a bare root: a tmpfs with only the system interpreter's directories, a fresh
tmpfs /dev, and what the spec's merged `mounts` bind, at their container paths; the program runs chrooted
there with only the spec's `env`. The project is not in that root: `import acl` works only through the spec.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import in_namespace, requires_mount
from tools import cdi

pytestmark = requires_mount

BARE_PYTHON = "/usr/bin/python3"  # the system interpreter: none of the project's dependencies installed

# Every device it sees: set, a round trip of bytes through device memory; then it holds them until told to go.
PROGRAM = """
import json, os, sys
import acl

def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")

check(acl.init(), "init")
count, ret = acl.rt.get_device_count()
check(ret, "get_device_count")
pattern = bytes(range(256)) * 64
for device in range(count):
    check(acl.rt.set_device(device), f"set_device({device})")
    ptr, ret = acl.rt.malloc(len(pattern), 0)
    check(ret, "malloc")
    check(acl.rt.memcpy(ptr, len(pattern), acl.util.bytes_to_ptr(pattern), len(pattern), 1), "memcpy h2d")
    back = bytearray(len(pattern))
    check(acl.rt.memcpy(acl.util.bytes_to_ptr(back), len(back), ptr, len(back), 2), "memcpy d2h")
    if back != pattern:
        sys.exit(f"device {device}: the bytes came back changed")
print(json.dumps({"pid": os.getpid(), "devices": count, "dev": sorted(os.listdir("/dev")), "acl": acl.__file__}))
sys.stdout.flush()
sys.stdin.readline()
for device in range(count):
    check(acl.rt.reset_device(device), "reset_device")
check(acl.finalize(), "finalize")
"""


def runtime_edits(spec: dict, requested: list[str]) -> tuple[dict[str, str], list[dict]]:
    """The env and mounts of a container given `requested`, merged as the CDI library merges them: the spec's
    edits once, then each device's in request order (pkg/cdi/cache.go, InjectDevices); a later mount replaces one
    at the same containerPath, a later env entry one of the same name; mounts shallowest first
    (pkg/cdi/container-edits.go, Apply)."""
    devices = {d["name"]: d["containerEdits"] for d in spec["devices"]}
    env: dict[str, str] = {}
    mounts: dict[str, dict] = {}
    for edits in (spec["containerEdits"], *(devices[name] for name in requested)):
        env.update(entry.split("=", 1) for entry in edits.get("env", []))
        for m in edits.get("mounts", []):
            mounts.pop(m["containerPath"], None)
            mounts[m["containerPath"]] = m
    return env, sorted(mounts.values(), key=lambda m: os.path.normpath(m["containerPath"]).count("/"))


def container_script(root: Path, env: dict[str, str], mounts: list[dict]) -> str:
    """Shell lines that build the container's root at `root` and run PROGRAM in it."""
    q = shlex.quote
    lines = [
        "set -e",
        f"mkdir -p {q(str(root))}",
        f"mount -t tmpfs tmpfs {q(str(root))}",
        f"cd {q(str(root))}",
        # the system interpreter's directories (links where /bin, /lib are links into /usr)
        "for d in usr bin lib lib64; do if [ -L /$d ]; then ln -s $(readlink /$d) $d;"
        " elif [ -d /$d ]; then mkdir $d; mount --rbind /$d $d; fi; done",
        "mkdir dev && mount -t tmpfs tmpfs dev",
        "for n in null zero urandom random; do touch dev/$n; mount --bind /dev/$n dev/$n; done",
        f"cat > prog.py <<'EOF'\n{PROGRAM}\nEOF",
    ]
    for m in mounts:
        # as runc: a bind, then a remount with the other options
        target = q("." + m["containerPath"])
        make = "mkdir -p" if os.path.isdir(m["hostPath"]) else "touch"
        lines.append(f"mkdir -p $(dirname {target}) && {make} {target}")
        lines.append(f"mount --bind {q(m['hostPath'])} {target}")
        others = [o for o in m["options"] if o not in ("bind", "rbind")]
        if others:
            lines.append(f"mount -o remount,bind,{','.join(others)} {target}")
    assignments = " ".join(q(f"{k}={v}") for k, v in env.items())
    lines.append(f"exec chroot . /usr/bin/env -i PATH=/usr/bin:/bin {assignments} {BARE_PYTHON} -s /prog.py")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def spec(daemon) -> dict:
    result = CliRunner().invoke(cdi.command, ["generate"], obj=daemon.mount)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_every_host_path_is_there_and_the_nodes_are_regular_files(daemon, spec):
    """Why the spec binds them (mounts) rather than asking the runtime to recreate them (deviceNodes)."""
    edits = [spec["containerEdits"], *(d["containerEdits"] for d in spec["devices"])]
    for m in (m for e in edits for m in e["mounts"]):
        mode = os.stat(m["hostPath"]).st_mode
        assert stat.S_ISDIR(mode) if m["containerPath"] == cdi.SHIM_IN_CONTAINER else stat.S_ISREG(mode), m


@pytest.mark.parametrize(
    "requested",
    [["davinci2"], ["davinci3", "davinci2"], ["all"]],
    ids=["one", "two", "all"],
)
def test_a_container_given_the_spec_devices_uses_them(daemon, spec, tmp_path, requested):
    if not shutil.which("unshare") or not shutil.which("chroot"):
        pytest.skip("unshare or chroot not available")
    if subprocess.run([BARE_PYTHON, "-I", "-c", "import construct"], capture_output=True).returncode == 0:
        pytest.skip(f"{BARE_PYTHON} has the project's dependencies installed: not a bare interpreter")
    everything = [v["name"] for v in daemon.status()["virtual"]]
    expected = sorted(everything if requested == ["all"] else requested)
    env, mounts = runtime_edits(spec, requested)
    container, info = in_namespace(container_script(tmp_path / "root", env, mounts))
    try:
        assert info["devices"] == len(expected)
        assert info["acl"] == f"{cdi.SHIM_IN_CONTAINER}/acl/__init__.py"
        assert [n for n in info["dev"] if n.startswith("davinci") and n[7:].isdigit()] == expected
        assert {"davinci_manager", "devmm_svm", "hisi_hdc"} <= set(info["dev"])
        held = [name for name in everything if info["pid"] in [s["pid"] for s in daemon.vdev(name)["sessions"]]]
        assert held == expected
    finally:
        out, err = container.communicate("go\n", timeout=30)
    assert container.returncode == 0, err
