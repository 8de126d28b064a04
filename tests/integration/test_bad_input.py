"""Bad clients get clear errors, and the daemon keeps serving everyone else."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from interposer import wire
from interposer.shim.flexnpu_client.client import Client, FileTransport
from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.shim.flexnpu_client.runtime import DEVICE_TO_HOST, HOST_TO_DEVICE, Runtime
from interposer.wire import COMMANDS, Op
from npu.errors import AclError
from tests.conftest import ROOT, requires_mount

pytestmark = requires_mount


@pytest.fixture
def runtime(daemon):
    rt = Runtime(devices=[str(daemon.mount / "davinci0"), str(daemon.mount / "davinci1")])
    rt.set_device(0)
    yield rt
    rt.reset_device(0, force=True)


@pytest.fixture
def healthy(daemon):
    """A bystander session that must keep working whatever the test does to the daemon."""
    client = Client(FileTransport(str(daemon.mount / "davinci1")))
    yield client
    reply = client.call(Op.MEM_INFO, attr=1)
    assert reply.status == AclError.SUCCESS
    client.close()


def raw_write(daemon, data: bytes, node: str = "davinci0") -> OSError | None:
    fd = os.open(daemon.mount / node, os.O_RDWR)
    try:
        os.write(fd, data)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    return None


def hello() -> list:
    return wire.encode_record(COMMANDS[Op.HELLO], 1, version=wire.PROTOCOL_VERSION, phase=0, pad=0, pid=1)


@pytest.mark.parametrize(
    ("data", "logged"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad frame magic"),
        (b"".join(wire.frame(hello(), 2)), "announces 2 records"),
        (b"".join(wire.frame([wire.RecordHeader.codec.pack(0xDEAD, 7, 0)], 1)), "unknown command 0x0000dead"),
        (b"".join(wire.frame([wire.RecordHeader.codec.pack(COMMANDS[Op.FREE].cmd, 3, 4), b"\0" * 4], 1)), "4-byte"),
        (wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, 1 << 31), "exceeds"),
    ],
    ids=["garbage", "count-mismatch", "unknown-command", "short-record", "huge-length"],
)
def test_malformed_frames_get_einval_and_a_log_line(daemon, healthy, data, logged):
    exc = raw_write(daemon, data)
    assert exc is not None and exc.errno == errno.EINVAL
    assert any(logged in e.get("error", "") for e in daemon.log_events() if e["event"] == "frame_refused")


def test_wrong_protocol_version_names_both_versions(daemon, healthy):
    transport = FileTransport(str(daemon.mount / "davinci0"))
    frame = wire.frame(hello(), 1)
    frame[0] = wire.FrameHeader.codec.pack(wire.MAGIC, 99, 0, 1, len(frame[1]))
    with pytest.raises(AclCallError, match=f"client speaks 99, daemon speaks {wire.PROTOCOL_VERSION}"):
        transport.send(frame)
    transport.close()


def test_records_before_hello_are_refused(daemon, healthy):
    transport = FileTransport(str(daemon.mount / "davinci0"))
    body = transport.call(wire.frame(wire.encode_record(COMMANDS[Op.MALLOC], 1, size=64, policy=0), 1))
    reply = wire.decode_replies(body)[0]
    assert reply.status == AclError.INVALID_PARAM
    assert b"before HELLO" in bytes(reply.payload)
    transport.close()


def hello_frame() -> bytes:
    return b"".join(wire.frame(hello(), 1))


def _long(frame: bytes) -> bytes:
    """The frame with its header announcing 8 bytes more than it holds."""
    return wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, len(frame) - 8) + frame[16:]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (hello_frame()[:20], "truncated frame: the write ended 20 bytes into a frame"),
        (hello_frame()[:10], "truncated frame: the write ended 10 bytes into a frame"),
        (_long(hello_frame()) + b"\0" * 7, "truncated frame"),  # header says 8 more bytes than written
        (hello_frame() + b"\0" * 7, "truncated frame"),  # 7 bytes more than the header says
        (hello_frame() + b"x" * 20, "bad frame magic"),
    ],
    ids=["cut-in-body", "cut-in-header", "length-too-big", "trailing-bytes", "trailing-garbage"],
)
def test_a_bad_write_is_refused_and_the_next_frame_on_the_same_fd_is_answered(daemon, healthy, bad, error):
    transport = FileTransport(str(daemon.mount / "davinci0"))
    try:
        with pytest.raises(AclCallError, match=error) as info:
            transport.send(bad)
        assert info.value.code == AclError.INVALID_PARAM
        reply = wire.decode_replies(transport.call(hello_frame()))[0]
        assert (reply.seq, reply.status) == (1, AclError.SUCCESS)
    finally:
        transport.close()


def test_a_frame_cut_after_a_long_piece_gives_way_to_the_next_frame(daemon, healthy):
    # 8 KiB of a frame announcing 1 MiB could be the first piece FUSE cut from a big write: it is kept until
    # the next write starts with a frame header instead of going on.
    cut = wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, 1 << 20) + bytes(8 << 10)
    transport = FileTransport(str(daemon.mount / "davinci0"))
    try:
        transport.send(cut)
        reply = wire.decode_replies(transport.call(hello_frame()))[0]
        assert (reply.seq, reply.status) == (1, AclError.SUCCESS)
    finally:
        transport.close()
    assert any(e["event"] == "frame_abandoned" for e in daemon.log_events())


def expect(code: AclError, fn, *args, match: str = "", **kwargs):
    with pytest.raises(AclCallError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.code == code
    return info.value


def test_invalid_and_destroyed_handles(runtime, healthy):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    runtime.destroy(Op.STREAM_DESTROY, stream)
    expect(AclError.RT_INVALID_HANDLE, runtime.call, Op.STREAM_SYNC, handle=stream, match="already destroyed")
    expect(AclError.RT_INVALID_HANDLE, runtime.call, Op.STREAM_SYNC, handle=stream + 1000, match="never created")
    event = runtime.create(Op.EVENT_CREATE)
    expect(AclError.RT_INVALID_HANDLE, runtime.call, Op.STREAM_SYNC, handle=event, match="not a stream")
    expect(AclError.RT_INVALID_HANDLE, runtime.call, Op.STREAM_SYNC, handle=0xC2 << 56 | 999, match="another")


def test_async_record_on_a_bad_handle_fails_at_the_next_sync(runtime, healthy):
    runtime.submit(Op.MEMSET_ASYNC, stream=0xC2 << 56 | 4242, ptr=0, value=0, count=1)
    expect(AclError.RT_INVALID_HANDLE, runtime.call, Op.DEVICE_SYNC, match="asynchronous record seq")
    runtime.call(Op.DEVICE_SYNC)  # reported once, then the session goes on


def test_async_error_is_sticky_on_its_stream_and_names_the_record(runtime, healthy):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    ptr = runtime.malloc(64, 0)
    runtime.memset(ptr, 64, 7, 64, stream)
    runtime.memset(ptr, 128, 1, 128, stream)  # past the end of the allocation: fails asynchronously
    runtime.memset(ptr, 64, 9, 64, stream)  # skipped: the stream is in error until the sync reports it
    err = expect(AclError.INVALID_PARAM, runtime.call, Op.STREAM_SYNC, handle=stream, match="run past the end")
    assert "asynchronous record seq" in err.message
    back = bytearray(64)
    runtime.memcpy(ctypes.addressof((ctypes.c_char * 64).from_buffer(back)), 64, ptr, 64, DEVICE_TO_HOST)
    assert bytes(back) == bytes([7]) * 64
    runtime.call(Op.STREAM_SYNC, handle=stream)  # cleared


def test_memory_errors(runtime, healthy):
    ptr = runtime.malloc(100, 0)
    host = bytearray(200)
    address = ctypes.addressof((ctypes.c_char * 200).from_buffer(host))
    expect(AclError.INVALID_PARAM, runtime.memcpy, ptr + 50, 200, address, 100, HOST_TO_DEVICE, match="run past")
    expect(AclError.INVALID_PARAM, runtime.memcpy, address, 10, ptr, 100, DEVICE_TO_HOST, match="exceeds dst_max")
    expect(AclError.INVALID_PARAM, runtime.call, Op.FREE, ptr=ptr + 8, match="8 bytes into the allocation")
    runtime.call(Op.FREE, ptr=ptr)
    expect(AclError.RT_MEMORY_FREE, runtime.call, Op.FREE, ptr=ptr, match="double free")
    expect(AclError.INVALID_PARAM, runtime.malloc, 0, 0, match="must be > 0")
    expect(AclError.RT_INVALID_MALLOC_TYPE, runtime.malloc, 64, 9, match="policy 9")
    expect(AclError.INVALID_PARAM, runtime.memset, runtime.malloc(64, 0), 64, 300, 64, match="not a byte")
    expect(AclError.INVALID_PARAM, runtime.memset, ptr, 64, 0, 64, match="freed, or never allocated")


def test_malloc_past_the_quota_is_out_of_memory_and_frees_nothing(runtime, daemon, healthy):
    keep = runtime.malloc(32 << 20, 0)
    err = expect(AclError.RT_MEMORY_ALLOCATION, runtime.malloc, 40 << 20, 0, match="davinci0: out of memory")
    assert "quota" in err.message
    assert daemon.vdev("davinci0")["memory_used"] >= 32 << 20
    runtime.call(Op.FREE, ptr=keep)


def wait_until(predicate, timeout: float = 15.0) -> bool:
    """FUSE releases a dead process's file asynchronously; poll the status for it, with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


CRASHER = """
import mmap, os, sys, time
from interposer import wire
from interposer.shim.flexnpu_client.client import Client, FileTransport
from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import COMMANDS, Op
rt = Runtime(devices=[sys.argv[1]])
rt.set_device(0)
ptr = rt.malloc(16 << 20, 0)
client = rt.client()
for _ in range(100):
    client.submit(Op.MEMSET_ASYNC, stream=0, ptr=ptr, value=1, count=16 << 20)
frame = b"".join(wire.frame(wire.encode_record(COMMANDS[Op.DEVICE_SYNC], 10_000), 1))
client.submit(Op.MEMCPY_H2D_ASYNC, bytes(4 << 20), stream=0, dst=ptr, src=0, count=4 << 20)
batch = b"".join(wire.frame(client._batch, client._batch_records))
aligned = mmap.mmap(-1, 1 << 20)  # page-aligned: FUSE takes it as one 1 MiB piece of a bigger write
aligned[:] = batch[: 1 << 20]
os.write(client.transport.fd, aligned)  # and the rest never comes
print("ready", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_batch_gives_its_memory_back(daemon, healthy):
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(daemon.mount / "davinci0")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
        assert [s["pid"] for s in daemon.vdev("davinci0")["sessions"]] == [proc.pid]
        assert daemon.vdev("davinci0")["memory_used"] >= 16 << 20
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert wait_until(lambda: not daemon.vdev("davinci0")["sessions"]), daemon.vdev("davinci0")
    assert daemon.vdev("davinci0")["memory_used"] == 0
