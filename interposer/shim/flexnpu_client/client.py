"""The client end of a session: encodes calls as records, batches asynchronous ones, flushes them with the
next synchronous call, and lands the bytes of asynchronous device-to-host copies in host memory.

Transports: a virtual device file (the daemon) or an in-process translator (direct mode, the passthrough
baseline, in direct.py). Both carry the same frames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from . import codec
from .codec import COMMANDS, Op, Reply
from .errors import AclCallError, AclError

FLUSH_RECORDS = 4096  # send a batch early once it is this long ...
FLUSH_BYTES = 8 << 20  # ... or this big, so a long async burst never holds unbounded memory
FIRST_READ = 64 << 10
SMALL_FRAME = 64 << 10
IOV_MAX = 1024
DAEMON_GONE = (errno.ENOTCONN, errno.ECONNABORTED)  # a killed FUSE daemon: its files answer these
SESSIONS_FULL = {  # what open() of a device node answers when the daemon's session limits are reached
    errno.EUSERS: "this user holds as many sessions as the daemon allows one user",
    errno.ENFILE: "the daemon serves as many sessions as it allows",
}


class Transport(Protocol):
    def send(self, frame: list) -> None:
        """A frame of asynchronous records only: no reply."""

    def call(self, frame: list | bytes) -> memoryview:
        """A frame ending in a synchronous record: returns the reply frame's body."""

    def close(self) -> None: ...


class FileTransport:
    def __init__(self, path: str) -> None:
        self.path = path
        # Which physical NPU's process serves it: vdevfsd's davinciN links into .npu/<npu>/ (vdevfs/front.py).
        served = os.path.realpath(path).split(os.sep)
        self.npu = served[-2] if len(served) > 2 and served[-3] == ".npu" else None
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENODEV and self.npu:
                raise AclCallError(
                    f"{path}: its physical NPU's process ({self.npu}) is restarting; try again in a few seconds "
                    "(see `vdevctl ls`)",
                    AclError.RT_NO_DEVICE,
                ) from None
            if exc.errno in SESSIONS_FULL:
                raise AclCallError(
                    f"{path}: the daemon refused a new session ({exc.strerror}): "
                    + SESSIONS_FULL[exc.errno]
                    + "; each open device file (each process with a device set) is one: close some",
                    AclError.RT_OVER_LIMIT,
                ) from None
            raise AclCallError(
                f"{path}: cannot open the virtual device ({exc.strerror}); is vdevfsd running? see `vdevctl ls`",
                AclError.RT_NO_DEVICE,
            ) from None
        self._body = bytearray()

    def send(self, frame: list | bytes) -> None:
        try:
            if isinstance(frame, bytes):
                os.write(self.fd, frame)  # FUSE takes a write whole or fails it
            elif sum(len(p) for p in frame) <= SMALL_FRAME or len(frame) > IOV_MAX:
                os.write(self.fd, b"".join(frame))  # small: joining costs less than a scattered write
            else:
                os.writev(self.fd, frame)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise self._refusal() from None
            raise self._lost("the daemon refused a frame", exc) from None

    def _refusal(self) -> AclCallError:
        """The daemon answers a frame it cannot decode with EINVAL and leaves the reason in a reply."""
        try:
            reply = codec.decode_replies(memoryview(os.read(self.fd, FIRST_READ))[codec.FRAME_HEADER_SIZE :])[0]
            return AclCallError(f"{self.path}: daemon refused a frame: {bytes(reply.payload).decode()}", reply.status)
        except (OSError, IndexError, ValueError, struct.error):
            return AclCallError(f"{self.path}: daemon refused a frame (EINVAL)", AclError.INVALID_PARAM)

    def call(self, frame: list | bytes) -> memoryview:
        """Send, then read the reply: headers first (small reads are cheap), then the body straight into one
        buffer, since a read of N bytes costs the kernel N bytes of pinned pages whatever comes back."""
        self.send(frame)
        try:
            first = os.read(self.fd, FIRST_READ)
            if len(first) < codec.FRAME_HEADER_SIZE:
                raise AclCallError(f"{self.path}: the daemon sent no (whole) reply", AclError.RT_SOCKET_CLOSE)
            length = codec.check_header(first)
            if len(first) - codec.FRAME_HEADER_SIZE >= length:
                return memoryview(first)[codec.FRAME_HEADER_SIZE : codec.FRAME_HEADER_SIZE + length]
            if len(self._body) < length:
                self._body = bytearray(length)  # reused: a fresh 64 MiB buffer costs more in page faults than a copy
            have = len(first) - codec.FRAME_HEADER_SIZE
            view = memoryview(self._body)[:length]
            view[:have] = first[codec.FRAME_HEADER_SIZE :]
            while have < length:
                n = os.readv(self.fd, [view[have:]])
                if n == 0:
                    raise AclCallError(f"{self.path}: the reply was cut short", AclError.RT_SOCKET_CLOSE)
                have += n
            return view
        except OSError as exc:
            raise self._lost("reading the reply failed", exc) from None

    def _lost(self, what: str, exc: OSError) -> AclCallError:
        # RT_SOCKET_CLOSE (507901, "hdc disconnect" in CANN's include/acl/error_codes/rt_error_codes.h) is what
        # real CANN returns when its channel to the device drops: the nearest match to a daemon that is gone.
        if exc.errno in DAEMON_GONE and self.npu:
            return AclCallError(
                f"{self.path}: the FlexNPU process serving physical NPU {self.npu} is gone ({exc.strerror}): this "
                "virtual device was lost, as on a device reset, with its memory, streams and queued work; vdevfsd "
                "restarts that process within seconds (`vdevctl ls` shows it): set the device again",
                AclError.RT_SOCKET_CLOSE,
            )
        if exc.errno in DAEMON_GONE:
            return AclCallError(
                f"{self.path}: the FlexNPU daemon is gone ({exc.strerror}): this virtual device was lost, as on "
                "a device reset, with its memory, streams and queued work; restart the daemon "
                "(`vdevfsd mount`) and set the device again",
                AclError.RT_SOCKET_CLOSE,
            )
        if exc.errno == errno.ENODEV:  # vdevfs/fs.py: its virtual NPU was destroyed under the session
            return AclCallError(
                f"{self.path}: this virtual NPU was destroyed by the operator (vdevctl vnpu destroy --force): the "
                "device was lost, with its memory, streams and queued work; set another device",
                AclError.RT_SOCKET_CLOSE,
            )
        return AclCallError(f"{self.path}: {what}: {exc.strerror}", AclError.RT_SOCKET_CLOSE)

    def close(self) -> None:
        # The fd is gone whatever close() says; a dead daemon's (or NPU process's) file says ENOTCONN.
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    chip: str
    total_memory: int


class Client:
    """One session. Thread-safe: calls from several threads are serialised, as one channel requires."""

    def __init__(self, transport: Transport, phase: int = 0) -> None:
        self.transport = transport
        self._lock = threading.Lock()
        self._seq = 0
        self._batch: list[bytes | memoryview] = []
        self._batch_records = 0
        self._batch_bytes = 0
        self._landing: dict[int, tuple[int, int]] = {}  # async D2H seq -> (host address, count)
        self.templates: dict[tuple, int] = {}  # operator description -> template id sent on this session
        reply = self.call(Op.HELLO, version=codec.PROTOCOL_VERSION, phase=phase, pad=0, pid=os.getpid())
        if reply.status != AclError.SUCCESS:
            raise AclCallError(bytes(reply.payload).decode(errors="replace"), reply.status)
        hello = codec.hello_reply(reply.payload)
        self.info = DeviceInfo(hello.name, hello.chip, hello.total_memory)

    def submit(self, op: Op, data: bytes | memoryview = b"", landing: tuple[int, int] | None = None, **args) -> int:
        """Queue an asynchronous record; returns its seq. `landing`: (host address, count) for a D2H copy."""
        with self._lock:
            seq = self._queue(op, data, args)
            if landing is not None:
                self._landing[seq] = landing
            if self._batch_records >= FLUSH_RECORDS or self._batch_bytes >= FLUSH_BYTES:
                self._flush()
            return seq

    def call(self, op: Op, data: bytes | memoryview = b"", into: int | None = None, **args) -> Reply:
        """Send the batch plus one synchronous record; return its reply (status and payload).

        `into`: a host address that a successful reply's payload is copied to (blocking device-to-host copies);
        the returned payload is then empty. Payloads are only valid until the next call on this client.
        """
        with self._lock:
            if self._batch_records or data:
                seq = self._queue(op, data, args)
                frame: list | bytes = codec.frame(self._batch, self._batch_records)
                self._clear()
            else:  # nothing batched: the whole frame in one pack
                seq = self._seq + 1
                frame = COMMANDS[op].solo_frame(seq, args)
                self._seq = seq
            result = None
            for reply in codec.decode_replies(self.transport.call(frame)):
                if reply.seq == seq:
                    result = reply
                else:
                    self._land(reply)
            if result is None:
                raise AclCallError(f"no reply to record seq {seq} ({op.name})")
            if into is not None and result.status == AclError.SUCCESS:
                _copy_to(into, result.payload)
                return Reply(result.seq, result.status, b"")
            return result

    @property
    def records_sent(self) -> int:
        """Records this client has encoded so far (sent, or waiting in the batch)."""
        return self._seq

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def close(self) -> None:
        with self._lock:
            self._batch.clear()
            self.transport.close()

    def _queue(self, op: Op, data, args) -> int:
        parts = COMMANDS[op].record(self._seq + 1, data, args)
        self._seq += 1
        self._batch += parts
        self._batch_records += 1
        self._batch_bytes += len(data)
        return self._seq

    def _flush(self) -> None:
        if self._batch_records:
            frame = codec.frame(self._batch, self._batch_records)
            self._clear()
            self.transport.send(frame)

    def _clear(self) -> None:
        self._batch = []
        self._batch_records = self._batch_bytes = 0

    def _land(self, reply: Reply) -> None:
        target = self._landing.pop(reply.seq, None)
        if target is not None:
            host_ptr, count = target
            _copy_to(host_ptr, reply.payload[:count])


def _copy_to(address: int, data: bytes | memoryview) -> None:
    """Copy into host memory at `address` without an intermediate bytes object."""
    if len(data):
        memoryview((ctypes.c_char * len(data)).from_address(address)).cast("B")[:] = data
