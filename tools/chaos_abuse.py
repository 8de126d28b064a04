"""What `vdevctl bench chaos` throws at the daemon besides killing things: bad frames, and sessions that fill
their buffers (unfinished frames, copies never read). Each helper says what the daemon must answer.

Pieces of a big frame are written from page-aligned buffers, so FUSE passes each on whole, as it passes the
1 MiB pieces of one big write.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import random
from collections import Counter
from pathlib import Path

from interposer import wire
from interposer.shim.flexnpu_client.client import FileTransport
from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.wire import COMMANDS, Op
from npu.errors import AclError
from vdevfs.config import Config

DEVICES = ("davinci0", "davinci1")
MiB = 1 << 20
COPY = 16 * MiB  # each unread copy


def frame(op: Op, seq: int, **args) -> bytes:
    return b"".join(wire.frame(wire.encode_record(COMMANDS[op], seq, **args), 1))


def hello() -> bytes:
    return frame(Op.HELLO, 1, version=wire.PROTOCOL_VERSION, phase=0, pad=0, pid=0)


def header(length: int) -> bytes:
    return wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, length)


def refused_then_served(node: Path, bad: bytes) -> str | None:
    """The bad write must fail with INVALID_PARAM and the next frame on the same file be answered."""
    transport = FileTransport(str(node))
    try:
        try:
            transport.send(bad)
            return "a bad frame was accepted"
        except AclCallError as exc:
            if exc.code != AclError.INVALID_PARAM:
                return f"bad frame: {int(exc.code)} {exc.message[:80]}"
        reply = wire.decode_replies(transport.call(hello()))[0]
        return None if reply.status == AclError.SUCCESS else f"next frame: status {reply.status}"
    finally:
        transport.close()


def unfinished_frame(node: Path, announced: int) -> tuple[int, bool]:
    """A session sending a frame that announces `announced` bytes, in 1 MiB pieces, all but the last. Returns
    its fd and whether a piece was refused with EINVAL."""
    fd = os.open(node, os.O_RDWR)
    piece = mmap.mmap(-1, MiB)
    piece[:16] = header(announced - wire.FRAME_HEADER_SIZE)
    try:
        for _ in range(announced // MiB - 1):
            os.write(fd, piece)
            piece[:16] = bytes(16)  # the body goes on
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return fd, True
    return fd, False


def unread_copies(transport: FileTransport, copies: int) -> int:
    """Ask for `copies` asynchronous 16 MiB device-to-host copies and a sync, and read nothing: only the buffer
    limits hold the copies back. Returns the device address copied from."""
    transport.call(hello())
    reply = wire.decode_replies(transport.call(frame(Op.MALLOC, 2, size=COPY, policy=0)))[0]
    ptr = COMMANDS[Op.MALLOC].reply.parse(reply.payload).ptr
    transport.call(frame(Op.MEMSET, 3, ptr=ptr, value=7, count=COPY))  # so its pages are real
    d2h = COMMANDS[Op.MEMCPY_D2H_ASYNC]
    parts = [p for i in range(copies) for p in wire.encode_record(d2h, 4 + i, stream=0, dst=0, src=ptr, count=COPY)]
    parts += wire.encode_record(COMMANDS[Op.DEVICE_SYNC], 4 + copies)
    os.write(transport.fd, b"".join(wire.frame(parts, copies + 1)))
    return ptr


def free(transport: FileTransport, ptr: int) -> None:
    os.write(transport.fd, frame(Op.FREE, 1000, ptr=ptr))


def read_frame(fd: int) -> list[wire.Reply]:
    _, length = wire.check_header(os.read(fd, wire.FRAME_HEADER_SIZE))
    body = bytearray()
    while len(body) < length:
        body += os.read(fd, length - len(body))
    return wire.decode_replies(memoryview(body))


class Vandal:
    """The abuse of one second: a bad frame, or a session's buffer filled until refused. Counts what went
    otherwise than it must."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.done: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.acts = itertools.cycle(["garbage", "wrong_length", "oversized", "unfinished_frame", "unread_copies"])

    def act(self) -> None:
        kind = next(self.acts)
        node = self.mount / random.choice(DEVICES)
        try:
            problem = getattr(self, kind)(node)
        except (OSError, AclCallError) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:100]
        self.done[kind] += 1
        if problem is not None:
            self.unexpected[f"{kind}: {problem}"] += 1

    def garbage(self, node: Path) -> str | None:
        return refused_then_served(node, random.randbytes(200))

    def wrong_length(self, node: Path) -> str | None:
        return refused_then_served(node, header(len(hello())) + hello()[16:])

    def oversized(self, node: Path) -> str | None:
        return refused_then_served(node, header(2 << 30))

    def unfinished_frame(self, node: Path) -> str | None:
        fd, refused = unfinished_frame(node, Config.session_buffer + MiB)
        os.close(fd)
        return None if refused else "a frame past the session's buffer limit was taken"

    def unread_copies(self, node: Path) -> str | None:
        transport = FileTransport(str(node))
        try:
            ptr = unread_copies(transport, Config.session_buffer // COPY + 2)
            sync = read_frame(transport.fd)[-1]
            free(transport, ptr)
            if sync.status != AclError.RT_OVER_LIMIT:
                return f"copies past the session's buffer limit: sync answered {sync.status}"
            return None
        finally:
            transport.close()
