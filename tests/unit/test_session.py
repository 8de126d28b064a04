"""The transport-independent session core: a wait that fails becomes that record's error reply (the trio driver,
vdevfs/channel.py, does the same: tests/unit/test_channel.py)."""

from __future__ import annotations

from interposer import session, wire
from interposer.translate import OK, Wait
from interposer.wire import COMMANDS, FrameBuffer, Op
from npu.errors import AclError
from scheduler.runner import Stalled


class StalledRunner:
    def wait_until(self, done):
        raise Stalled()


class Handler:
    def __init__(self, runner):
        self.runner = runner

    def execute(self, record):
        if record.command.op is Op.STREAM_SYNC:
            return Wait(self.runner, lambda: False, lambda: OK)
        return OK

    def take_deliveries(self):
        return []

    def close(self):
        pass


def records():
    parts = wire.encode_record(COMMANDS[Op.STREAM_SYNC], 1, handle=0) + wire.encode_record(
        COMMANDS[Op.MEM_INFO], 2, attr=1
    )
    return wire.decode_records(2, memoryview(b"".join(parts)))


def replies(frame) -> list[wire.Reply]:
    buffer = FrameBuffer()
    ((_, body),) = [f for part in frame for f in buffer.feed(part)]
    return wire.decode_replies(body)


def test_a_stalled_wait_answers_its_record_with_the_error_and_the_frame_goes_on():
    first, second = replies(session.answer_sync(Handler(StalledRunner()), records()))
    assert (first.seq, first.status) == (1, AclError.RT_STREAM_SYNC_TIMEOUT)
    assert b"can never finish" in bytes(first.payload)
    assert (second.seq, second.status) == (2, AclError.SUCCESS)


class AsyncLast(Handler):
    def execute(self, record):
        return None if not record.command.sync else OK


def test_a_frame_ending_in_an_asynchronous_record_still_gets_its_replies():
    parts = wire.encode_record(COMMANDS[Op.MEM_INFO], 1, attr=1) + wire.encode_record(
        COMMANDS[Op.EVENT_RECORD], 2, event=0, stream=0
    )
    frame = session.answer_sync(AsyncLast(None), wire.decode_records(2, memoryview(b"".join(parts))))
    (reply,) = replies(frame)
    assert (reply.seq, reply.status) == (1, AclError.SUCCESS)
