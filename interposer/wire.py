"""The wire format between the interposer and the daemon: frames of ioctl-style records, in construct.

    frame  = header (magic "FNPU", protocol version, record count, length of the records) + records
    record = cmd (an _IOC number: direction, type 'F', command number, size of the fixed part) + seq + length
             + payload (the command's fixed struct, then any bulk data such as memcpy bytes)
    reply  = seq + status (an aclError) + length + payload (the reply struct, or an error message)

Records whose cmd carries _IOC_READ are synchronous: each gets exactly one reply, in order. The others are
asynchronous and get none; their errors surface at the next synchronisation. A reply frame may also carry
deliveries: the bytes of completed asynchronous device-to-host copies, under those records' seq numbers.

These construct definitions are the one source of truth for the format. Fixed-layout structs (every header
and every request) are turned into a `Layout`: one struct.Struct generated from the construct definition, so
the hot path packs and unpacks a record in one C call. Measured on the 2-core dev machine, a synchronous call
in direct mode cost 107 us with construct's compiled parsers and builders (stream objects and Containers per
call) and far less with Layouts; tests check that both agree on every record.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections import namedtuple
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from construct import (
    Bytes,
    Const,
    Error,
    Flag,
    Float64l,
    FormatField,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64sl,
    Int64ul,
    PascalString,
    PrefixedArray,
    Renamed,
    Struct,
    Switch,
    Terminated,
    this,
)

from npu.errors import InvalidParam, ProtocolError

PROTOCOL_VERSION = 2  # 2: core limits (STREAM_LIMIT_*, DEVICE_LIMIT_*, OpLaunch.limits), IPC memory, task groups
MAGIC = b"FNPU"
MAX_FRAME = 256 << 20  # the client splits bigger copies into several records

# Linux _IOC encoding (asm-generic/ioctl.h): nr 8 bits, type 8, size 14, dir 2.
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
IOC_TYPE = ord("F")


def ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (IOC_TYPE << 8) | nr


class Layout:
    """A fixed-layout construct Struct of named integer/bytes fields, packed by one generated struct.Struct.

    parse() returns a namedtuple (fields by attribute, like construct's Container); build() takes a mapping,
    pack() keyword arguments. Values that do not fit their field raise InvalidParam naming the struct.
    """

    def __init__(self, name: str, definition: Struct) -> None:
        self.name = name
        self.definition = definition
        fmt, names, self.consts, self.lengths = "<", [], {}, {}
        for sub in definition.subcons:
            if not isinstance(sub, Renamed):
                raise TypeError(f"{name}: every field needs a name")
            field = sub.subcon
            if isinstance(field, Const):
                self.consts[sub.name] = field.value
                field = field.subcon
            if isinstance(field, FormatField):
                fmt += field.fmtstr.lstrip("<>=!")
            elif isinstance(field, Bytes) and isinstance(field.length, int):
                fmt += f"{field.length}s"
                self.lengths[sub.name] = field.length  # struct pads or cuts bytes silently; construct refuses
            else:
                raise TypeError(f"{name}.{sub.name}: not a fixed-size field")
            names.append(sub.name)
        self.names = tuple(names)
        self.codec = struct.Struct(fmt)
        self.tuple = namedtuple(name, names)  # noqa: PYI024 (a generated type per layout)

    def sizeof(self) -> int:
        return self.codec.size

    def parse(self, data) -> tuple:
        values = self.tuple._make(self.codec.unpack(data))
        for key, expected in self.consts.items():
            if getattr(values, key) != expected:
                raise ProtocolError(f"{self.name}.{key} must be {expected!r}, got {getattr(values, key)!r}")
        return values

    def pack(self, **fields) -> bytes:
        return self.build(fields)

    def build(self, fields) -> bytes:
        for key, length in self.lengths.items():
            value = fields.get(key, b"")
            if not isinstance(value, bytes | bytearray) or (key in fields and len(value) != length):
                raise InvalidParam(f"{self.name}.{key}: {value!r:.40} is not the {length} bytes the field holds")
        try:
            return self.codec.pack(*[fields[n] for n in self.names])
        except KeyError as exc:
            raise InvalidParam(f"{self.name}: missing field {exc.args[0]}") from None
        except struct.error as exc:
            raise InvalidParam(f"{self.name}: a value does not fit its field ({exc})") from None


def layout(name: str, *fields) -> Layout:
    return Layout(name, Struct(*fields))


FrameHeader = layout(
    "FrameHeader", "magic" / Bytes(4), "version" / Int16ul, "flags" / Int16ul, "count" / Int32ul, "length" / Int32ul
)
RecordHeader = layout("RecordHeader", "cmd" / Int32ul, "seq" / Int32ul, "length" / Int32ul)
ReplyHeader = layout("ReplyHeader", "seq" / Int32ul, "status" / Int32ul, "length" / Int32ul)
FRAME_HEADER_SIZE = FrameHeader.sizeof()
RECORD_HEADER_SIZE = RecordHeader.sizeof()
REPLY_HEADER_SIZE = ReplyHeader.sizeof()

Handle = layout("Handle", "handle" / Int64ul)
Empty = layout("Empty")


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
    STREAM_LIMIT_SET = 24
    STREAM_LIMIT_GET = 25
    DEVICE_LIMIT_SET = 26
    DEVICE_LIMIT_GET = 27
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
    OP_TEMPLATE = 60
    OP_LAUNCH = 61
    GRAPH_CAPTURE_BEGIN = 70
    GRAPH_CAPTURE_END = 71
    GRAPH_LAUNCH = 72
    GRAPH_DESTROY = 73
    GRAPH_GROUP_BEGIN = 74
    GRAPH_GROUP_END = 75
    GRAPH_UPDATE_BEGIN = 76
    GRAPH_UPDATE_END = 77
    IPC_EXPORT = 80
    IPC_ALLOW = 81
    IPC_IMPORT = 82
    IPC_CLOSE = 83
    BARE_TGID = 84


@dataclass(frozen=True)
class Command:
    op: Op
    request: Layout  # fixed part; bulk data may follow it in the payload
    reply: Layout | Struct  # reply payload on success (construct Structs only where strings make it variable)
    sync: bool
    bulk: bool = False  # the payload carries data after the fixed part
    cmd: int = 0  # the _IOC number, derived
    fixed_size: int = 0  # derived

    def __post_init__(self) -> None:
        direction = IOC_READ | IOC_WRITE if self.sync else IOC_WRITE
        object.__setattr__(self, "fixed_size", self.request.sizeof())
        object.__setattr__(self, "cmd", ioc(direction, self.op, self.fixed_size))
        # A frame holding just this record, packed by one struct: the hot path of a synchronous call.
        solo = FrameHeader.codec.format + RecordHeader.codec.format[1:] + self.request.codec.format[1:]
        object.__setattr__(self, "_solo", struct.Struct(solo))

    def solo_frame(self, seq: int, args: dict) -> bytes:
        """The frame of this record alone (no bulk data): what frame(encode_record(...), 1) builds."""
        try:
            fields = [args[n] for n in self.request.names]
            return self._solo.pack(
                MAGIC,
                PROTOCOL_VERSION,
                0,
                1,
                RECORD_HEADER_SIZE + self.fixed_size,
                self.cmd,
                seq,
                self.fixed_size,
                *fields,
            )
        except (KeyError, struct.error):
            self.request.build(args)  # raises InvalidParam naming the field
            raise


def _c(op, request, reply=Empty, sync=True, bulk=False):
    return Command(op, request, reply, sync, bulk)


_Copy = layout("Copy", "dst" / Int64ul, "src" / Int64ul, "count" / Int64ul)
_Fill = layout("Fill", "ptr" / Int64ul, "value" / Int32ul, "count" / Int64ul)
_StreamCopy = layout("StreamCopy", "stream" / Int64ul, "dst" / Int64ul, "src" / Int64ul, "count" / Int64ul)
_StreamFill = layout("StreamFill", "stream" / Int64ul, "ptr" / Int64ul, "value" / Int32ul, "count" / Int64ul)
_EventStream = layout("EventStream", "event" / Int64ul, "stream" / Int64ul)
_Limit = layout("Limit", "value" / Int32ul)
_Stream = layout("Stream", "stream" / Int64ul)
_Pointer = layout("Pointer", "ptr" / Int64ul)
_IpcKey = layout("IpcKey", "key" / Bytes(64))
OWN_LIMITS = (1 << 64) - 1  # OpLaunch.limits: the launch's own stream's (0 names the default stream)

COMMANDS: dict[Op, Command] = {
    c.op: c
    for c in (
        _c(
            Op.HELLO,
            layout("Hello", "version" / Int16ul, "phase" / Int8ul, "pad" / Const(0, Int8ul), "pid" / Int32ul),
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
        _c(Op.STREAM_CREATE, layout("StreamCreate", "priority" / Int32ul, "flag" / Int32ul), Handle),
        _c(Op.STREAM_DESTROY, Handle),
        _c(Op.STREAM_SYNC, Handle),
        _c(Op.DEVICE_SYNC, Empty),
        # Core limits (aclrtSetStreamResLimit / aclrtSetDeviceResLimit): `kind` is an aclrtDevResLimitType.
        _c(Op.STREAM_LIMIT_SET, layout("StreamLimit", "stream" / Int64ul, "kind" / Int32ul, "value" / Int32ul)),
        _c(Op.STREAM_LIMIT_GET, layout("StreamLimitQuery", "stream" / Int64ul, "kind" / Int32ul), _Limit),
        _c(Op.DEVICE_LIMIT_SET, layout("DeviceLimit", "kind" / Int32ul, "value" / Int32ul)),
        _c(Op.DEVICE_LIMIT_GET, layout("DeviceLimitQuery", "kind" / Int32ul), _Limit),
        _c(Op.EVENT_CREATE, Empty, Handle),
        _c(Op.EVENT_DESTROY, Handle),
        _c(Op.EVENT_RECORD, _EventStream, sync=False),
        _c(Op.EVENT_WAIT, _EventStream, sync=False),
        _c(Op.EVENT_SYNC, Handle),
        _c(Op.EVENT_QUERY, Handle, layout("EventStatus", "completed" / Int8ul)),
        _c(Op.EVENT_RESET, _EventStream, sync=False),
        _c(
            Op.EVENT_ELAPSED,
            layout("EventPair", "start" / Int64ul, "end" / Int64ul),
            layout("Elapsed", "ns" / Int64ul),
        ),
        _c(Op.MALLOC, layout("Malloc", "size" / Int64ul, "policy" / Int32ul), _Pointer),
        _c(Op.FREE, layout("Free", "ptr" / Int64ul)),
        _c(Op.MEM_INFO, layout("MemInfo", "attr" / Int32ul), layout("MemFree", "free" / Int64ul, "total" / Int64ul)),
        _c(Op.MEMCPY_H2D, _Copy, bulk=True),
        _c(Op.MEMCPY_D2H, _Copy),
        _c(Op.MEMCPY_D2D, _Copy),
        _c(Op.MEMSET, _Fill),
        _c(Op.MEMCPY_H2D_ASYNC, _StreamCopy, sync=False, bulk=True),
        _c(Op.MEMCPY_D2H_ASYNC, _StreamCopy, sync=False),
        _c(Op.MEMCPY_D2D_ASYNC, _StreamCopy, sync=False),
        _c(Op.MEMSET_ASYNC, _StreamFill, sync=False),
        # An operator's description once per session (bulk: an OpDescription), then launches naming it by
        # template id with their buffer addresses (bulk: `count` little-endian u64), so a launch stays small.
        # `limits`: the stream whose core limits apply (aclrtUseStreamResInCurrentThread), or OWN_LIMITS.
        _c(Op.OP_TEMPLATE, layout("OpTemplate", "template" / Int32ul), sync=False, bulk=True),
        _c(
            Op.OP_LAUNCH,
            layout("OpLaunch", "stream" / Int64ul, "template" / Int32ul, "count" / Int32ul, "limits" / Int64ul),
            sync=False,
            bulk=True,
        ),
        _c(Op.GRAPH_CAPTURE_BEGIN, layout("CaptureBegin", "stream" / Int64ul, "mode" / Int32ul)),
        _c(Op.GRAPH_CAPTURE_END, layout("CaptureEnd", "stream" / Int64ul), Handle),
        _c(Op.GRAPH_LAUNCH, layout("GraphLaunch", "graph" / Int64ul, "stream" / Int64ul), sync=False),
        _c(Op.GRAPH_DESTROY, Handle),
        # Task groups of a capture, whose tasks a later update replaces (aclmdlRICaptureTaskGrp*/TaskUpdate*).
        _c(Op.GRAPH_GROUP_BEGIN, _Stream),
        _c(Op.GRAPH_GROUP_END, _Stream, Handle),
        # A task update travels with the stream's other asynchronous work: no round trip; a refused update is
        # reported by the stream's next synchronisation, as a failed operator would be.
        _c(Op.GRAPH_UPDATE_BEGIN, layout("UpdateBegin", "stream" / Int64ul, "group" / Int64ul), sync=False),
        _c(Op.GRAPH_UPDATE_END, _Stream, sync=False),
        # IPC memory: part of an allocation exported under a key, imported by processes on the allow-list
        # (bulk of IPC_ALLOW: little-endian i32 pids).
        _c(Op.IPC_EXPORT, layout("IpcExport", "ptr" / Int64ul, "size" / Int64ul, "flags" / Int64ul), _IpcKey),
        _c(Op.IPC_ALLOW, _IpcKey, bulk=True),
        _c(Op.IPC_IMPORT, layout("IpcImport", "key" / Bytes(64), "flags" / Int64ul), _Pointer),
        _c(Op.IPC_CLOSE, _IpcKey),
        _c(Op.BARE_TGID, Empty, layout("Tgid", "pid" / Int32ul)),
    )
}
BY_CMD: dict[int, Command] = {c.cmd: c for c in COMMANDS.values()}


class AttrKind(IntEnum):
    INT = 0
    FLOAT = 1
    BOOL = 2
    STRING = 3
    LIST_INT = 4
    LIST_FLOAT = 5
    LIST_BOOL = 6


TensorDescription = Struct("dtype" / Int32sl, "format" / Int32sl, "dims" / PrefixedArray(Int8ul, Int64sl))
Attribute = Struct(
    "name" / PascalString(Int8ul, "utf8"),
    "kind" / Int8ul,
    "value"
    / Switch(
        this.kind,
        {
            AttrKind.INT: Int64sl,
            AttrKind.FLOAT: Float64l,
            AttrKind.BOOL: Flag,
            AttrKind.STRING: PascalString(Int16ul, "utf8"),
            AttrKind.LIST_INT: PrefixedArray(Int16ul, Int64sl),
            AttrKind.LIST_FLOAT: PrefixedArray(Int16ul, Float64l),
            AttrKind.LIST_BOOL: PrefixedArray(Int16ul, Flag),
        },
        default=Error,
    ),
)
OpDescription = Struct(
    "op_type" / PascalString(Int8ul, "utf8"),
    "inputs" / PrefixedArray(Int16ul, TensorDescription),
    "outputs" / PrefixedArray(Int16ul, TensorDescription),
    "attrs" / PrefixedArray(Int16ul, Attribute),
    Terminated,
)


class Record(NamedTuple):  # NamedTuples, not frozen dataclasses: built per call, at a third of the cost
    command: Command
    seq: int
    args: tuple  # the fixed part, parsed (a namedtuple)
    data: memoryview | Scattered  # bulk data after the fixed part (empty unless command.bulk)


class Reply(NamedTuple):
    seq: int
    status: int
    payload: bytes | memoryview


# -- encoding --------------------------------------------------------------------------------------------


Parts = list[bytes | memoryview]


def frame(parts: Parts, count: int) -> Parts:
    """A frame as a list of buffers, written with one writev: bulk data is never joined into a copy."""
    length = sum(len(p) for p in parts)
    return [FrameHeader.codec.pack(MAGIC, PROTOCOL_VERSION, 0, count, length), *parts]


def encode_record(command: Command, seq: int, data: bytes | memoryview = b"", **args) -> Parts:
    fixed = command.request.build(args)
    header = RecordHeader.codec.pack(command.cmd, seq, len(fixed) + len(data))
    return [header + fixed, data] if data else [header + fixed]


def encode_reply(seq: int, status: int, payload: bytes | memoryview = b"") -> Parts:
    header = ReplyHeader.codec.pack(seq, status, len(payload))
    return [header, payload] if payload else [header]


# -- decoding --------------------------------------------------------------------------------------------


class Scattered:
    """Bytes that arrived in several pieces and were never joined: bulk data of a frame FUSE split up."""

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.nbytes = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


class Body:
    """A frame body made of the pieces it arrived in. Headers are read from it (copying a few bytes where
    one straddles two pieces); bulk data is handed on as views of the pieces, so a 64 MiB memcpy is copied
    once, into device memory, instead of first being joined."""

    def __init__(self, pieces: list[memoryview]) -> None:
        self.pieces = pieces
        self.starts = list(itertools.accumulate((len(p) for p in pieces), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def view(self, offset: int, n: int) -> memoryview | Scattered:
        i = bisect.bisect_right(self.starts, offset) - 1
        local = offset - self.starts[i]
        if i < len(self.pieces) and local + n <= len(self.pieces[i]):
            return self.pieces[i][local : local + n]
        parts, end = [], offset + n
        while offset < end:
            piece = self.pieces[i]
            take = min(len(piece) - local, end - offset)
            parts.append(piece[local : local + take])
            offset, i, local = offset + take, i + 1, 0
        return Scattered(parts)

    def read(self, offset: int, n: int) -> bytes | memoryview:
        part = self.view(offset, n)
        return bytes(part) if isinstance(part, Scattered) else part


class FrameBuffer:
    """Reassembles frames from the pieces a transport hands over (FUSE splits big writes into 1 MiB pieces).

    A header is checked as soon as its 16 bytes are in, so garbage is refused at its first write rather than
    after waiting for a length it never meant. A piece holding whole frames yields them as plain views; a
    frame spread over pieces yields a Body over those pieces. Nothing is copied either way.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._pieces: list[memoryview] = []
        self._count = 0
        self._need: int | None = None  # body length, once the header is in
        self._got = 0

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (0 between frames)."""
        return len(self._header) + (FRAME_HEADER_SIZE + self._got if self._need is not None else 0)

    def feed(self, data: bytes | memoryview) -> list[tuple[int, memoryview | Body]]:
        """Add bytes; return (record count, body) of every frame now complete."""
        frames: list[tuple[int, memoryview | Body]] = []
        view = memoryview(data).cast("B")
        while view:
            if self._need is None:
                if not self._header and len(view) >= FRAME_HEADER_SIZE:
                    count, length = check_header(view)
                    end = FRAME_HEADER_SIZE + length
                    if len(view) >= end:  # the whole frame is in this piece
                        frames.append((count, view[FRAME_HEADER_SIZE:end]))
                        view = view[end:]
                        continue
                    view = view[FRAME_HEADER_SIZE:]
                else:
                    take = FRAME_HEADER_SIZE - len(self._header)
                    self._header += view[:take]
                    view = view[take:]
                    if len(self._header) < FRAME_HEADER_SIZE:
                        break
                    count, length = check_header(bytes(self._header))
                    self._header.clear()
                self._count, self._need, self._got = count, length, 0
            take = min(len(view), self._need - self._got)
            if take:
                self._pieces.append(view[:take])
            self._got += take
            view = view[take:]
            if self._got == self._need:
                frames.append((self._count, Body(self._pieces)))
                self._pieces, self._need, self._got = [], None, 0
        return frames


def check_header(raw: bytes | memoryview) -> tuple[int, int]:
    """Validate the frame header `raw` starts with; return the record count and the length of the records."""
    magic, version, _, count, length = FrameHeader.codec.unpack_from(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r}): not a FlexNPU client?")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: client speaks {version}, daemon speaks {PROTOCOL_VERSION}; "
            "use an interposer from the same FlexNPU release as the daemon"
        )
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return count, length


def decode_records(count: int, body: memoryview | Body) -> list[Record]:
    """Split a frame body into records. Any inconsistency rejects the whole frame: nothing in it runs."""
    records = []
    offset, end = 0, len(body)
    pieces = isinstance(body, Body)
    while offset < end:
        if end - offset < RECORD_HEADER_SIZE:
            raise ProtocolError(f"truncated record header at byte {offset} of a {end}-byte frame")
        if pieces:
            cmd, seq, length = RecordHeader.codec.unpack(body.read(offset, RECORD_HEADER_SIZE))
        else:
            cmd, seq, length = RecordHeader.codec.unpack_from(body, offset)
        offset += RECORD_HEADER_SIZE
        command = BY_CMD.get(cmd)
        if command is None:
            raise ProtocolError(f"unknown command 0x{cmd:08x} in record seq {seq}")
        if length > end - offset:
            raise ProtocolError(
                f"record seq {seq} ({command.op.name}) claims {length} bytes, only {end - offset} left in the frame"
            )
        fixed = command.fixed_size
        if length < fixed or (length != fixed and not command.bulk):
            raise ProtocolError(
                f"record seq {seq} ({command.op.name}) has a {length}-byte payload, expected "
                f"{fixed}{' or more' if command.bulk else ''}"
            )
        if pieces:
            args = command.request.parse(body.read(offset, fixed))
            data = body.view(offset + fixed, length - fixed)
        else:
            args = command.request.parse(body[offset : offset + fixed])
            data = body[offset + fixed : offset + length]
        records.append(Record(command, seq, args, data))
        offset += length
    if len(records) != count:
        raise ProtocolError(f"frame header announces {count} records, the frame holds {len(records)}")
    return records


def decode_replies(body: memoryview | Body) -> list[Reply]:
    replies = []
    offset, end = 0, len(body)
    pieces = isinstance(body, Body)
    while offset < end:
        if pieces:
            seq, status, length = ReplyHeader.codec.unpack(body.read(offset, REPLY_HEADER_SIZE))
        else:
            seq, status, length = ReplyHeader.codec.unpack_from(body, offset)
        offset += REPLY_HEADER_SIZE
        payload = body.read(offset, length) if pieces else body[offset : offset + length]
        replies.append(Reply(seq, status, payload))
        offset += length
    return replies
