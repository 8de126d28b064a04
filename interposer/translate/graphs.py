"""Graphs: capturing a stream's work into a Graph (interposer/translate/collectors.py), replaying it with one
record, destroying it; and task groups (aclmdlRICaptureTaskGrpBegin/End, aclmdlRICaptureTaskUpdateBegin/End):
the operators of a capture that a later update replaces with the same operators on new parameters, as a decode
step's attention takes each request's new length."""

from __future__ import annotations

from typing import TYPE_CHECKING

from interposer import limits, wire
from interposer.handles import Kind
from interposer.translate.collectors import Graph, TaskGroup, TaskUpdate, collect
from interposer.translate.protocol import OK, ok, room
from interposer.translate.streams import stream_of
from interposer.wire import Op
from npu.errors import AclError, FlexNPUError, InvalidParam
from scheduler.stream import FailEntry, TaskEntry

if TYPE_CHECKING:
    from interposer.translate import Translator


def tabbed(session: Translator, collector: Graph | TaskUpdate) -> Graph | TaskUpdate:
    collector.tab = session.ledger.tab(collector)
    return collector


# -- the records ------------------------------------------------------------------------------------------------


def capture_begin(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    if stream in session.capturing:
        raise InvalidParam("capture_begin: this stream is already being captured")
    room(session, Kind.GRAPH, limits.GRAPHS, AclError.RT_NO_MODEL_RESOURCE, "ri_capture_begin", len(session.capturing))
    session.capturing[stream] = tabbed(session, Graph())
    return OK


def capture_end(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    if stream in session.grouping:
        raise InvalidParam(
            "ri_capture_end: a task group is still open on this stream; end it with ri_capture_task_grp_end "
            "first (the capture goes on)"
        )
    graph = session.capturing.pop(stream, None)
    if graph is None:
        raise InvalidParam("capture_end: this stream is not being captured (call capture_begin on it first)")
    if graph.failure is not None:
        f = graph.failure
        raise type(f.error)(f"captured record seq {f.seq} failed: {f.error.message}", f.error.code)
    return ok(wire.COMMANDS[Op.GRAPH_CAPTURE_END], handle=session.handles.add(Kind.GRAPH, graph))


def graph_launch(session: Translator, seq, args, data):
    graph = session.handles.get(args.graph, Kind.GRAPH)
    stream = stream_of(session, args.stream)
    capture = session.capturing.get(stream)
    if capture is not None:  # a replay inside a capture: the graph's tasks join the new graph, within its room
        collect(capture, graph.tasks, seq, session.log)
    else:  # one submission for the whole graph (at most GRAPH_TASKS): the engine catches up once
        session.backlog.admit(len(graph.tasks), f"ri_execute_async seq {seq}")
        session.runner.submit_all([TaskEntry(stream, seq, task=task) for task in graph.tasks])


def graph_destroy(session: Translator, seq, args, data):
    session.handles.remove(args.handle, Kind.GRAPH)
    return OK


def group_begin(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    graph = session.capturing.get(stream)
    if graph is None or stream in session.grouping:
        raise InvalidParam("ri_capture_task_grp_begin: the stream must be capturing, outside a task group")
    room(session, Kind.TASK_GROUP, limits.TASK_GROUPS, AclError.RT_OVER_LIMIT, "ri_capture_task_grp_begin")
    session.grouping[stream] = len(graph.tasks)
    return OK


def group_end(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    start = session.grouping.pop(stream, None)
    graph = session.capturing.get(stream)
    if start is None or graph is None:
        raise InvalidParam("ri_capture_task_grp_end: no task group began on this stream")
    group = TaskGroup(graph, start, max(0, len(graph.tasks) - start))
    return ok(wire.COMMANDS[Op.GRAPH_GROUP_END], handle=session.handles.add(Kind.TASK_GROUP, group))


def update_begin(session: Translator, seq, args, data):
    stream = stream_of(session, args.stream)
    group = session.handles.get(args.group, Kind.TASK_GROUP)
    if stream in session.capturing or stream in session.updating:
        raise InvalidParam("ri_capture_task_update_begin: the stream must be neither capturing nor updating")
    session.updating[stream] = tabbed(session, TaskUpdate(group))


def update_end(session: Translator, seq, args, data):
    """Replace the group's tasks; a refusal fails the stream (its next synchronisation reports it)."""
    stream = stream_of(session, args.stream)
    update = session.updating.pop(stream, None)
    try:
        if update is None:
            raise InvalidParam("ri_capture_task_update_end: no task update began on this stream")
        if update.failure is not None:
            f = update.failure
            raise type(f.error)(f"task update record seq {f.seq} failed: {f.error.message}", f.error.code)
        group = update.group
        old = group.graph.tasks[group.start : group.start + group.count]
        if [t.name for t in update.tasks] != [t.name for t in old]:
            raise InvalidParam(
                f"ri_capture_task_update_end: the update issued {[t.name for t in update.tasks]}, the task "
                f"group holds {[t.name for t in old]}; an update must issue the same operators in the same order"
            )
    except FlexNPUError as exc:
        session.runner.submit(FailEntry(stream, seq, error=exc))
        return
    group.graph.tasks[group.start : group.start + group.count] = update.tasks
