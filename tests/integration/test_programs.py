"""pyACL programs, unmodified, through the device files: bytes, device numbering, isolation, containers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from npu.errors import AclError
from tests.conftest import PROGRAMS, ROOT, acl_popen, acl_program, in_namespace, requires_mount, vdevctl
from tools.vdevctl import SHIM_PATH

pytestmark = requires_mount


def test_roundtrip_program_gets_its_bytes_back(daemon):
    result = acl_program(daemon.mount, "roundtrip.py", "0", str(3 << 20), run_opts=("--devices", "2"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "roundtrip ok"


def test_roundtrip_program_in_direct_mode(daemon):
    result = acl_program(
        daemon.mount, "roundtrip.py", "1", str(1 << 20), run_opts=("--direct", "--config", str(daemon.config))
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "roundtrip ok"


def test_bigger_than_one_record_copies_survive(daemon):
    # 80 MiB crosses the 64 MiB per-record split and many 1 MiB FUSE pieces.
    result = acl_program(daemon.mount, "roundtrip.py", "0", str(80 << 20), run_opts=("--devices", "3"))
    assert result.returncode == 0, result.stderr


def _start_holder(daemon, device_id: str, devices: str):
    holder = acl_popen(daemon.mount, "hold.py", device_id, "4096", run_opts=("--devices", devices))
    line = holder.stdout.readline()
    if not line:
        holder.kill()
        pytest.fail(f"holder did not start: {holder.communicate()[1]}")
    return holder, json.loads(line)


def _finish(holder) -> str:
    out, err = holder.communicate("go\n", timeout=30)
    assert holder.returncode == 0, err
    return out.strip()


def test_devices_are_renumbered_and_ls_shows_the_session(daemon):
    holder, info = _start_holder(daemon, "1", "2,3")
    try:
        assert info["devices"] == 2
        sessions = daemon.vdev("davinci3")["sessions"]
        assert [s["pid"] for s in sessions] == [info["pid"]]
        assert sessions[0]["memory_used"] >= 4096
        assert daemon.vdev("davinci2")["sessions"] == []
        table = vdevctl(daemon.mount, "ls")
        assert table.returncode == 0
        assert str(info["pid"]) in table.stdout and "davinci3" in table.stdout
    finally:
        assert _finish(holder) == "intact"
    assert daemon.vdev("davinci3")["sessions"] == []


@pytest.mark.parametrize(("other", "why"), [("1", "not an address of davinci1"), ("0", "another session")])
def test_a_process_cannot_touch_another_process_memory(daemon, other, why):
    holder, info = _start_holder(daemon, "0", "0,1")
    try:
        poke = acl_program(daemon.mount, "poke.py", other, str(info["ptr"]), run_opts=("--devices", "0,1"))
        assert poke.returncode == 0, poke.stderr
        attempts = json.loads(poke.stdout)
        for name in ("read", "write", "free"):
            assert attempts[name]["ret"] == AclError.INVALID_PARAM, attempts
            assert why in attempts[name]["message"]
        assert poke.stderr == ""  # as pyACL: a failed call prints nothing, its message is in get_recent_err_msg
    finally:
        assert _finish(holder) == "intact"


BARE_PYTHON = "/usr/bin/python3"  # the system interpreter: none of the project's dependencies installed


HOLD = f"""-c "import runpy, sys; sys.path.insert(0, '{{shim}}'); sys.argv = ['hold.py', '0', '8192']
runpy.run_path('{PROGRAMS}/hold.py', run_name='__main__')\""""
LAUNCHERS = {
    # The README's recipe: the shim directory on the path of an isolated (-I: no environment, no user site)
    # interpreter with nothing installed, from an empty environment.
    "bare-python": f"env -i PATH=/usr/bin:/bin {BARE_PYTHON} -I {HOLD}",
    # vdevctl run where no daemon status file is: it finds the bound node as the shim does.
    "vdevctl-run": f"{sys.executable} -m tools.vdevctl --mount /none run -- {BARE_PYTHON} {PROGRAMS}/hold.py 0 8192",
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_container_sees_its_bound_node_as_device_0(daemon, tmp_path, launcher):
    """A container: a device file bound as /dev/davinci0 and the shim directory bound beside the program."""
    if not shutil.which("unshare"):
        pytest.skip("unshare not available")
    if subprocess.run([BARE_PYTHON, "-I", "-c", "import construct"], capture_output=True).returncode == 0:
        pytest.skip(f"{BARE_PYTHON} has the project's dependencies installed: not a bare interpreter")
    # A private mount namespace with a fresh /dev holding only what a container would get: the bound node,
    # and the shim bound at /opt/flexnpu-shim, as `docker run -v` would.
    script = textwrap.dedent(
        f"""
        set -e
        mkdir -p {tmp_path}/hostdev {tmp_path}/shim
        mount --rbind /dev {tmp_path}/hostdev
        mount -t tmpfs tmpfs /dev
        for n in null zero urandom random; do touch /dev/$n; mount --bind {tmp_path}/hostdev/$n /dev/$n; done
        touch /dev/davinci0
        mount --bind {daemon.mount}/davinci2 /dev/davinci0
        mount --bind {SHIM_PATH} {tmp_path}/shim
        cd {"/" if launcher == "bare-python" else ROOT}
        exec {LAUNCHERS[launcher].format(shim=f"{tmp_path}/shim")}
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXNPU")}
    container, info = in_namespace(script, env)
    try:
        assert info["devices"] == 1
        assert [s["pid"] for s in daemon.vdev("davinci2")["sessions"]] == [info["pid"]]
    finally:
        assert _finish(container) == "intact"
