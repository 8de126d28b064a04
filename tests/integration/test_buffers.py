"""What the daemon holds for a client outside device memory is bounded; big copies still arrive whole."""

from __future__ import annotations

import errno
import json
import mmap
import os

import numpy as np
import pytest

from interposer import wire
from interposer.shim.flexnpu_client.client import Client, FileTransport
from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.shim.flexnpu_client.runtime import DEVICE_TO_HOST, HOST_TO_DEVICE, Runtime
from interposer.wire import COMMANDS, Op
from npu.errors import AclError
from tests.conftest import TEST_CONFIG, requires_mount
from tests.integration.test_bad_input import wait_until
from tools import launch

pytestmark = requires_mount

SESSION_LIMIT, DAEMON_LIMIT = 4 << 20, 10 << 20


def address(array: np.ndarray) -> int:
    return array.ctypes.data


@pytest.mark.parametrize("stream", [None, 0], ids=["blocking", "async"])
def test_a_copy_bigger_than_fuses_write_size_arrives_whole_both_ways(daemon, stream):
    rt = Runtime(devices=[str(daemon.mount / "davinci2")])
    rt.set_device(0)
    try:
        size = (64 << 20) + 12345  # two records, neither a multiple of a page, from an unaligned host buffer
        pattern = np.random.default_rng(7).integers(0, 256, size + 1, dtype=np.uint8)[1:]
        ptr = rt.malloc(size, 0)
        rt.memcpy(ptr, size, address(pattern), size, HOST_TO_DEVICE, stream)
        back = np.zeros(size, dtype=np.uint8)
        rt.memcpy(address(back), size, ptr, size, DEVICE_TO_HOST, stream)
        rt.call(Op.DEVICE_SYNC)
        assert np.array_equal(back, pattern)
        rt.call(Op.FREE, ptr=ptr)
    finally:
        rt.reset_device(0, force=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A daemon with small buffer limits, so abuse reaches them quickly."""
    base = tmp_path_factory.mktemp("small")
    config = base / "small.toml"
    limits = f"session_buffer = {SESSION_LIMIT}\ndaemon_buffer = {DAEMON_LIMIT}\n"
    config.write_text(TEST_CONFIG.replace("[daemon]\n", "[daemon]\n" + limits))
    with launch.daemon(base / "mnt", config, base / "log") as proc:
        yield base / "mnt", proc


def held(mount) -> int:
    return json.loads((mount / "status").read_text())["daemon"]["buffers"]["held"]


def session(mount, node: str = "davinci2") -> Client:
    return Client(FileTransport(str(mount / node)))


def test_replies_a_client_never_reads_stop_at_its_limit_and_others_go_on(small):
    mount, _ = small
    abuser = session(mount)
    reply = wire.decode_replies(abuser.transport.call(malloc_frame(1 << 20)))[0]
    ptr = COMMANDS[Op.MALLOC].reply.parse(reply.payload).ptr
    copy = b"".join(wire.frame(wire.encode_record(COMMANDS[Op.MEMCPY_D2H], 99, dst=0, src=ptr, count=1 << 20), 1))
    refused = None
    for _ in range(2 * SESSION_LIMIT >> 20):
        try:
            os.write(abuser.transport.fd, copy)  # and never read the reply
        except OSError as exc:
            refused = exc
            break
    assert refused is not None and refused.errno == errno.EINVAL
    assert SESSION_LIMIT // 2 < held(mount) <= SESSION_LIMIT
    bystander = session(mount, "davinci3")
    assert bystander.call(Op.MEM_INFO, attr=1).status == AclError.SUCCESS
    bystander.close()
    abuser.close()
    assert wait_until(lambda: held(mount) == 0)


def malloc_frame(size: int) -> bytes:
    return b"".join(wire.frame(wire.encode_record(COMMANDS[Op.MALLOC], 50, size=size, policy=0), 1))


def send_pieces(fd: int, announced: int, pieces: int) -> int:
    """Send up to `pieces` 1 MiB pieces of a frame announcing `announced` bytes; return how many were taken
    before EINVAL. The pieces are page-aligned, so FUSE passes each on whole, as it does the pieces of one big
    write."""
    piece = mmap.mmap(-1, 1 << 20)
    piece[:16] = wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, announced - 16)
    for taken in range(pieces):
        try:
            os.write(fd, piece)
        except OSError as exc:
            assert exc.errno == errno.EINVAL
            return taken
        piece[:16] = bytes(16)  # the body goes on
    return pieces


def test_a_frame_bigger_than_the_session_limit_is_refused_at_its_first_piece(small):
    transport = FileTransport(str(small[0] / "davinci2"))
    try:
        assert send_pieces(transport.fd, wire.MAX_FRAME, 3) == 0
        assert held(small[0]) < 1024  # nothing kept but the reply explaining why
        explanation = wire.decode_replies(memoryview(os.read(transport.fd, 4096))[16:])[0]
        assert explanation.status == AclError.RT_OVER_LIMIT
        assert (
            "this frame (256.0 MiB) would take this session past its buffer limit of 4.0 MiB"
            in bytes(explanation.payload).decode()
        )
    finally:
        transport.close()


def test_unfinished_frames_stop_at_the_daemon_limit_and_others_are_told_why(small):
    mount, _ = small
    announced = SESSION_LIMIT - (1 << 20)  # each stays under its own limit
    fds = [os.open(mount / "davinci2", os.O_RDWR) for _ in range(4)]
    rt = Runtime(devices=[str(mount / "davinci3")])
    rt.set_device(0)
    try:
        taken = [send_pieces(fd, announced, 2) for fd in fds]
        assert taken == [2, 2, 2, 0]  # the daemon's limit refused the 4th frame at its first piece
        assert held(mount) <= DAEMON_LIMIT
        rt.call(Op.MEM_INFO, attr=1)  # small calls go on
        data = np.ones(2 << 20, dtype=np.uint8)
        ptr = rt.malloc(data.nbytes, 0)
        with pytest.raises(AclCallError, match="does not fit in the daemon's buffers") as info:
            rt.memcpy(ptr, data.nbytes, address(data), data.nbytes, HOST_TO_DEVICE)
        assert info.value.code == AclError.RT_OVER_LIMIT
        for fd in fds:
            os.close(fd)
        fds = []
        assert wait_until(lambda: held(mount) == 0)
        rt.memcpy(ptr, data.nbytes, address(data), data.nbytes, HOST_TO_DEVICE)  # room again
    finally:
        for fd in fds:
            os.close(fd)
        rt.reset_device(0, force=True)


def test_async_copy_results_past_the_limit_fail_that_copy_with_a_message(small):
    mount, _ = small
    rt = Runtime(devices=[str(mount / "davinci2")])
    rt.set_device(0)
    try:
        size = 3 << 20
        ptr = rt.malloc(size, 0)
        hosts = [np.zeros(size, dtype=np.uint8) for _ in range(3)]
        for host in hosts:  # 9 MiB of results held for one sync: past the 4 MiB session limit
            rt.memcpy(address(host), size, ptr, size, DEVICE_TO_HOST, 0)
        with pytest.raises(AclCallError, match="would take this session past its buffer limit") as info:
            rt.call(Op.DEVICE_SYNC)
        assert info.value.code == AclError.RT_OVER_LIMIT
        rt.call(Op.DEVICE_SYNC)  # reported once; the session goes on
    finally:
        rt.reset_device(0, force=True)
    assert wait_until(lambda: held(mount) == 0)
