"""Copies and fills: blocking ones (a task on the default stream after the session's other work; the call
returns once it ran) and asynchronous ones on a stream, whose device-to-host bytes are delivered with the
session's next reply."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from interposer.translate.memory import region_of
from interposer.translate.protocol import OK, Answer, Wait
from interposer.translate.streams import all_streams, report, stream_of, submit
from npu.errors import AclError, InvalidParam
from npu.memory import Region
from npu.tasks import DeviceToDevice, DeviceToHost, Fill, HostToDevice, PeerCopy, Task
from scheduler.stream import Event, RecordEntry, TaskEntry, WaitEntry

if TYPE_CHECKING:
    from interposer.translate import Translator


@dataclass(frozen=True, slots=True, weakref_slot=True)
class HeldHostToDevice(HostToDevice):
    """An asynchronous host-to-device copy whose bytes the session's buffers count while the task lives."""


def device_copy(session: Translator, args, what: str) -> DeviceToDevice:
    """A device-to-device copy; across the interconnect when one side is another chip's memory."""
    dst = region_of(session, args.dst, args.count, f"{what} dst", peer=True)
    src = region_of(session, args.src, args.count, f"{what} src", peer=True)
    local = session.vdev.physical.npu.memory
    return DeviceToDevice(dst, src) if dst.buffer.home is src.buffer.home is local else PeerCopy(dst, src)


def blocking(session: Translator, seq: int, task: Task, answer: Callable[[], Answer] = lambda: OK) -> Answer | Wait:
    """A blocking copy or fill is a task on the default stream, after the session's work on every stream
    (events order it after each busy one, as a legacy default stream waits for the others); the call
    returns once it completes. A stream already failed reports that failure instead."""
    stream = session.default_stream
    for other in all_streams(session)[1:]:
        if not other.idle:
            event = Event(recorded=1)
            session.runner.submit(RecordEntry(other, seq, event=event, generation=1))
            session.runner.submit(WaitEntry(stream, seq, event=event, generation=1))
    entry = TaskEntry(stream, seq, task=task)
    session.runner.submit(entry)

    def then() -> Answer:
        ran = entry.job is not None and entry.job.failure is None
        return answer() if ran else report(session, stream)

    return Wait(session.runner, lambda: stream.idle, then)


def deliver(session: Translator, seq: int) -> Callable[[Region], None]:
    def delivered(region: Region) -> None:
        session.admit_delivery(seq, region.size)  # may refuse: the copy then fails, as a task on its stream
        session.deliveries.append((seq, region.read()))

    return delivered


# -- the records ------------------------------------------------------------------------------------------------


def memcpy_h2d(session: Translator, seq, args, data):
    _check_count(args.count, data)
    return blocking(session, seq, HostToDevice(region_of(session, args.dst, args.count, "memcpy dst"), data))


def memcpy_d2h(session: Translator, seq, args, data):
    region = region_of(session, args.src, args.count, "memcpy src")
    # A view, not a copy: the session is blocked until the client has read it, so nothing can change it.
    return blocking(session, seq, DeviceToHost(region, _ignore), lambda: Answer(AclError.SUCCESS, region.peek()))


def memcpy_d2d(session: Translator, seq, args, data):
    return blocking(session, seq, device_copy(session, args, "memcpy"))


def memset(session: Translator, seq, args, data):
    return blocking(session, seq, Fill(region_of(session, args.ptr, args.count, "memset ptr"), _byte(args.value)))


def memcpy_h2d_async(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)

    def task():
        _check_count(args.count, data)
        # A copy: the frame's buffer is reused for the next frame before this task runs. Its bytes count
        # against the session's buffers for as long as a queue or a captured graph holds the task.
        copy = HeldHostToDevice(region_of(session, args.dst, args.count, "memcpy_async dst"), bytes(data))
        session.ledger.tab(copy).add(args.count, f"the data of asynchronous memcpy seq {seq}")
        return copy

    submit(session, stream, seq, task)


def memcpy_d2h_async(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    submit(
        session,
        stream,
        seq,
        lambda: DeviceToHost(region_of(session, args.src, args.count, "memcpy_async src"), deliver(session, seq)),
    )


def memcpy_d2d_async(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    submit(session, stream, seq, lambda: device_copy(session, args, "memcpy_async"))


def memset_async(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    submit(
        session,
        stream,
        seq,
        lambda: Fill(region_of(session, args.ptr, args.count, "memset_async ptr"), _byte(args.value)),
    )


def _check_count(count: int, data: memoryview) -> None:
    if count != len(data):
        raise InvalidParam(f"memcpy count {count} does not match the {len(data)} bytes sent")


def _ignore(region: Region) -> None:
    pass


def _byte(value: int) -> int:
    if not 0 <= value <= 255:
        raise InvalidParam(f"memset value {value} is not a byte (0-255)")
    return value
