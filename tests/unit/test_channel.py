"""The channel of one open device node, without FUSE: where frames begin and end, the buffer limits, and frames
that wait on the device (the write returns at once, the read waits, later frames queue behind in order)."""

from __future__ import annotations

import errno
import mmap

import pytest
import structlog
import trio

from interposer import wire
from interposer.translate import OK, Answer, VersionOnly, Wait
from interposer.wire import COMMANDS, Op
from npu.errors import AclError, ProtocolError
from scheduler.runner import Stalled
from vdevfs.channel import MIN_PIECE, Channel, ReadBusy
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
    ch.write(VERSION)
    return wire.decode_replies(memoryview(await ch.read(1 << 16))[16:])


async def test_a_frame_in_one_write_is_answered_and_its_reply_counted_until_read():
    ch = channel()
    ch.write(VERSION)
    assert ch.account.held == ch.queued > 0
    await ch.read(1 << 16)
    assert ch.account.held == ch.account.limits.held == 0


@pytest.mark.parametrize("cut", [3, 16, len(VERSION) - 1])
async def test_a_short_write_ending_inside_a_frame_is_refused_and_the_next_frame_answered(cut):
    ch = channel()
    with pytest.raises(ProtocolError, match="truncated frame"):
        ch.write(VERSION[:cut])
    explanation = wire.decode_replies(memoryview(await ch.read(1 << 16))[16:])[0]
    assert (explanation.seq, explanation.status) == (0, AclError.INVALID_PARAM)
    assert [r.status for r in await answered(ch)] == [AclError.SUCCESS]


async def test_a_write_holding_a_frame_and_the_start_of_another_is_refused_whole():
    ch = channel()
    with pytest.raises(ProtocolError, match="truncated frame"):
        ch.write(VERSION + big_frame(MiB)[:MIN_PIECE])  # long enough for a piece, but it did not start that frame
    assert await ch.read(1 << 16)  # only the explanation: the first frame did not run
    assert [r.status for r in await answered(ch)] == [AclError.SUCCESS]


async def test_a_big_frame_arrives_in_pieces_and_reserves_its_size_from_the_first():
    ch = channel()
    frame = big_frame(3 * MiB)
    ch.write(frame[:MiB])
    assert ch.account.held == 3 * MiB
    ch.write(frame[MiB : 2 * MiB])
    ch.write(frame[2 * MiB :])
    assert ch.account.held == 0 and not ch.replies  # complete, run, and nothing kept


async def test_a_new_frame_abandons_an_unfinished_one():
    ch = channel()
    ch.write(big_frame(3 * MiB)[:MiB])
    assert [r.status for r in await answered(ch)] == [AclError.SUCCESS]
    assert ch.account.held == 0


async def test_a_short_piece_that_does_not_finish_a_big_frame_is_refused():
    ch = channel()
    frame = big_frame(3 * MiB)
    ch.write(frame[:MiB])
    with pytest.raises(ProtocolError, match="truncated frame"):
        ch.write(frame[MiB : MiB + 100])
    await ch.read(1 << 16)
    assert ch.account.held == 0


async def test_a_frame_past_the_session_limit_is_refused_at_its_first_piece():
    ch = channel()
    with pytest.raises(BufferFull, match=r"this frame \(9.0 MiB\) would take this session past its buffer limit"):
        ch.write(big_frame(9 * MiB)[:MiB])
    explanation = wire.decode_replies(memoryview(await ch.read(1 << 16))[16:])[0]
    assert explanation.status == AclError.RT_OVER_LIMIT
    assert ch.account.held == 0


async def test_the_daemon_limit_stops_big_frames_but_never_a_session_that_holds_almost_nothing():
    limits = BufferLimits(session=8 * MiB, total=10 * MiB)
    first, second = channel(limits), channel(limits)
    piece = mmap.mmap(-1, MiB)
    piece[:] = big_frame(6 * MiB)[:MiB]
    first.write(piece)
    with pytest.raises(BufferFull, match="does not fit in the daemon's buffers"):
        second.write(piece)
    await second.read(1 << 16)
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
    ch.write(VERSION)  # a reply left unread
    ch.write(big_frame(3 * MiB)[:MiB])  # and an unfinished frame
    assert ch.account.held > 3 * MiB
    ch.close()
    assert ch.account.limits.held == 0 and ch.frames.pending == 0


# -- frames that wait on the device -------------------------------------------------------------------------


class Device:
    """A runner whose work finishes when the test says (`finish`), or never (`stalls`), and a handler for it:
    STREAM_SYNC waits on the device, MEM_INFO answers at once, EVENT_RECORD is asynchronous."""

    def __init__(self) -> None:
        self.finished = trio.Event()
        self.stalls = False
        self.answers: list[int] = []  # the seqs answered, in order
        self.closed = False

    async def wait_until(self, done) -> None:
        if self.stalls:
            raise Stalled()
        await self.finished.wait()

    def execute(self, record) -> Answer | Wait | None:
        op = record.command.op
        if op is Op.EVENT_RECORD:
            self.answers.append(record.seq)
            return None
        if op is Op.STREAM_SYNC:
            return Wait(self, self.finished.is_set, lambda: self._then(record.seq))
        return self._then(record.seq)

    def _then(self, seq: int) -> Answer:
        if seq == 666:
            raise RuntimeError("a bug")
        self.answers.append(seq)
        return OK

    def take_deliveries(self):
        return []

    def close(self) -> None:
        self.closed = True


def frame(*records: tuple[Op, int]) -> bytes:
    args = {Op.STREAM_SYNC: {"handle": 0}, Op.MEM_INFO: {"attr": 1}, Op.EVENT_RECORD: {"event": 0, "stream": 0}}
    parts = [p for op, seq in records for p in wire.encode_record(COMMANDS[op], seq, **args[op])]
    return b"".join(wire.frame(parts, len(records)))


def waiting_channel(nursery, limits: BufferLimits | None = None) -> tuple[Channel, Device]:
    device = Device()
    limits = limits or BufferLimits(session=8 * MiB, total=16 * MiB)
    return Channel(device, structlog.get_logger(), BufferAccount(limits, "test"), spawn=nursery.start_soon), device


def seqs(data: bytes) -> list[tuple[int, int]]:
    """(seq, status) of every reply in the reply frames read."""
    frames = wire.FrameBuffer().feed(data)
    return [(r.seq, r.status) for _, body in frames for r in wire.decode_replies(body)]


async def test_a_frame_that_waits_on_the_device_returns_its_write_at_once_and_the_read_waits_for_the_reply(
    nursery,
):
    ch, device = waiting_channel(nursery)
    ch.write(frame((Op.STREAM_SYNC, 1)))  # returns: the kernel would hold the node's lock until it did
    assert ch.waiting and not ch.readable()
    got = []

    async def reader():
        got.append(await ch.read(1 << 16))

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    assert got == []  # the read waits for the device, not the write
    device.finished.set()
    await trio.testing.wait_all_tasks_blocked()
    assert seqs(got[0]) == [(1, AclError.SUCCESS)]
    assert ch.readable() and ch.account.held == 0


async def test_frames_written_while_one_waits_run_after_it_in_order_and_count_until_then(nursery):
    ch, device = waiting_channel(nursery)
    ch.write(frame((Op.STREAM_SYNC, 1)))
    ch.write(frame((Op.EVENT_RECORD, 2), (Op.MEM_INFO, 3)))
    ch.write(frame((Op.STREAM_SYNC, 4)))
    assert device.answers == [] and ch.account.held > 0  # queued behind seq 1, counted
    device.finished.set()
    replies = seqs(await ch.read(1 << 16))
    assert device.answers == [1, 2, 3, 4]
    assert replies == [(1, AclError.SUCCESS), (3, AclError.SUCCESS), (4, AclError.SUCCESS)]
    assert ch.account.held == 0


async def test_frames_queued_behind_a_wait_stop_at_the_session_limit(nursery):
    ch, device = waiting_channel(nursery, BufferLimits(session=MiB, total=16 * MiB))
    ch.write(frame((Op.STREAM_SYNC, 1)))
    with pytest.raises(BufferFull, match="this frame, queued behind one still waiting on the device"):
        for seq in range(2, 10_000):
            ch.write(frame((Op.MEM_INFO, seq)))
    assert ch.account.held <= MiB
    device.finished.set()
    await trio.testing.wait_all_tasks_blocked()
    assert ch.replies  # the queued ones were answered; the refused one and its explanation are in there too


async def test_a_session_closed_while_its_frame_waits_stops_waiting_and_gives_everything_back(nursery):
    ch, device = waiting_channel(nursery)
    ch.write(frame((Op.STREAM_SYNC, 1)))
    ch.write(frame((Op.MEM_INFO, 2)))
    ch.close()  # before the wait's task first ran: it must still be cancelled, not left waiting on a dead session
    await trio.testing.wait_all_tasks_blocked()
    assert device.closed and ch.account.limits.held == 0 and not ch.backlog
    assert not [t for t in nursery.child_tasks if "_wait" in t.name]  # gone before its wait could finish
    device.finished.set()
    await trio.testing.wait_all_tasks_blocked()
    assert device.answers == [] and not ch.replies  # the wait's task ended without answering


async def test_a_wait_that_can_never_finish_answers_its_record_with_the_error_and_the_frame_goes_on(nursery):
    ch, device = waiting_channel(nursery)
    device.stalls = True
    ch.write(frame((Op.STREAM_SYNC, 1), (Op.MEM_INFO, 2)))
    assert seqs(await ch.read(1 << 16)) == [(1, AclError.RT_STREAM_SYNC_TIMEOUT), (2, AclError.SUCCESS)]


async def test_a_bug_after_a_wait_fails_that_frame_with_an_internal_error_and_the_session_goes_on(nursery):
    ch, device = waiting_channel(nursery)
    ch.write(frame((Op.STREAM_SYNC, 666)))
    device.finished.set()
    (reply,) = wire.decode_replies(memoryview(await ch.read(1 << 16))[16:])
    assert (reply.seq, reply.status) == (666, AclError.INTERNAL_ERROR)
    assert b"a bug" in bytes(reply.payload)
    ch.write(frame((Op.MEM_INFO, 667)))
    assert seqs(await ch.read(1 << 16)) == [(667, AclError.SUCCESS)]


async def test_one_read_per_session_waits_a_second_is_refused(nursery):
    """Each waiting read holds one of the daemon's FUSE workers. The kernel serialises read(2) on one open file
    anyway; a second reader by other means (aio, io_uring) is refused rather than held."""
    ch, device = waiting_channel(nursery)
    ch.write(frame((Op.STREAM_SYNC, 1)))
    got = []

    async def reader():
        got.append(await ch.read(1 << 16))

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(ReadBusy, match="another thread is already waiting for this session's reply") as busy:
        await ch.read(1 << 16)
    assert busy.value.errno == errno.EBUSY
    device.finished.set()
    await trio.testing.wait_all_tasks_blocked()
    assert seqs(got[0]) == [(1, AclError.SUCCESS)]
