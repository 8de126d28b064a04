"""Frames, records and replies in the standard library: struct.Structs built from the generated layouts.

The variable-length payloads the client needs (an operator's description, the handshake reply) are encoded
by hand here; tests/unit/test_client_codec.py checks both against the construct definitions.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from . import layouts
from .errors import AclCallError, AclError

PROTOCOL_VERSION = layouts.PROTOCOL_VERSION
MAGIC = layouts.MAGIC
OWN_LIMITS = layouts.OWN_LIMITS
FRAME_HEADER = struct.Struct(layouts.FRAME_HEADER[0])
RECORD_HEADER = struct.Struct(layouts.RECORD_HEADER[0])
REPLY_HEADER = struct.Struct(layouts.REPLY_HEADER[0])
FRAME_HEADER_SIZE = FRAME_HEADER.size

Op = IntEnum("Op", {name: spec[0] for name, spec in layouts.COMMANDS.items()})
AttrKind = IntEnum("AttrKind", layouts.ATTR_KINDS)


def is_device_address(ptr: int) -> bool:
    return ptr >= layouts.DEVICE_VA_BASE


class Layout:
    """A fixed layout: parse() gives a namedtuple-like object, the request fields pack in declared order."""

    def __init__(self, name: str, spec: tuple) -> None:
        fmt, self.names, self.consts = spec
        self.name = name
        self.codec = struct.Struct(fmt)
        self.tuple = NamedTuple(name, [(n, object) for n in self.names])

    def parse(self, data) -> tuple:
        return self.tuple._make(self.codec.unpack(data))

    def values(self, args: dict) -> list:
        try:
            if not self.consts:
                return [args[n] for n in self.names]
            return [self.consts[n] if n in self.consts else args[n] for n in self.names]
        except KeyError as exc:
            raise AclCallError(f"{self.name}: missing field {exc.args[0]}") from None


class Command:
    def __init__(self, op: Op, spec: tuple) -> None:
        _, self.cmd, request, reply, self.sync, self.bulk = spec
        self.op = op
        self.request = Layout(op.name, request)
        self.reply = Layout(op.name + "Reply", reply) if reply else None
        self.fixed_size = self.request.codec.size
        # A frame holding just this record, packed by one struct: the hot path of a synchronous call.
        self._solo = struct.Struct(FRAME_HEADER.format + RECORD_HEADER.format[1:] + self.request.codec.format[1:])

    def solo_frame(self, seq: int, args: dict) -> bytes:
        length = RECORD_HEADER.size + self.fixed_size
        try:
            return self._solo.pack(
                MAGIC, PROTOCOL_VERSION, 0, 1, length, self.cmd, seq, self.fixed_size, *self.request.values(args)
            )
        except struct.error as exc:
            raise AclCallError(f"{self.op.name}: a value does not fit its field ({exc})") from None

    def record(self, seq: int, data: bytes | memoryview, args: dict) -> list:
        try:
            fixed = self.request.codec.pack(*self.request.values(args))
        except struct.error as exc:
            raise AclCallError(f"{self.op.name}: a value does not fit its field ({exc})") from None
        header = RECORD_HEADER.pack(self.cmd, seq, len(fixed) + len(data))
        return [header + fixed, data] if data else [header + fixed]


COMMANDS = {op: Command(op, layouts.COMMANDS[op.name]) for op in Op}


class Reply(NamedTuple):
    seq: int
    status: int
    payload: bytes | memoryview


def frame(parts: list, count: int) -> list:
    """A frame as a list of buffers, written with one writev: bulk data is never joined into a copy."""
    length = sum(len(p) for p in parts)
    return [FRAME_HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, count, length), *parts]


def check_header(raw: bytes | memoryview) -> int:
    """Validate a reply frame's header; return the length of its body."""
    magic, version, _, _, length = FRAME_HEADER.unpack_from(raw)
    if magic != MAGIC or version != PROTOCOL_VERSION:
        raise AclCallError(
            f"the daemon answered with protocol {bytes(magic)!r} v{version}, this client speaks {MAGIC!r} "
            f"v{PROTOCOL_VERSION}: use a shim from the same FlexNPU release as the daemon",
            AclError.INVALID_PARAM,
        )
    return length


def decode_replies(body) -> list[Reply]:
    """Split a reply frame's body. Direct mode hands over a body still in pieces (interposer.wire.Body): it
    is read through its read(offset, n), so a big copy's bytes are not joined first."""
    read = getattr(body, "read", None)
    replies, offset, end = [], 0, len(body)
    while offset < end:
        if read:
            seq, status, length = REPLY_HEADER.unpack(read(offset, REPLY_HEADER.size))
        else:
            seq, status, length = REPLY_HEADER.unpack_from(body, offset)
        offset += REPLY_HEADER.size
        replies.append(Reply(seq, status, read(offset, length) if read else body[offset : offset + length]))
        offset += length
    return replies


# -- variable payloads -------------------------------------------------------------------------------------


def _pascal(text: str, prefix: str) -> bytes:
    raw = text.encode()
    return struct.pack(prefix, len(raw)) + raw


def _array(fmt: str, values) -> bytes:
    values = list(values)
    return struct.pack(f"<H{len(values)}{fmt}", len(values), *values)


_ATTR_VALUE = {
    AttrKind.INT: lambda v: struct.pack("<q", v),
    AttrKind.FLOAT: lambda v: struct.pack("<d", v),
    AttrKind.BOOL: lambda v: struct.pack("<?", v),
    AttrKind.STRING: lambda v: _pascal(v, "<H"),
    AttrKind.LIST_INT: lambda v: _array("q", v),
    AttrKind.LIST_FLOAT: lambda v: _array("d", v),
    AttrKind.LIST_BOOL: lambda v: _array("?", v),
}


def _tensor(dtype: int, fmt: int, dims) -> bytes:
    dims = list(dims)
    return struct.pack(f"<iiB{len(dims)}q", dtype, fmt, len(dims), *dims)


def op_description(op_type: str, inputs: list, outputs: list, attrs: dict) -> bytes:
    """wire.OpDescription: inputs/outputs as (dtype, format, dims); attrs as name -> (AttrKind, value)."""
    try:
        parts = [_pascal(op_type, "<B"), struct.pack("<H", len(inputs))]
        parts += [_tensor(*t) for t in inputs]
        parts.append(struct.pack("<H", len(outputs)))
        parts += [_tensor(*t) for t in outputs]
        parts.append(struct.pack("<H", len(attrs)))
        for name, (kind, value) in attrs.items():
            parts += [_pascal(name, "<B"), struct.pack("<B", kind), _ATTR_VALUE[kind](value)]
    except struct.error as exc:
        raise AclCallError(f"{op_type}: a descriptor or attribute does not fit the call ({exc})") from None
    return b"".join(parts)


class Hello(NamedTuple):
    version: int
    total_memory: int
    name: str
    chip: str


def hello_reply(payload: bytes | memoryview) -> Hello:
    """The handshake's reply (wire COMMANDS[HELLO].reply): version, total memory, two short strings."""
    version, total = struct.unpack_from("<HQ", payload)
    offset, strings = 10, []
    for _ in range(2):
        n = payload[offset]
        strings.append(bytes(payload[offset + 1 : offset + 1 + n]).decode())
        offset += 1 + n
    return Hello(version, total, *strings)
