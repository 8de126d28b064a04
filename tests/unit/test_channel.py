"""The channel of one open device node, without FUSE: where frames begin and end, and the buffer limits."""

from __future__ import annotations

import mmap

import pytest
import structlog

from interposer import wire
from interposer.translate import VersionOnly
from interposer.wire import COMMANDS, Op
from npu.errors import AclError, ProtocolError
from vdevfs.channel import MIN_PIECE, Channel
from vdevfs.limits import ALLOWANCE, BufferAccount, BufferFull, BufferLimits

MiB = 1 << 20
VERSION = b"".join(wire.frame(wire.encode_record(COMMANDS[Op.VERSION], 1), 1))


def channel(limits: BufferLimits | None = None) -> Channel:
    limits = limits or BufferLimits(session=8 * MiB, total=16 * MiB)
    return Channel(VersionOnly("test"), structlog.get_logger(), BufferAccount(limits, "test"))


def big_frame(size: int) -> bytes:
    """A valid frame of `size` bytes: one operator description (asynchronous, bulk; the node ignores it)."""
    record = wire.encode_record(COMMANDS[Op.OP_TEMPLATE], 1, bytes(size - 32), template=1)
    frame = b"".join(wire.frame(record, 1))
    assert len(frame) == size
    return frame


async def answered(ch: Channel) -> list[wire.Reply]:
    await ch.write(VERSION)
    return wire.decode_replies(memoryview(ch.read(1 << 16))[16:])


async def test_a_frame_in_one_write_is_answered_and_its_reply_counted_until_read():
    ch = channel()
    await ch.write(VERSION)
    assert ch.account.held == ch.queued > 0
    ch.read(1 << 16)
    assert ch.account.held == ch.account.limits.held == 0


@pytest.mark.parametrize("cut", [3, 16, len(VERSION) - 1])
async def test_a_short_write_ending_inside_a_frame_is_refused_and_the_next_frame_answered(cut):
    ch = channel()
    with pytest.raises(ProtocolError, match="truncated frame"):
        await ch.write(VERSION[:cut])
    explanation = wire.decode_replies(memoryview(ch.read(1 << 16))[16:])[0]
    assert (explanation.seq, explanation.status) == (0, AclError.INVALID_PARAM)
    assert [r.status for r in await answered(ch)] == [AclError.SUCCESS]


async def test_a_write_holding_a_frame_and_the_start_of_another_is_refused_whole():
    ch = channel()
    with pytest.raises(ProtocolError, match="truncated frame"):
        await ch.write(VERSION + big_frame(MiB)[:MIN_PIECE])  # long enough for a piece, but it did not start that frame
    assert ch.read(1 << 16)  # only the explanation: the first frame did not run
    assert [r.status for r in await answered(ch)] == [AclError.SUCCESS]


async def test_a_big_frame_arrives_in_pieces_and_reserves_its_size_from_the_first():
    ch = channel()
    frame = big_frame(3 * MiB)
    await ch.write(frame[:MiB])
    assert ch.account.held == 3 * MiB
    await ch.write(frame[MiB : 2 * MiB])
    await ch.write(frame[2 * MiB :])
    assert ch.account.held == 0 and not ch.replies  # complete, run, and nothing kept


async def test_a_new_frame_abandons_an_unfinished_one():
    ch = channel()
    await ch.write(big_frame(3 * MiB)[:MiB])
    assert [r.status for r in await answered(ch)] == [AclError.SUCCESS]
    assert ch.account.held == 0


async def test_a_short_piece_that_does_not_finish_a_big_frame_is_refused():
    ch = channel()
    frame = big_frame(3 * MiB)
    await ch.write(frame[:MiB])
    with pytest.raises(ProtocolError, match="truncated frame"):
        await ch.write(frame[MiB : MiB + 100])
    ch.read(1 << 16)
    assert ch.account.held == 0


async def test_a_frame_past_the_session_limit_is_refused_at_its_first_piece():
    ch = channel()
    with pytest.raises(BufferFull, match=r"this frame \(9.0 MiB\) would take this session past its buffer limit"):
        await ch.write(big_frame(9 * MiB)[:MiB])
    explanation = wire.decode_replies(memoryview(ch.read(1 << 16))[16:])[0]
    assert explanation.status == AclError.RT_OVER_LIMIT
    assert ch.account.held == 0


async def test_the_daemon_limit_stops_big_frames_but_never_a_session_that_holds_almost_nothing():
    limits = BufferLimits(session=8 * MiB, total=10 * MiB)
    first, second = channel(limits), channel(limits)
    piece = mmap.mmap(-1, MiB)
    piece[:] = big_frame(6 * MiB)[:MiB]
    await first.write(piece)
    with pytest.raises(BufferFull, match="does not fit in the daemon's buffers"):
        await second.write(piece)
    second.read(1 << 16)
    assert [r.status for r in await answered(second)] == [AclError.SUCCESS]  # a small call still goes through
    first.close()
    assert limits.held == 0


def test_an_account_refuses_past_either_limit_and_names_it():
    limits = BufferLimits(session=4 * MiB, total=6 * MiB)
    a, b = BufferAccount(limits, "davinci0"), BufferAccount(limits, "davinci1")
    a.add(4 * MiB)
    with pytest.raises(BufferFull, match=r"davinci0: the reply \(1.0 MiB\) .* \[daemon\] session_buffer"):
        a.check(MiB, "the reply")
    b.check(ALLOWANCE, "small")  # under the allowance: the daemon-wide limit does not apply
    b.add(MiB)
    with pytest.raises(BufferFull, match=r"\[daemon\] daemon_buffer"):
        b.check(2 * MiB, "a copy")
    a.close()
    b.close()
    assert limits.held == 0


async def test_a_closed_channel_gives_everything_back():
    ch = channel()
    await ch.write(VERSION)  # a reply left unread
    await ch.write(big_frame(3 * MiB)[:MiB])  # and an unfinished frame
    assert ch.account.held > 3 * MiB
    ch.close()
    assert ch.account.limits.held == 0 and ch.frames.pending == 0
