"""The wire format between the interposer and the daemon: frames of ioctl-style records, in construct.

    frame  = header (magic "FNPU", protocol version, record count, length of the records) + records
    record = cmd (an _IOC number: direction, type 'F', command number, size of the fixed part) + seq + length
             + payload (the command's fixed struct, then any bulk data such as memcpy bytes)
    reply  = seq + status (an aclError) + length + payload (the reply struct, or an error message)

Records whose cmd carries _IOC_READ are synchronous: each gets exactly one reply, in order. The others are
asynchronous and get none; their errors surface at the next synchronisation. A reply frame may also carry
deliveries: the bytes of completed asynchronous device-to-host copies, under those records' seq numbers.

These definitions are the one source of truth for the format. Fixed-layout structs are compiled (construct
skips checks in compiled parsers, so the decoder validates what it must itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, PascalString, StreamError, Struct

from npu.errors import ProtocolError

PROTOCOL_VERSION = 1
MAGIC = b"FNPU"
MAX_FRAME = 256 << 20  # the client splits bigger copies into several records

# Linux _IOC encoding (asm-generic/ioctl.h): nr 8 bits, type 8, size 14, dir 2.
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
IOC_TYPE = ord("F")


def ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (IOC_TYPE << 8) | nr


FrameHeader = Struct(
    "magic" / Bytes(4),
    "version" / Int16ul,
    "flags" / Int16ul,
    "count" / Int32ul,
    "length" / Int32ul,
).compile()
RecordHeader = Struct("cmd" / Int32ul, "seq" / Int32ul, "length" / Int32ul).compile()
ReplyHeader = Struct("seq" / Int32ul, "status" / Int32ul, "length" / Int32ul).compile()
FRAME_HEADER_SIZE = FrameHeader.sizeof()
RECORD_HEADER_SIZE = RecordHeader.sizeof()
REPLY_HEADER_SIZE = ReplyHeader.sizeof()

Handle = Struct("handle" / Int64ul).compile()
Empty = Struct().compile()
Text = Struct("text" / PascalString(Int16ul, "utf8"))


class Op(IntEnum):
    """Command numbers. Never renumber one: bump PROTOCOL_VERSION instead."""

    HELLO = 1
    VERSION = 2
    CONTEXT_CREATE = 10
    CONTEXT_DESTROY = 11
    STREAM_CREATE = 20
    STREAM_DESTROY = 21
    STREAM_SYNC = 22
    DEVICE_SYNC = 23
    EVENT_CREATE = 30
    EVENT_DESTROY = 31
    EVENT_RECORD = 32
    EVENT_WAIT = 33
    EVENT_SYNC = 34
    EVENT_QUERY = 35
    EVENT_RESET = 36
    EVENT_ELAPSED = 37
    MALLOC = 40
    FREE = 41
    MEM_INFO = 42
    MEMCPY_H2D = 50
    MEMCPY_D2H = 51
    MEMCPY_D2D = 52
    MEMSET = 53
    MEMCPY_H2D_ASYNC = 54
    MEMCPY_D2H_ASYNC = 55
    MEMCPY_D2D_ASYNC = 56
    MEMSET_ASYNC = 57


@dataclass(frozen=True)
class Command:
    op: Op
    request: Struct  # fixed part; bulk data may follow it in the payload
    reply: Struct  # reply payload on success
    sync: bool
    bulk: bool = False  # the payload carries data after the fixed part

    @property
    def cmd(self) -> int:
        direction = IOC_READ | IOC_WRITE if self.sync else IOC_WRITE
        return ioc(direction, self.op, self.request.sizeof())

    @property
    def fixed_size(self) -> int:
        return self.request.sizeof()


def _c(op, request, reply=Empty, sync=True, bulk=False):
    return Command(op, request, reply, sync, bulk)


_Copy = Struct("dst" / Int64ul, "src" / Int64ul, "count" / Int64ul).compile()
_Fill = Struct("ptr" / Int64ul, "value" / Int32ul, "count" / Int64ul).compile()
_StreamCopy = Struct("stream" / Int64ul, "dst" / Int64ul, "src" / Int64ul, "count" / Int64ul).compile()
_StreamFill = Struct("stream" / Int64ul, "ptr" / Int64ul, "value" / Int32ul, "count" / Int64ul).compile()
_EventStream = Struct("event" / Int64ul, "stream" / Int64ul).compile()

COMMANDS: dict[Op, Command] = {
    c.op: c
    for c in (
        _c(
            Op.HELLO,
            Struct("version" / Int16ul, "phase" / Int8ul, "pad" / Const(0, Int8ul), "pid" / Int32ul),
            Struct(
                "version" / Int16ul,
                "total_memory" / Int64ul,
                "name" / PascalString(Int8ul, "utf8"),
                "chip" / PascalString(Int8ul, "utf8"),
            ),
        ),
        _c(Op.VERSION, Empty, Struct("version" / Int16ul, "daemon" / PascalString(Int8ul, "utf8"))),
        _c(Op.CONTEXT_CREATE, Empty, Handle),
        _c(Op.CONTEXT_DESTROY, Handle),
        _c(Op.STREAM_CREATE, Struct("priority" / Int32ul, "flag" / Int32ul).compile(), Handle),
        _c(Op.STREAM_DESTROY, Handle),
        _c(Op.STREAM_SYNC, Handle),
        _c(Op.DEVICE_SYNC, Empty),
        _c(Op.EVENT_CREATE, Empty, Handle),
        _c(Op.EVENT_DESTROY, Handle),
        _c(Op.EVENT_RECORD, _EventStream, sync=False),
        _c(Op.EVENT_WAIT, _EventStream, sync=False),
        _c(Op.EVENT_SYNC, Handle),
        _c(Op.EVENT_QUERY, Handle, Struct("completed" / Int8ul).compile()),
        _c(Op.EVENT_RESET, _EventStream, sync=False),
        _c(
            Op.EVENT_ELAPSED,
            Struct("start" / Int64ul, "end" / Int64ul).compile(),
            Struct("ns" / Int64ul).compile(),
        ),
        _c(Op.MALLOC, Struct("size" / Int64ul, "policy" / Int32ul).compile(), Struct("ptr" / Int64ul).compile()),
        _c(Op.FREE, Struct("ptr" / Int64ul).compile()),
        _c(Op.MEM_INFO, Struct("attr" / Int32ul).compile(), Struct("free" / Int64ul, "total" / Int64ul).compile()),
        _c(Op.MEMCPY_H2D, _Copy, bulk=True),
        _c(Op.MEMCPY_D2H, _Copy),
        _c(Op.MEMCPY_D2D, _Copy),
        _c(Op.MEMSET, _Fill),
        _c(Op.MEMCPY_H2D_ASYNC, _StreamCopy, sync=False, bulk=True),
        _c(Op.MEMCPY_D2H_ASYNC, _StreamCopy, sync=False),
        _c(Op.MEMCPY_D2D_ASYNC, _StreamCopy, sync=False),
        _c(Op.MEMSET_ASYNC, _StreamFill, sync=False),
    )
}
BY_CMD: dict[int, Command] = {c.cmd: c for c in COMMANDS.values()}


@dataclass(frozen=True, slots=True)
class Record:
    command: Command
    seq: int
    args: dict  # the fixed part, parsed
    data: memoryview  # bulk data after the fixed part (empty unless command.bulk)


@dataclass(frozen=True, slots=True)
class Reply:
    seq: int
    status: int
    payload: bytes | memoryview


# -- encoding --------------------------------------------------------------------------------------------


def frame(parts: list[bytes], count: int) -> bytes:
    body = b"".join(parts)
    return FrameHeader.build(dict(magic=MAGIC, version=PROTOCOL_VERSION, flags=0, count=count, length=len(body))) + body


def encode_record(command: Command, seq: int, data: bytes | memoryview = b"", **args) -> list[bytes]:
    """A record as parts to join, so that bulk data is copied once, into the frame."""
    fixed = command.request.build(args)
    header = RecordHeader.build(dict(cmd=command.cmd, seq=seq, length=len(fixed) + len(data)))
    return [header, fixed, data] if data else [header + fixed]


def encode_reply(seq: int, status: int, payload: bytes | memoryview = b"") -> list[bytes]:
    return [ReplyHeader.build(dict(seq=seq, status=status, length=len(payload))), payload]


# -- decoding --------------------------------------------------------------------------------------------


class FrameBuffer:
    """Reassembles frames from the pieces a transport hands over (FUSE splits big writes into 1 MiB pieces).

    The header is checked as soon as it is complete, so garbage is refused at its first write rather than
    after waiting for a length it never meant.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._have = 0
        self._need: int | None = None  # full frame size once the header is known
        self._count = 0

    @property
    def pending(self) -> int:
        return self._have

    def feed(self, data: bytes) -> list[tuple[int, memoryview]]:
        """Add bytes; return (record count, body) of every frame now complete."""
        self._parts.append(data)
        self._have += len(data)
        frames = []
        while True:
            if self._need is None:
                if self._have < FRAME_HEADER_SIZE:
                    break
                self._count, length = check_header(self._peek(FRAME_HEADER_SIZE))
                self._need = FRAME_HEADER_SIZE + length
            if self._have < self._need:
                break
            buf = self._take(self._need)
            frames.append((self._count, memoryview(buf)[FRAME_HEADER_SIZE:]))
            self._need = None
        return frames

    def _peek(self, n: int) -> bytes:
        if len(self._parts[0]) < n:
            self._parts = [b"".join(self._parts)]
        return self._parts[0][:n]

    def _take(self, n: int) -> bytes:
        joined = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        rest = joined[n:]
        self._parts = [rest] if rest else []
        self._have = len(rest)
        return joined[:n] if rest else joined


def check_header(raw: bytes) -> tuple[int, int]:
    """Validate a frame header; return the record count and the length of the records that follow it."""
    header = FrameHeader.parse(raw)
    if header.magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(header.magic)!r} (expected {MAGIC!r}): not a FlexNPU client?")
    if header.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: client speaks {header.version}, daemon speaks {PROTOCOL_VERSION}; "
            "use an interposer from the same FlexNPU release as the daemon"
        )
    if header.length > MAX_FRAME:
        raise ProtocolError(f"frame of {header.length} bytes exceeds the {MAX_FRAME}-byte limit")
    return header.count, header.length


def decode_records(count: int, body: memoryview) -> list[Record]:
    """Split a frame body into records. Any inconsistency rejects the whole frame: nothing in it runs."""
    records = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < RECORD_HEADER_SIZE:
            raise ProtocolError(f"truncated record header at byte {offset} of a {end}-byte frame")
        header = RecordHeader.parse(body[offset : offset + RECORD_HEADER_SIZE])
        offset += RECORD_HEADER_SIZE
        command = BY_CMD.get(header.cmd)
        if command is None:
            raise ProtocolError(f"unknown command 0x{header.cmd:08x} in record seq {header.seq}")
        if header.length > end - offset:
            raise ProtocolError(
                f"record seq {header.seq} ({command.op.name}) claims {header.length} bytes, "
                f"only {end - offset} left in the frame"
            )
        fixed = command.fixed_size
        payload = body[offset : offset + header.length]
        if len(payload) < fixed or (len(payload) != fixed and not command.bulk):
            raise ProtocolError(
                f"record seq {header.seq} ({command.op.name}) has a {len(payload)}-byte payload, expected "
                f"{fixed}{' or more' if command.bulk else ''}"
            )
        try:
            args = command.request.parse(payload[:fixed])
        except StreamError as exc:
            raise ProtocolError(f"record seq {header.seq} ({command.op.name}): {exc}") from None
        records.append(Record(command, header.seq, args, payload[fixed:]))
        offset += header.length
    if len(records) != count:
        raise ProtocolError(f"frame header announces {count} records, the frame holds {len(records)}")
    return records


def decode_replies(body: memoryview) -> list[Reply]:
    replies = []
    offset, end = 0, len(body)
    while offset < end:
        header = ReplyHeader.parse(body[offset : offset + REPLY_HEADER_SIZE])
        offset += REPLY_HEADER_SIZE
        replies.append(Reply(header.seq, header.status, body[offset : offset + header.length]))
        offset += header.length
    return replies
