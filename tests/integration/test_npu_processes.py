"""Each physical NPU served by a process of its own (issue 16): crash containment, the watchdog, the memory limit,
and IPC memory whose bytes cross from one NPU's process to another's — on a real mount.

The other NPU's client is tools/chaos_bystander.py (memset + synchronize in a loop, timed) under the system
python3 as uid 65534, as in test_tenants.py: it must see no error while an NPU process dies and comes back.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import COMMANDS, Op
from npu.errors import AclError
from tests.conftest import requires_mount
from tests.integration.test_tenants import SYSTEM_PYTHON, Bystander, unaffected, until
from tools import launch

pytestmark = requires_mount

MiB = 1 << 20
H2D, D2H, D2D = 1, 2, 3
CONFIG = """
[daemon]
time_scale = 1.0
watchdog_s = 3
process_memory = "600MiB"

[[physical]]
name = "npu0"
chip = "910B2"
mode = "numeric"

[[physical]]
name = "npu1"
chip = "910B2"
mode = "numeric"

[[virtual]]
name = "davinci0"
physical = "npu0"
memory = "2GiB"

[[virtual]]
name = "davinci1"
physical = "npu1"
memory = "2GiB"
"""


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("the other NPU's client runs under the system python3")
    base = tmp_path_factory.mktemp("npus")
    (base / "npus.toml").write_text(CONFIG)
    mnt = Path(tempfile.mkdtemp(prefix="flexnpu-npus-"))  # another user must reach it: not under pytest's tmp
    mnt.chmod(0o755)
    try:
        with launch.daemon(mnt, base / "npus.toml", base / "daemon.log"):
            yield mnt, base / "daemon.log"
    finally:
        mnt.rmdir()


def status(mnt: Path) -> dict:
    return json.loads((mnt / "status").read_text())


def npu(mnt: Path, name: str) -> dict:
    return next(p for p in status(mnt)["physical"] if p["name"] == name)


def session(mnt: Path, node: str) -> Runtime:
    rt = Runtime(devices=[str(mnt / node)])
    rt.set_device(0)
    return rt


def serving_again(mnt: Path, name: str, restarts: int) -> None:
    def serving() -> bool:
        now = npu(mnt, name)
        return now["up"] and now["restarts"] == restarts

    until(serving, f"{name} serving again", 30)


def lost(rt: Runtime) -> AclCallError:
    with pytest.raises(AclCallError) as caught:
        rt.synchronize_device()
    return caught.value


def test_killing_one_npus_process_loses_its_sessions_only_and_it_serves_again(mount):
    mnt, log = mount
    victim = session(mnt, "davinci0")
    victim.malloc(MiB, 0)
    before = npu(mnt, "npu0")
    bystander = Bystander(mnt, "davinci1", seconds=4)  # on npu1: must notice nothing
    bystander.start()
    os.kill(before["pid"], signal.SIGKILL)
    error = lost(victim)
    assert error.code == AclError.RT_SOCKET_CLOSE
    assert "the FlexNPU process serving physical NPU npu0 is gone" in str(error)
    assert "set the device again" in str(error)
    unaffected(bystander.result(), worst_ms=1000)
    serving_again(mnt, "npu0", before["restarts"] + 1)
    after = npu(mnt, "npu0")
    assert after["pid"] != before["pid"] and npu(mnt, "npu1")["restarts"] == 0
    again = session(mnt, "davinci0")  # new clients are served by the new process
    ptr = again.malloc(4096, 0)
    again.memset(ptr, 4096, 7, 4096)
    again.reset_device(0)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    down = [e for e in events if e["event"] == "npu_process_down" and e["pid"] == before["pid"]]
    assert down and down[0]["reason"] == "killed by SIGKILL" and down[0]["restart_in_s"] > 0


def test_a_hung_npu_process_is_killed_by_the_watchdog_and_restarted(mount):
    mnt, log = mount
    before = npu(mnt, "npu1")
    os.kill(before["pid"], signal.SIGSTOP)  # answers nothing, holds its mount: as a process in a hot loop
    serving_again(mnt, "npu1", before["restarts"] + 1)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "npu_process_hung" and e["pid"] == before["pid"] for e in events)
    ls = session(mnt, "davinci1")
    ls.malloc(4096, 0)
    ls.reset_device(0)


def test_an_npu_process_past_its_memory_limit_is_restarted(mount):
    mnt, log = mount
    before = npu(mnt, "npu0")
    rt = session(mnt, "davinci0")
    size, piece = 768 * MiB, 64 * MiB  # numeric mode: the bytes live in the NPU process; the limit is 600 MiB
    ptr = rt.malloc(size, 0)
    with pytest.raises(AclCallError):  # the limit is checked each second: the session is lost within a few
        for offset in range(0, size, piece):  # in pieces, so no one call holds the process past the watchdog
            rt.memset(ptr + offset, piece, 1, piece)
        for _ in range(200):
            rt.synchronize_device()
            time.sleep(0.05)
    serving_again(mnt, "npu0", before["restarts"] + 1)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    exceeded = [e for e in events if e["event"] == "npu_process_memory_exceeded" and e["pid"] == before["pid"]]
    assert exceeded and exceeded[0]["rss"] > 600 * MiB


def test_ipc_memory_exported_on_one_npus_process_is_copied_byte_for_byte_on_another(mount):
    """The disaggregated KV pull: export on npu0, import with peer access on npu1, copy device to device."""
    mnt, _ = mount
    until(lambda: all(p["up"] for p in status(mnt)["physical"]), "both NPUs serving", 30)
    exporter, importer = session(mnt, "davinci0"), session(mnt, "davinci1")
    data = np.random.default_rng(0).integers(0, 256, 3 * MiB, dtype=np.uint8)
    src = exporter.malloc(data.nbytes, 0)
    exporter.memcpy(src, data.nbytes, data.ctypes.data, data.nbytes, H2D)
    reply = exporter.call(Op.IPC_EXPORT, ptr=src, size=data.nbytes, flags=1)
    key = COMMANDS[Op.IPC_EXPORT].reply.parse(reply).key
    peer = COMMANDS[Op.IPC_IMPORT].reply.parse(importer.call(Op.IPC_IMPORT, key=key, flags=1)).ptr
    dst = importer.malloc(data.nbytes, 0)
    importer.memcpy(dst, data.nbytes, peer, data.nbytes, D2D)
    out = np.zeros_like(data)
    importer.memcpy(out.ctypes.data, out.nbytes, dst, data.nbytes, D2H)
    assert np.array_equal(out, data)
    importer.call(Op.IPC_CLOSE, key=key)
    exporter.reset_device(0)
    importer.reset_device(0)


def test_processes_one_serves_every_npu_from_vdevfsd_itself(tmp_path):
    (tmp_path / "one.toml").write_text(CONFIG.replace("[daemon]\n", '[daemon]\nprocesses = "one"\n'))
    mnt = tmp_path / "mnt"
    with launch.daemon(mnt, tmp_path / "one.toml", tmp_path / "daemon.log") as proc:
        assert not (mnt / ".npu").exists() and not os.path.islink(mnt / "davinci1")
        rt = session(mnt, "davinci1")
        ptr = rt.malloc(4096, 0)
        rt.memset(ptr, 4096, 7, 4096)
        rt.reset_device(0)
        shown = status(mnt)
        assert shown["daemon"]["pid"] == proc.pid and all("pid" not in p for p in shown["physical"])
