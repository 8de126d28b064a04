"""The wire format (interposer/wire.py): framing over arbitrary transport splits, record decoding, the
struct-generated Layouts against their construct definitions, the errors a bad frame gets, and _IOC numbers."""

from __future__ import annotations

import errno

import pytest
from construct import Bytes, Const, ConstructError, FormatField
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interposer import wire
from interposer.wire import COMMANDS, Op
from npu.errors import InvalidParam, ProtocolError

FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

PER_COMMAND = settings(FAST, max_examples=50)

ALL_COMMANDS = list(COMMANDS.values())


# -- helpers ---------------------------------------------------------------------------------------------


def field_ranges(layout: wire.Layout) -> dict[str, st.SearchStrategy]:
    """A strategy per field of `layout`, every value within the field's range (Const fields: their value)."""
    fields: dict[str, st.SearchStrategy] = {}
    for sub in layout.definition.subcons:
        field = sub.subcon
        if isinstance(field, Const):
            fields[sub.name] = st.just(field.value)
            continue
        if isinstance(field, Bytes):  # an IPC memory key
            fields[sub.name] = st.binary(min_size=field.length, max_size=field.length)
            continue
        assert isinstance(field, FormatField)
        assert field.fmtstr[0] == "<" and field.fmtstr[1] in "BHLQ", "every request field is little-endian unsigned"
        fields[sub.name] = st.integers(0, (1 << (8 * field.sizeof())) - 1)
    return fields


def args_for(command: wire.Command) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(field_ranges(command.request))


@st.composite
def records(draw) -> tuple[wire.Command, int, dict, bytes]:
    command = draw(st.sampled_from(ALL_COMMANDS))
    seq = draw(st.integers(0, (1 << 32) - 1))
    args = draw(args_for(command))
    data = draw(st.binary(max_size=200)) if command.bulk else b""
    return command, seq, args, data


def build_frame(recs) -> bytes:
    parts: list = []
    for command, seq, args, data in recs:
        parts += wire.encode_record(command, seq, data, **args)
    return b"".join(bytes(p) for p in wire.frame(parts, len(recs)))


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    """`blob` cut at the given offsets (duplicates give empty pieces, which a transport may hand over too)."""
    points = [0, *sorted(min(c, len(blob)) for c in cuts), len(blob)]
    return [blob[a:b] for a, b in zip(points, points[1:], strict=False)]


def feed_all(pieces) -> tuple[wire.FrameBuffer, list]:
    buffer = wire.FrameBuffer()
    frames = []
    for piece in pieces:
        frames += buffer.feed(piece)
    return buffer, frames


def decode_one(blob: bytes, how: str) -> list[wire.Record]:
    """Decode a single frame, handed over whole (a plain view) or one byte at a time (a Body over pieces)."""
    pieces = [blob] if how == "whole" else [blob[i : i + 1] for i in range(len(blob))]
    _, frames = feed_all(pieces)
    assert len(frames) == 1
    count, body = frames[0]
    return wire.decode_records(count, body)


def record_bytes(cmd: int, seq: int, payload: bytes, length: int | None = None) -> bytes:
    return wire.RecordHeader.codec.pack(cmd, seq, len(payload) if length is None else length) + payload


def frame_bytes(body: bytes, count: int, version: int = wire.PROTOCOL_VERSION, magic: bytes = wire.MAGIC) -> bytes:
    return wire.FrameHeader.codec.pack(magic, version, 0, count, len(body)) + body


def assert_protocol_error(exc: ProtocolError) -> None:
    assert isinstance(exc, ProtocolError)
    assert exc.errno == errno.EINVAL


def free_record(seq: int = 7, ptr: int = 0x1000_0000_0000_0000) -> bytes:
    return record_bytes(COMMANDS[Op.FREE].cmd, seq, COMMANDS[Op.FREE].request.pack(ptr=ptr))


HOW = pytest.mark.parametrize("how", ["whole", "bytewise"])


# -- round trips -----------------------------------------------------------------------------------------


@FAST
@given(recs=st.lists(records(), max_size=6), data=st.data())
def test_frame_round_trips_through_any_split(recs, data):
    blob = build_frame(recs)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=12), label="cuts")
    buffer, frames = feed_all(split(blob, cuts))

    assert len(frames) == 1
    assert buffer.pending == 0
    count, body = frames[0]
    decoded = wire.decode_records(count, body)
    assert len(decoded) == len(recs)
    for record, (command, seq, args, payload) in zip(decoded, recs, strict=True):
        assert record.command is command
        assert record.seq == seq
        assert record.args._asdict() == args
        assert bytes(record.data) == payload


@FAST
@given(recs=st.lists(records(), min_size=1, max_size=3), cut=st.integers(1, wire.FRAME_HEADER_SIZE - 1))
def test_split_inside_the_frame_header(recs, cut):
    blob = build_frame(recs)
    buffer = wire.FrameBuffer()
    assert buffer.feed(blob[:cut]) == []
    assert buffer.pending == cut
    frames = buffer.feed(blob[cut:])
    assert len(frames) == 1
    decoded = wire.decode_records(*frames[0])
    assert [(r.command.op, r.seq, bytes(r.data)) for r in decoded] == [(c.op, s, d) for c, s, _, d in recs]


@FAST
@given(first=st.lists(records(), max_size=3), second=st.lists(records(), max_size=3), data=st.data())
def test_consecutive_frames_come_out_separately(first, second, data):
    blob1, blob2 = build_frame(first), build_frame(second)
    blob = blob1 + blob2
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8), label="cuts")
    buffer, frames = feed_all(split(blob, cuts))

    assert buffer.pending == 0
    assert len(frames) == 2
    for (count, body), recs in zip(frames, (first, second), strict=True):
        decoded = wire.decode_records(count, body)
        assert [(r.command.op, r.seq, r.args._asdict(), bytes(r.data)) for r in decoded] == [
            (c.op, s, a, d) for c, s, a, d in recs
        ]


def test_incomplete_frame_is_held_back():
    blob = build_frame([(COMMANDS[Op.FREE], 1, {"ptr": 5}, b"")])
    buffer = wire.FrameBuffer()
    assert buffer.feed(blob[:-1]) == []
    assert buffer.pending > 0
    frames = buffer.feed(blob[-1:])
    assert len(frames) == 1
    assert buffer.pending == 0


def test_bulk_data_spread_over_pieces_is_handed_on_unjoined():
    payload = bytes(range(256)) * 4
    blob = build_frame([(COMMANDS[Op.MEMCPY_H2D], 3, {"dst": 1, "src": 2, "count": len(payload)}, payload)])
    header_end = wire.FRAME_HEADER_SIZE + wire.RECORD_HEADER_SIZE + COMMANDS[Op.MEMCPY_H2D].fixed_size
    _, frames = feed_all(split(blob, [header_end + 100, header_end + 600]))
    (record,) = wire.decode_records(*frames[0])
    assert isinstance(record.data, wire.Scattered)
    assert len(record.data) == len(payload)
    assert bytes(record.data) == payload


# -- garbage in: only ProtocolError out ------------------------------------------------------------------


def decode_everything(pieces) -> None:
    """Feed pieces and decode every frame that comes out; only ProtocolError may escape."""
    buffer = wire.FrameBuffer()
    try:
        for piece in pieces:
            for count, body in buffer.feed(piece):
                wire.decode_records(count, body)
    except ProtocolError as exc:
        assert_protocol_error(exc)


@FAST
@given(blob=st.binary(max_size=300), data=st.data())
def test_random_bytes_raise_only_protocol_errors(blob, data):
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=6), label="cuts")
    decode_everything(split(blob, cuts))


@FAST
@given(
    count=st.integers(0, 8),
    body=st.binary(max_size=300),
    extra=st.integers(-4, 4),
    data=st.data(),
)
def test_random_bodies_behind_a_valid_header_raise_only_protocol_errors(count, body, extra, data):
    """Random records behind a header that passes its checks, so that decode_records sees the garbage."""
    length = max(0, len(body) + extra)
    blob = wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, count, length) + body
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=6), label="cuts")
    decode_everything(split(blob, cuts))


@st.composite
def plausible_records(draw) -> bytes:
    """Records with real command numbers but arbitrary lengths and payloads."""
    command = draw(st.sampled_from(ALL_COMMANDS))
    cmd = draw(st.sampled_from([command.cmd, command.cmd ^ (1 << 16), draw(st.integers(0, (1 << 32) - 1))]))
    payload = draw(st.binary(max_size=40))
    length = draw(st.sampled_from([len(payload), command.fixed_size, draw(st.integers(0, 64))]))
    return record_bytes(cmd, draw(st.integers(0, 9)), payload, length)


@FAST
@given(recs=st.lists(plausible_records(), max_size=5), count=st.integers(0, 6), data=st.data())
def test_plausible_garbage_records_raise_only_protocol_errors(recs, count, data):
    blob = frame_bytes(b"".join(recs), count)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=6), label="cuts")
    decode_everything(split(blob, cuts))


@FAST
@given(recs=st.lists(records(), min_size=1, max_size=4), data=st.data())
def test_corrupted_valid_frames_raise_only_protocol_errors(recs, data):
    blob = bytearray(build_frame(recs))
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        i = data.draw(st.integers(0, len(blob) - 1), label="at")
        blob[i] = data.draw(st.integers(0, 255), label="byte")
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=6), label="cuts")
    decode_everything(split(bytes(blob), cuts))


# -- Layout against construct ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.op.name)
@PER_COMMAND
@given(data=st.data())
def test_layout_agrees_with_construct(command, data):
    args = data.draw(args_for(command), label="args")
    request = command.request

    built = request.build(args)
    assert built == request.definition.build(args)
    assert built == request.pack(**args)
    assert len(built) == request.sizeof() == request.definition.sizeof() == command.fixed_size

    parsed = request.parse(built)
    reference = request.definition.parse(built)
    assert parsed._asdict() == {name: reference[name] for name in request.names}
    assert parsed._asdict() == args


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.op.name)
@PER_COMMAND
@given(data=st.data())
def test_layout_parses_arbitrary_bytes_like_construct(command, data):
    request = command.request
    raw = data.draw(st.binary(min_size=request.sizeof(), max_size=request.sizeof()), label="raw")
    if request.consts and any(raw[_offset(request, k)] != v for k, v in request.consts.items()):
        with pytest.raises(ProtocolError):
            request.parse(raw)
        return
    parsed = request.parse(raw)
    reference = request.definition.parse(raw)
    assert parsed._asdict() == {name: reference[name] for name in request.names}


def _offset(layout: wire.Layout, name: str) -> int:
    offset = 0
    for sub in layout.definition.subcons:
        if sub.name == name:
            return offset
        offset += sub.sizeof()
    raise KeyError(name)


def test_hello_pad_must_be_zero_on_parse():
    hello = COMMANDS[Op.HELLO].request
    raw = bytearray(hello.pack(version=1, phase=0, pad=0, pid=42))
    raw[_offset(hello, "pad")] = 1
    with pytest.raises(ProtocolError, match="pad"):
        hello.parse(bytes(raw))


def _sized_fields():
    for command in ALL_COMMANDS:
        for sub in command.request.definition.subcons:
            if not isinstance(sub.subcon, Const):
                yield pytest.param(command, sub.name, sub.sizeof(), id=f"{command.op.name}.{sub.name}")


@pytest.mark.parametrize(("command", "name", "size"), list(_sized_fields()))
@pytest.mark.parametrize("which", ["too_big", "negative", "not_an_int"])
def test_layout_build_refuses_values_that_do_not_fit(command, name, size, which):
    args = {k: (v.value if isinstance(v, Const) else 0) for k, v in _subcons(command.request).items()}
    args[name] = {"too_big": 1 << (8 * size), "negative": -1, "not_an_int": "7"}[which]
    with pytest.raises(InvalidParam, match=command.request.name):
        command.request.build(args)


def _subcons(layout: wire.Layout) -> dict:
    return {sub.name: sub.subcon for sub in layout.definition.subcons}


def test_layout_build_names_a_missing_field():
    with pytest.raises(InvalidParam, match="Copy: missing field count"):
        COMMANDS[Op.MEMCPY_D2D].request.build({"dst": 1, "src": 2})


@pytest.mark.parametrize("magic", [b"FNPUX", b"FN"])
def test_layout_build_refuses_bytes_of_the_wrong_length(magic):
    """A bytes field that does not fit is refused, as construct refuses it; it is not silently cut or padded."""
    fields = {"magic": magic, "version": 1, "flags": 0, "count": 0, "length": 0}
    with pytest.raises(ConstructError):
        wire.FrameHeader.definition.build(fields)
    with pytest.raises(InvalidParam, match="FrameHeader"):
        wire.FrameHeader.build(fields)


# -- specific errors -------------------------------------------------------------------------------------


def test_wrong_magic_is_refused_at_the_header():
    buffer = wire.FrameBuffer()
    with pytest.raises(ProtocolError, match="bad frame magic") as info:
        buffer.feed(frame_bytes(free_record(), 1, magic=b"GET "))
    assert_protocol_error(info.value)
    assert "GET " in info.value.message


def test_wrong_magic_is_refused_as_soon_as_the_header_is_in():
    """Garbage is refused at its first write, not after waiting for the body its length field claims."""
    header = wire.FrameHeader.codec.pack(b"HTTP", 1, 0, 1, 1000)
    buffer = wire.FrameBuffer()
    assert buffer.feed(header[:10]) == []
    with pytest.raises(ProtocolError, match="magic"):
        buffer.feed(header[10:])


@pytest.mark.parametrize("split_header", [False, True])
def test_wrong_protocol_version_names_both_versions(split_header):
    version = wire.PROTOCOL_VERSION + 6
    blob = frame_bytes(free_record(), 1, version=version)
    buffer = wire.FrameBuffer()
    with pytest.raises(ProtocolError) as info:
        if split_header:
            buffer.feed(blob[:5])
            buffer.feed(blob[5:])
        else:
            buffer.feed(blob)
    assert_protocol_error(info.value)
    message = info.value.message
    assert "version" in message
    assert f"client speaks {version}" in message
    assert f"daemon speaks {wire.PROTOCOL_VERSION}" in message


def test_frame_over_max_frame_is_refused():
    header = wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, wire.MAX_FRAME + 1)
    with pytest.raises(ProtocolError, match=f"{wire.MAX_FRAME + 1} bytes exceeds the {wire.MAX_FRAME}-byte limit"):
        wire.FrameBuffer().feed(header)


def test_frame_of_exactly_max_frame_is_accepted_and_awaited():
    header = wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, wire.MAX_FRAME)
    buffer = wire.FrameBuffer()
    assert buffer.feed(header) == []
    assert buffer.feed(bytes(4096)) == []  # the body is awaited


@HOW
def test_unknown_command_number(how):
    cmd = wire.ioc(wire.IOC_READ | wire.IOC_WRITE, 99, 0)
    with pytest.raises(ProtocolError, match=f"unknown command 0x{cmd:08x} in record seq 5") as info:
        decode_one(frame_bytes(record_bytes(cmd, 5, b""), 1), how)
    assert_protocol_error(info.value)


@HOW
def test_known_command_with_the_wrong_size_is_unknown(how):
    """The _IOC number includes the fixed size: a client with another struct layout is not misread."""
    free = COMMANDS[Op.FREE]
    cmd = wire.ioc(wire.IOC_READ | wire.IOC_WRITE, Op.FREE, free.fixed_size + 8)
    with pytest.raises(ProtocolError, match="unknown command"):
        decode_one(frame_bytes(record_bytes(cmd, 1, bytes(16)), 1), how)


@HOW
def test_record_length_past_the_frame_end(how):
    body = record_bytes(COMMANDS[Op.FREE].cmd, 9, bytes(8), length=100)
    with pytest.raises(ProtocolError, match=r"record seq 9 \(FREE\) claims 100 bytes, only 8 left in the frame"):
        decode_one(frame_bytes(body, 1), how)


@HOW
def test_truncated_record_header(how):
    body = free_record() + b"\x01\x02\x03"
    with pytest.raises(ProtocolError, match="truncated record header"):
        decode_one(frame_bytes(body, 2), how)


@HOW
@pytest.mark.parametrize(("announced", "held"), [(2, 1), (0, 1), (1, 2), (3, 0)])
def test_record_count_mismatching_the_header(how, announced, held):
    body = b"".join(free_record(seq) for seq in range(held))
    with pytest.raises(ProtocolError, match=f"announces {announced} records, the frame holds {held}"):
        decode_one(frame_bytes(body, announced), how)


@HOW
def test_non_bulk_record_with_extra_payload(how):
    free = COMMANDS[Op.FREE]
    body = record_bytes(free.cmd, 4, free.request.pack(ptr=1) + b"\x00")
    with pytest.raises(ProtocolError, match=r"record seq 4 \(FREE\) has a 9-byte payload, expected 8$"):
        decode_one(frame_bytes(body, 1), how)


@HOW
def test_record_shorter_than_its_fixed_part(how):
    h2d = COMMANDS[Op.MEMCPY_H2D]
    body = record_bytes(h2d.cmd, 2, bytes(h2d.fixed_size - 1))
    with pytest.raises(ProtocolError, match=rf"has a {h2d.fixed_size - 1}-byte payload, expected 24 or more"):
        decode_one(frame_bytes(body, 1), how)


@HOW
def test_bad_record_rejects_the_whole_frame(how):
    """Nothing in a frame with one bad record is returned: no record of it may run."""
    body = free_record(1) + record_bytes(wire.ioc(wire.IOC_WRITE, 200, 0), 2, b"") + free_record(3)
    with pytest.raises(ProtocolError, match="record seq 2"):
        decode_one(frame_bytes(body, 3), how)


@HOW
def test_hello_with_nonzero_pad_is_a_protocol_error(how):
    hello = COMMANDS[Op.HELLO]
    payload = bytearray(hello.request.pack(version=1, phase=0, pad=0, pid=1))
    payload[_offset(hello.request, "pad")] = 3
    with pytest.raises(ProtocolError, match="pad"):
        decode_one(frame_bytes(record_bytes(hello.cmd, 1, bytes(payload)), 1), how)


@HOW
def test_empty_frame_decodes_to_no_records(how):
    assert decode_one(frame_bytes(b"", 0), how) == []


# -- _IOC numbers ----------------------------------------------------------------------------------------


def test_ioc_bit_layout_matches_linux():
    cmd = wire.ioc(wire.IOC_READ | wire.IOC_WRITE, 0x12, 0x3456 & 0x3FFF)
    assert cmd >> 30 == wire.IOC_READ | wire.IOC_WRITE
    assert (cmd >> 16) & 0x3FFF == 0x3456 & 0x3FFF
    assert (cmd >> 8) & 0xFF == ord("F")
    assert cmd & 0xFF == 0x12
    # Linux: _IOWR('F', 1, 8) == 0xc0084601, _IOW('F', 32, 16) == 0x40104620, _IO('F', 3) == 0x4603
    assert wire.ioc(wire.IOC_READ | wire.IOC_WRITE, 1, 8) == 0xC0084601
    assert wire.ioc(wire.IOC_WRITE, 32, 16) == 0x40104620
    assert wire.ioc(wire.IOC_NONE, 3, 0) == 0x4603
    assert (wire.IOC_NONE, wire.IOC_WRITE, wire.IOC_READ) == (0, 1, 2)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.op.name)
def test_command_numbers_encode_direction_size_type_and_nr(command):
    cmd = command.cmd
    assert cmd < 1 << 32
    assert cmd & 0xFF == command.op
    assert (cmd >> 8) & 0xFF == ord("F")
    assert (cmd >> 16) & 0x3FFF == command.request.sizeof() == command.fixed_size
    direction = cmd >> 30
    assert bool(direction & wire.IOC_READ) == command.sync
    assert direction & wire.IOC_WRITE


def test_sync_and_async_commands():
    asynchronous = {op for op, c in COMMANDS.items() if not c.sync}
    assert asynchronous == {
        Op.EVENT_RECORD,
        Op.EVENT_WAIT,
        Op.EVENT_RESET,
        Op.MEMCPY_H2D_ASYNC,
        Op.MEMCPY_D2H_ASYNC,
        Op.MEMCPY_D2D_ASYNC,
        Op.MEMSET_ASYNC,
        Op.OP_TEMPLATE,
        Op.OP_LAUNCH,
        Op.GRAPH_LAUNCH,
        Op.GRAPH_UPDATE_BEGIN,
        Op.GRAPH_UPDATE_END,
    }
    assert COMMANDS[Op.HELLO].cmd == 0xC0084601  # _IOWR('F', 1, struct Hello)


def test_every_command_has_its_own_number():
    assert len(wire.BY_CMD) == len(COMMANDS) == len(Op)
    assert all(wire.BY_CMD[c.cmd] is c for c in ALL_COMMANDS)
