"""One tenant must not be able to hurt another (issue 15, "Hardening II"), on a real mount.

Each test runs an attack bounded in time and size as root and, where it applies, another user's client at the
same time: tools/chaos_bystander.py under the system python3 as uid 65534 (it needs nothing but the shim), doing
memset + synchronize in a loop on a virtual NPU of the same physical NPU. The limits themselves, their codes and
their bookkeeping are tested without FUSE in tests/unit/test_translate_limits.py and test_ipc.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import interposer.shim
from interposer import limits
from interposer.shim.flexnpu_client.client import Client, FileTransport
from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import COMMANDS, Op
from npu.errors import AclError
from tests.conftest import ROOT, requires_mount
from tools import launch
from vdevfs.limits import SESSIONS_PER_USER

pytestmark = requires_mount

SHIM = str(Path(interposer.shim.__file__).parent)  # acl/ and flexnpu_client/: the standard library only
MiB = 1 << 20
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
CONFIG = """
[daemon]
time_scale = 1.0
session_buffer = "64MiB"
daemon_buffer = "256MiB"

[[physical]]
name = "npu0"
chip = "910B2"
mode = "timing"

[[physical]]
name = "npu1"
chip = "910B2"
mode = "timing"

[[virtual]]
name = "davinci0"
physical = "npu0"
memory = "1GiB"

[[virtual]]
name = "davinci1"
physical = "npu0"
memory = "1GiB"

[[virtual]]
name = "davinci2"
physical = "npu1"
memory = "1GiB"
"""
FP16, ND = 1, 2


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("the other user's client runs under the system python3")
    base = tmp_path_factory.mktemp("tenants")
    (base / "tenants.toml").write_text(CONFIG)
    # Another user must reach the mount: pytest's own temporary directories are root's alone.
    mnt = Path(tempfile.mkdtemp(prefix="flexnpu-tenants-"))
    mnt.chmod(0o755)
    try:
        with launch.daemon(mnt, base / "tenants.toml", base / "daemon.log") as proc:
            yield mnt, proc.pid
    finally:
        mnt.rmdir()


def status(mount: Path) -> dict:
    return json.loads((mount / "status").read_text())


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.02)


class Bystander:
    """Another user's client (uid 65534) timing memset + synchronize while the attack runs."""

    def __init__(self, mount: Path, node: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(ROOT / "tools" / "chaos_bystander.py"), SHIM, str(mount / node), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: (os.setgid(NOBODY), os.setuid(NOBODY)),
        )
        assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr.read()

    def start(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


def unaffected(result: dict, worst_ms: float) -> None:
    assert result["errors"] == 0, result["first_error"]
    assert result["calls"] > 10 and result["max_ms"] < worst_ms, result


def session(mount: Path, node: str = "davinci0") -> Runtime:
    rt = Runtime(devices=[str(mount / node)])
    rt.set_device(0)
    return rt


def keep_busy(rt: Runtime, stream: int, seconds: float) -> None:
    """Queue MatMuls of 16384^3 in fp16 (~25 ms modeled each on a 910B2) on `stream` for about `seconds`."""
    big = 16384
    a = (FP16, ND, (big, big), rt.malloc(big * big * 2, 0))
    for _ in range(int(seconds / 0.025)):
        rt.launch("MatMulV2", [a, a], [a], {}, stream)


# -- 1. graph replay amplification ---------------------------------------------------------------------------


def test_graph_replay_amplification_stops_at_the_task_limit_and_another_users_client_is_unaffected(mount):
    """Level 0: two Adds; each level replays the level below twice. Before: 108 records took the daemon from 58 to
    1,088 MiB, one launch of a 21-level graph froze every client of every NPU for 70 s, 30 levels got it
    OOM-killed. Now the capture past 32,768 tasks fails with ACL_ERROR_RT_STREAM_TASK_FULL, a launch queues at
    most that, and the session's queue at most QUEUED_TASKS."""
    mnt, pid = mount
    before = rss_mib(pid)
    bystander = Bystander(mnt, "davinci1", seconds=6)
    rt = session(mnt)
    client = rt.client()
    try:
        x = (FP16, ND, (16,), rt.malloc(32, 0))
        stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)
        bystander.start()

        def capture(body) -> tuple[int, int, str]:
            assert client.call(Op.GRAPH_CAPTURE_BEGIN, stream=stream, mode=0).status == AclError.SUCCESS
            body()
            reply = client.call(Op.GRAPH_CAPTURE_END, stream=stream)
            if reply.status != AclError.SUCCESS:
                return 0, reply.status, bytes(reply.payload).decode()
            return COMMANDS[Op.GRAPH_CAPTURE_END].reply.parse(reply.payload).handle, 0, ""

        graph, _, _ = capture(lambda: [rt.launch("Add", [x, x], [x], {}, stream) for _ in range(2)])
        levels = [graph]
        for _ in range(30):
            below = levels[-1]
            graph, code, message = capture(
                lambda b=below: [client.submit(Op.GRAPH_LAUNCH, graph=b, stream=stream) for _ in range(2)]
            )
            if not graph:
                break
            levels.append(graph)
        assert len(levels) == 15 and code == AclError.RT_STREAM_TASK_FULL, message
        assert f"the captured graph would hold {2 * limits.GRAPH_TASKS} tasks" in message

        keep_busy(rt, stream, seconds=1)  # so what the launches queue stays queued
        for _ in range(2):  # 2 x 32,768 tasks behind them: past the session's queue
            client.submit(Op.GRAPH_LAUNCH, graph=levels[-1], stream=stream)
        reply = client.call(Op.STREAM_SYNC, handle=stream)
        assert reply.status == AclError.RT_STREAM_TASK_FULL
        assert f"past {limits.QUEUED_TASKS} queued on the device" in bytes(reply.payload).decode()
        peak = rss_mib(pid)
    finally:
        rt.reset_device(0, force=True)
    unaffected(bystander.result(), worst_ms=1000)
    assert peak - before < 200, (before, peak)


# -- 2, 3. IPC memory across chips and past the quota --------------------------------------------------------


def physical_used(mnt: Path) -> list[int]:
    return [p["memory_used"] for p in status(mnt)["physical"]]


def vdev_used(mnt: Path, name: str) -> int:
    return next(v["memory_used"] for v in status(mnt)["virtual"] if v["name"] == name)


def test_ipc_memory_imported_across_chips_is_counted_on_its_own_chip_and_its_quota_pays_until_the_last_import(mount):
    """Export 64 MiB on npu0, import it with peer access on npu1, close the exporter, then the importer. Before:
    npu0 showed +64 MiB and npu1 -64 MiB for ever, and the exporter's quota was free again while the memory
    lived on (a user held 2,304 MiB on a 1,024 MiB vNPU)."""
    mnt, _ = mount
    assert physical_used(mnt) == [0, 0]
    exporter, importer = session(mnt, "davinci0"), session(mnt, "davinci2")
    size = 64 * MiB
    ptr = exporter.malloc(size, 0)
    key = COMMANDS[Op.IPC_EXPORT].reply.parse(exporter.call(Op.IPC_EXPORT, ptr=ptr, size=size, flags=1)).key
    importer.call(Op.IPC_IMPORT, key=key, flags=1)  # ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS
    exporter.reset_device(0, force=True)
    until(lambda: not next(v for v in status(mnt)["virtual"] if v["name"] == "davinci0")["sessions"], "closed")
    assert vdev_used(mnt, "davinci0") == size + 32  # still paid for by the exporter's virtual NPU
    assert vdev_used(mnt, "davinci2") == 0
    assert physical_used(mnt) == [size + 32, 0]
    importer.reset_device(0, force=True)
    until(lambda: physical_used(mnt) == [0, 0], "the bytes back on npu0, and npu1 untouched")
    assert vdev_used(mnt, "davinci0") == 0


# -- 5. objects and sessions -----------------------------------------------------------------------------------


def test_a_user_at_the_session_limit_is_refused_and_another_user_still_opens(mount):
    mnt, _ = mount
    node = str(mnt / "davinci0")
    fds = []
    try:
        for _ in range(SESSIONS_PER_USER):
            fds.append(os.open(node, os.O_RDWR))
        with pytest.raises(OSError) as refused:
            os.open(node, os.O_RDWR)
        assert refused.value.errno == errno.EUSERS
        with pytest.raises(AclCallError) as caught:
            FileTransport(node)
        assert caught.value.code == AclError.RT_OVER_LIMIT and "as many sessions" in str(caught.value)
        assert status(mnt)["daemon"]["sessions"] >= SESSIONS_PER_USER
        bystander = Bystander(mnt, "davinci1", seconds=1)  # uid 65534: its own limit
        bystander.start()
        unaffected(bystander.result(), worst_ms=1000)
    finally:
        for fd in fds:
            os.close(fd)
    until(lambda: status(mnt)["daemon"]["sessions"] == 0, "the sessions released")
    Client(FileTransport(node)).close()  # room again


def test_streams_and_events_past_a_sessions_limit_are_refused_and_parked_streams_cost_another_user_nothing(mount):
    """Before: 100,000 streams and 200,000 events from one user made another user's memset + sync go from 1.3 to
    119 ms and status take 1.35 s. Now a session holds at most 1,984 streams (CANN's figure for the 910B) and
    65,535 events; streams whose head waits on an event are parked, not visited by every dispatch."""
    mnt, pid = mount
    rt = session(mnt)
    client = rt.client()
    try:
        streams = []
        while True:
            reply = client.call(Op.STREAM_CREATE, priority=0, flag=0)
            if reply.status != AclError.SUCCESS:
                break
            streams.append(COMMANDS[Op.STREAM_CREATE].reply.parse(reply.payload).handle)
        assert reply.status == AclError.RT_NO_STREAM_RESOURCE
        assert len(streams) == limits.STREAMS - 1  # and the default stream
        events = [rt.create(Op.EVENT_CREATE) for _ in range(2000)]
        later = rt.create(Op.EVENT_CREATE)
        keep_busy(rt, streams[0], seconds=4)
        client.submit(Op.EVENT_RECORD, event=later, stream=streams[0])  # done in ~4 s
        for s in streams[1:]:  # every other stream waits for it: parked, not visited by each dispatch
            client.submit(Op.EVENT_WAIT, event=later, stream=s)
            client.submit(Op.EVENT_RECORD, event=events[0], stream=s)
        client.flush()
        bystander = Bystander(mnt, "davinci1", seconds=2)
        bystander.start()
        t = time.perf_counter()
        mine = next(v for v in status(mnt)["virtual"] if v["name"] == "davinci0")["sessions"]
        status_s = time.perf_counter() - t
        assert mine[0]["streams"] == limits.STREAMS and mine[0]["events"] == 2001
        unaffected(bystander.result(), worst_ms=500)
        assert status_s < 0.5
    finally:
        t = time.perf_counter()
        rt.reset_device(0, force=True)
        until(lambda: not status(mnt)["daemon"]["sessions"], "the session closed")
        assert time.perf_counter() - t < 5


# -- 6. host bytes of queued copies ----------------------------------------------------------------------------


def test_async_copies_queued_behind_a_kernel_count_against_the_session_buffer(mount):
    """Before: 34 x 64 MiB queued behind a kernel took the daemon from 56 to 2,298 MiB with status showing 0
    held. Now their bytes are held in the session's buffers (64 MiB here) until they are copied: the copy past
    them is refused (its frame, or at the next synchronisation when one frame carries several), the status
    shows what is held, and it goes when the copies have run."""
    mnt, pid = mount
    rt = session(mnt)
    client = rt.client()
    try:
        dst = rt.malloc(16 * MiB, 0)
        stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)
        keep_busy(rt, stream, seconds=1)  # the copies queue behind these
        data = bytes(16 * MiB)
        refused = None
        for _ in range(5):  # 80 MiB against 64
            try:
                client.submit(Op.MEMCPY_H2D_ASYNC, data, dst=dst, src=0, count=len(data), stream=stream)
                client.flush()
            except AclCallError as exc:
                refused = exc
                break
        held = status(mnt)["daemon"]["buffers"]["held"]
        assert refused is not None and refused.code == AclError.RT_OVER_LIMIT
        assert "session_buffer" in str(refused)
        assert 48 * MiB <= held <= 64 * MiB  # three copies' bytes, queued (and a few small replies)
        assert client.call(Op.STREAM_SYNC, handle=stream).status == AclError.SUCCESS
        until(lambda: status(mnt)["daemon"]["buffers"]["held"] < MiB, "the copies' bytes given back")
    finally:
        rt.reset_device(0, force=True)
