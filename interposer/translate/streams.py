"""Streams and events: the session's streams (handle 0 is its default stream), submitting a task to one (or to
the graph capturing it), core limits, events, and synchronisations, which report the asynchronous failures
they cover."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from interposer import limits, wire
from interposer.handles import Kind
from interposer.translate.collectors import collect
from interposer.translate.protocol import OK, Answer, Wait, declare, error_answer, ok, room
from interposer.wire import Op
from npu.errors import AclError, FlexNPUError, InvalidParam, NotSupported
from npu.tasks import Task
from scheduler.stream import AsyncFailure, Event, FailEntry, RecordEntry, Stream, TaskEntry, WaitEntry

if TYPE_CHECKING:
    from interposer.translate import Translator


def open_stream(session: Translator) -> Stream:
    stream = Stream(tenant=session.vdev.tenant)
    declare(session, stream)
    session.limits.apply(stream)
    session.runner.engine.add_stream(stream)
    return stream


def all_streams(session: Translator) -> list[Stream]:
    return [session.default_stream, *session.handles.values(Kind.STREAM)]


def stream_of(session: Translator, handle: int) -> Stream:
    return session.default_stream if handle == 0 else session.handles.get(handle, Kind.STREAM)


def idle(session: Translator) -> bool:
    return all(s.idle for s in all_streams(session))


def submit(
    session: Translator, stream: Stream, seq: int, make_task: Callable[[], Task], limits: Stream | None = None
) -> None:
    # Where the task goes instead of the device, if anywhere: a graph being captured, or a task group's update.
    collector = session.capturing.get(stream) or session.updating.get(stream)
    if collector is None:
        session.backlog.admit(1, f"record seq {seq}")  # a refusal fails the session's next synchronisation
    try:
        task = make_task()
    except FlexNPUError as exc:
        session.log.info("async_record_refused", seq=seq, code=int(exc.code), error=exc.message)
        if collector is not None:
            collector.failure = collector.failure or AsyncFailure(seq, exc)
        else:
            session.runner.submit(FailEntry(stream, seq, error=exc))
        return
    if collector is not None:
        collect(collector, [task], seq, session.log)
    else:
        session.runner.submit(TaskEntry(stream, seq, task=task, limits=limits))


def not_capturing(session: Translator, stream: Stream, what: str) -> None:
    if stream in session.capturing:
        raise NotSupported(f"{what} on a stream being captured: a captured graph holds operators and copies only")


def report(session: Translator, *streams: Stream) -> Answer:
    """Answer a synchronisation: the earliest asynchronous failure it covers, else success."""
    failures = [f for f in (session.failure, *(s.take_failure() for s in streams)) if f is not None]
    session.failure = None
    if not failures:
        return OK
    first = min(failures, key=lambda f: f.seq)
    return error_answer(first.error.code, f"asynchronous record seq {first.seq} failed: {first.error.message}")


# -- the records ------------------------------------------------------------------------------------------------


def stream_create(session: Translator, seq, args, data):
    # The default stream counts, as on a real device.
    room(session, Kind.STREAM, limits.STREAMS, AclError.RT_NO_STREAM_RESOURCE, "create_stream", more=1)
    return ok(wire.COMMANDS[Op.STREAM_CREATE], handle=session.handles.add(Kind.STREAM, open_stream(session)))


def stream_destroy(session: Translator, seq, args, data):
    stream = session.handles.get(args.handle, Kind.STREAM)

    def destroy() -> Answer:
        session.handles.remove(args.handle, Kind.STREAM)
        session.runner.engine.remove_stream(stream)
        session.limits.forget(stream)
        return OK

    return destroy() if stream.idle else Wait(session.runner, lambda: stream.idle, destroy)


def stream_limit_set(session: Translator, seq, args, data):
    session.limits.set_stream(stream_of(session, args.stream), args.kind, args.value)
    return OK


def stream_limit_get(session: Translator, seq, args, data):
    value = session.limits.get_stream(stream_of(session, args.stream), args.kind)
    return ok(wire.COMMANDS[Op.STREAM_LIMIT_GET], value=value)


def device_limit_set(session: Translator, seq, args, data):
    session.limits.set_device(args.kind, args.value, all_streams(session))
    return OK


def device_limit_get(session: Translator, seq, args, data):
    return ok(wire.COMMANDS[Op.DEVICE_LIMIT_GET], value=session.limits.get_device(args.kind))


def stream_sync(session: Translator, seq, args, data):
    stream = stream_of(session, args.handle)
    return Wait(session.runner, lambda: stream.idle, lambda: report(session, stream))


def device_sync(session: Translator, seq, args, data):
    return Wait(session.runner, lambda: idle(session), lambda: report(session, *all_streams(session)))


def event_create(session: Translator, seq, args, data):
    room(session, Kind.EVENT, limits.EVENTS, AclError.RT_NO_EVENT_RESOURCE, "create_event")
    return ok(wire.COMMANDS[Op.EVENT_CREATE], handle=session.handles.add(Kind.EVENT, Event()))


def event_destroy(session: Translator, seq, args, data):
    session.handles.remove(args.handle, Kind.EVENT)
    return OK


def event_record(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    not_capturing(session, stream, "record_event")
    event = session.handles.get(args.event, Kind.EVENT)
    session.backlog.admit(1, f"record_event seq {seq}")
    event.recorded += 1
    session.runner.submit(RecordEntry(stream, seq, event=event, generation=event.recorded))


def event_wait(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    not_capturing(session, stream, "stream_wait_event")
    event = session.handles.get(args.event, Kind.EVENT)
    session.backlog.admit(1, f"stream_wait_event seq {seq}")
    session.runner.submit(WaitEntry(stream, seq, event=event, generation=event.recorded))


def event_reset(session: Translator, seq, args, data):
    stream_of(session, args.stream)
    event = session.handles.get(args.event, Kind.EVENT)
    event.timestamp = None  # forget the completed record; pending waits still see their generation


def event_sync(session: Translator, seq, args, data):
    event = session.handles.get(args.handle, Kind.EVENT)
    target = event.recorded
    return Wait(session.runner, lambda: event.completed >= target, lambda: OK)


def event_query(session: Translator, seq, args, data):
    event = session.handles.get(args.handle, Kind.EVENT)
    session.runner.catch_up()
    return ok(wire.COMMANDS[Op.EVENT_QUERY], completed=int(event.completed >= event.recorded))


def event_elapsed(session: Translator, seq, args, data):
    start = session.handles.get(args.start, Kind.EVENT)
    end = session.handles.get(args.end, Kind.EVENT)
    if start.timestamp is None or end.timestamp is None:
        raise InvalidParam(
            "event_elapsed_time: both events must have completed a record (record them, then synchronize)"
        )
    ns = max(0, round((end.timestamp - start.timestamp) * 1e9))
    return ok(wire.COMMANDS[Op.EVENT_ELAPSED], ns=ns)
