"""Sessions sharing one device node do not wait for each other (issue 15, item 4).

The kernel serialises direct writes per inode and holds the node's lock until the daemon answers the write, and
two processes of one container share a node all the time. So a write never waits on the device: a session whose
frame waits (a long synchronize) waits in its read, which takes no lock, and everyone else's open, HELLO and
calls on the same node go on. Each test here runs the attack with one modeled MatMul that holds every AI core for
about 5 s (time_scale stretches its ~28 ms), and checks by ordering, not by a time limit: the other session must
finish while the long synchronize is still unanswered.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from interposer.shim.flexnpu_client import codec
from interposer.shim.flexnpu_client.client import Client, FileTransport
from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import Op
from npu.errors import AclError
from tests.conftest import ROOT, requires_mount
from tools import launch

pytestmark = requires_mount

LIBC = ctypes.CDLL(None, use_errno=True)  # setfsuid: per thread, unlike os.setuid
READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())
TIME_SCALE = 180  # a 16384^3 fp16 MatMul (~28 ms modeled on a 910B2) takes ~5 s of wall time
FP16, ND = 1, 2
BIG, SMALL = 16384, 64

# Process A: one long MatMul on its own stream, then a synchronize; prints its device file's fd before the
# synchronize and the monotonic time its reply came after it.
LONG_SYNC = f"""
import sys, time
from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import Op
rt = Runtime(devices=[sys.argv[1]])
rt.set_device(0)
a = ({FP16}, {ND}, ({BIG}, {BIG}), rt.malloc({BIG} * {BIG} * 2, 0))
stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)
rt.launch("MatMulV2", [a, a], [a], {{}}, stream)
print(rt.client().transport.fd, flush=True)
rt.call(Op.STREAM_SYNC, handle=stream)
print(time.monotonic(), flush=True)
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    base = tmp_path_factory.mktemp("shared")
    config = base / "timing.toml"
    config.write_text(launch.one_npu_config(mode="timing", time_scale=TIME_SCALE))
    with tempfile.TemporaryDirectory(prefix="flexnpu-shared-") as mnt:  # not under pytest's 0700 directory:
        os.chmod(mnt, 0o755)  # other users reach the node, as they reach /dev/flexnpu
        with launch.daemon(Path(mnt), config, base / "daemon.log"):
            yield str(Path(mnt) / "davinci0")


def asleep_on(pid: int, tid: int, fd: int, syscall: str | None = None) -> bool:
    """Whether thread `tid` of `pid` sleeps in a system call on `fd` (a read or write of its device file; a
    read only, given read's number as `syscall`): the kernel's own record, so no sleep guesses when a call has
    reached the daemon. A finished thread counts."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            call = f.read().split()
    except FileNotFoundError:
        return True
    return state in "SD" and len(call) > 1 and call[1] == hex(fd) and syscall in (None, call[0])


def waits_in_read(tid: int, fd: int) -> bool:
    """Thread `tid` of this process sleeps in a read of `fd` (in any call on it where read's number is unknown)."""
    return asleep_on(os.getpid(), tid, fd, READ_SYSCALL)


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.005)


def hello_and_a_call(node: str) -> float:
    """A new session on the node: open, HELLO, one synchronous call. Returns when it was done."""
    client = Client(FileTransport(node))
    try:
        reply = client.call(Op.MEM_INFO, attr=1)
        assert reply.status == AclError.SUCCESS
        return time.monotonic()
    finally:
        client.close()


def test_a_second_process_is_served_while_another_waits_in_a_long_synchronize_on_the_same_node(node):
    a = subprocess.Popen(
        [sys.executable, "-c", LONG_SYNC, node], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        fd = int(a.stdout.readline())
        wait_until(lambda: asleep_on(a.pid, a.pid, fd), "process A waits in its synchronize")
        b_done = hello_and_a_call(node)
        out, err = a.communicate(timeout=60)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 0, err
    a_done = float(out)
    assert b_done < a_done, "process B's open + HELLO + call waited for process A's synchronize"


def test_sessions_past_the_daemons_old_worker_count_waiting_at_once_stop_nobody(node):
    """pyfuse3 handles 99 requests at once by default, and every session waiting for a reply holds one: 120
    sessions in a long synchronize must not stop a new session's HELLO. (The daemon lets one user hold 64
    sessions: each thread opens its own as one of two users, by its file-system uid, which is per thread.)"""
    heavy = Runtime(devices=[node])
    heavy.set_device(0)
    operand = (FP16, ND, (BIG, BIG), heavy.malloc(BIG * BIG * 2, 0))
    heavy_stream = heavy.create(Op.STREAM_CREATE, priority=0, flag=0)
    count = 120
    ready, go = threading.Barrier(count + 1, timeout=60), threading.Event()
    syncing: dict[int, tuple[int, int]] = {}  # session -> (thread id, its device file's fd)
    done: dict[int, tuple[int, float]] = {}
    errors: list[BaseException] = []

    def session(i: int) -> None:
        try:
            LIBC.setfsuid(1000 + i % 2)  # the open below is that user's session
            rt = Runtime(devices=[node])
            rt.set_device(0)
            LIBC.setfsuid(0)
            client = rt.client()
            small = (FP16, ND, (SMALL, SMALL), rt.malloc(SMALL * SMALL * 2, 0))
            stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)
            ready.wait()
            go.wait(timeout=60)
            rt.launch("MatMulV2", [small, small], [small], {}, stream)  # queued behind the MatMul on every core
            client.flush()
            syncing[i] = (threading.get_native_id(), client.transport.fd)
            status = client.call(Op.STREAM_SYNC, handle=stream).status
            done[i] = (status, time.monotonic())
            rt.reset_device(0, force=True)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=session, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):  # a session failed: its error is asserted below
            ready.wait()
        heavy.launch("MatMulV2", [operand, operand], [operand], {}, heavy_stream)
        heavy.client().flush()
        go.set()
        assert not errors, errors
        wait_until(
            lambda: errors or (len(syncing) == count and all(waits_in_read(*syncing[i]) for i in syncing)),
            "every session waits for its synchronize's reply",
        )
        b_done = hello_and_a_call(node)
    finally:
        go.set()
        for thread in threads:
            thread.join(timeout=60)
        heavy.reset_device(0, force=True)
    assert not errors, errors
    assert len(done) == count and {status for status, _ in done.values()} == {AclError.SUCCESS}
    assert b_done < min(t for _, t in done.values()), "a new session waited for the sessions in a synchronize"


def test_a_session_waiting_on_the_device_can_wait_in_select(node):
    rt = Runtime(devices=[node])
    rt.set_device(0)
    client = rt.client()
    operand = (FP16, ND, (BIG, BIG), rt.malloc(BIG * BIG * 2, 0))
    stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)
    rt.launch("MatMulV2", [operand, operand], [operand], {}, stream)
    client.flush()
    fd, seq = client.transport.fd, client.records_sent + 1
    os.write(fd, codec.COMMANDS[Op.STREAM_SYNC].solo_frame(seq, {"handle": stream}))  # returns while it waits
    try:
        assert select.select([fd], [fd], [], 0) == ([], [fd], [])  # no reply yet; a write would not wait
        assert select.select([fd], [], [], 60)[0] == [fd]  # woken when the reply comes, not by the timeout
        (reply,) = codec.decode_replies(memoryview(os.read(fd, 1 << 16))[codec.FRAME_HEADER_SIZE :])
        assert (reply.seq, reply.status) == (seq, AclError.SUCCESS)
    finally:
        rt.reset_device(0, force=True)
