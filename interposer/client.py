"""The client end of a session: encodes calls as records, batches asynchronous ones, flushes them with the
next synchronous call, and lands the bytes of asynchronous device-to-host copies in host memory.

Transports: a virtual device file (the daemon) or an in-process translator (direct mode, the passthrough
baseline). Both carry the same frames.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Protocol

from construct import ConstructError

from interposer import wire
from interposer.session import answer_sync
from interposer.translate import Translator
from interposer.wire import COMMANDS, FrameBuffer, Op, Reply
from npu.errors import AclError, FlexNPUError, InvalidParam, ProtocolError

FLUSH_RECORDS = 4096  # send a batch early once it is this long ...
FLUSH_BYTES = 8 << 20  # ... or this big, so a long async burst never holds unbounded memory
READ_SIZE = 64 << 20


class Transport(Protocol):
    def send(self, frame: bytes) -> None:
        """A frame of asynchronous records only: no reply."""

    def call(self, frame: bytes) -> bytes:
        """A frame ending in a synchronous record: returns the reply frame's body."""

    def close(self) -> None: ...


class FileTransport:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise FlexNPUError(
                f"{path}: cannot open the virtual device ({exc.strerror}); is vdevfsd running? see `vdevctl ls`",
                AclError.RT_NO_DEVICE,
            ) from None
        self._replies = FrameBuffer()

    def send(self, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                raise FlexNPUError(f"{self.path}: daemon refused a frame: {exc.strerror}", AclError.RT_SOCKET_CLOSE) from None
            view = view[written:]

    def call(self, frame: bytes) -> bytes:
        self.send(frame)
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except OSError as exc:
                raise FlexNPUError(f"{self.path}: reading the reply failed: {exc.strerror}", AclError.RT_SOCKET_CLOSE) from None
            if not data:
                raise FlexNPUError(f"{self.path}: the daemon sent no reply", AclError.RT_SOCKET_CLOSE)
            frames = self._replies.feed(data)
            if frames:
                return bytes(frames[0][1])

    def close(self) -> None:
        os.close(self.fd)


class DirectTransport:
    """No daemon: the same frames go straight to an in-process translator, waits run in this thread."""

    def __init__(self, translator: Translator) -> None:
        self.translator = translator
        self._frames = FrameBuffer()

    def send(self, frame: bytes) -> None:
        self.call(frame)

    def call(self, frame: bytes) -> bytes:
        reply = b""
        for count, body in self._frames.feed(frame):
            reply = answer_sync(self.translator, count, body) or b""
        return reply[wire.FRAME_HEADER_SIZE :]

    def close(self) -> None:
        self.translator.close()


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
        reply = self.call(Op.HELLO, version=wire.PROTOCOL_VERSION, phase=phase, pad=0, pid=os.getpid())
        hello = COMMANDS[Op.HELLO].reply.parse(reply.payload)
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

    def call(self, op: Op, data: bytes | memoryview = b"", **args) -> Reply:
        """Send the batch plus one synchronous record; return its reply (status and payload)."""
        with self._lock:
            seq = self._queue(op, data, args)
            frame = wire.frame(self._batch, self._batch_records)
            self._clear()
            result = None
            for reply in wire.decode_replies(memoryview(self.transport.call(frame))):
                if reply.seq == seq:
                    result = reply
                else:
                    self._land(reply)
            if result is None:
                raise ProtocolError(f"no reply to record seq {seq} ({op.name})")
            return result

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def close(self) -> None:
        with self._lock:
            self._batch.clear()
            self.transport.close()

    def _queue(self, op: Op, data, args) -> int:
        try:
            parts = wire.encode_record(COMMANDS[op], self._seq + 1, data, **args)
        except ConstructError as exc:
            raise InvalidParam(f"{op.name}: an argument does not fit the call: {exc}") from None
        self._seq += 1
        self._batch += parts
        self._batch_records += 1
        self._batch_bytes += len(data)
        return self._seq

    def _flush(self) -> None:
        if self._batch_records:
            frame = wire.frame(self._batch, self._batch_records)
            self._clear()
            self.transport.send(frame)

    def _clear(self) -> None:
        self._batch = []
        self._batch_records = self._batch_bytes = 0

    def _land(self, reply: Reply) -> None:
        target = self._landing.pop(reply.seq, None)
        if target is not None:
            host_ptr, count = target
            ctypes.memmove(host_ptr, bytes(reply.payload[:count]), min(count, len(reply.payload)))
