"""Where a stream's tasks go instead of the device: a Graph being captured (replayed later by one record), or a
TaskUpdate replacing a TaskGroup's tasks; and `collect`, which adds tasks to either within its room."""

from __future__ import annotations

from dataclasses import dataclass, field

from interposer import limits
from interposer.limits import Tab, TooMany
from npu.errors import AclError, FlexNPUError, InvalidParam
from npu.tasks import Task
from scheduler.stream import AsyncFailure


@dataclass(eq=False)
class Graph:
    """Work captured from a stream, replayed by one record: the same tasks, so the same numerics and cost. A
    replay inside a capture is flattened into the new graph, so a launch is one submission of at most `room`
    tasks however graphs nest."""

    tasks: list[Task] = field(default_factory=list)
    failure: AsyncFailure | None = None
    tab: Tab | None = None  # the bytes it is counted for in the session's buffers
    what = "the captured graph"

    @property
    def room(self) -> int:
        return limits.GRAPH_TASKS

    def overflow(self, n: int) -> FlexNPUError:
        return TooMany(
            f"the captured graph would hold {n} tasks, past the {self.room} a graph may hold (a real model "
            "stream's queue is as deep: the model stream is full); capture less per graph",
            AclError.RT_STREAM_TASK_FULL,
        )


@dataclass(frozen=True)
class TaskGroup:
    """Tasks [start, start + count) of a captured graph, replaceable by a task update."""

    graph: Graph
    start: int
    count: int


@dataclass(eq=False)
class TaskUpdate:
    """The tasks a stream issues between ri_capture_task_update_begin and _end, to replace `group`'s."""

    group: TaskGroup
    tasks: list[Task] = field(default_factory=list)
    failure: AsyncFailure | None = None
    tab: Tab | None = None

    @property
    def room(self) -> int:  # an update issues the group's operators again, no more
        return self.group.count

    what = "the task update"

    def overflow(self, n: int) -> FlexNPUError:
        return InvalidParam(
            f"ri_capture_task_update_end: the update issued {n} tasks, the task group holds {self.group.count}; "
            "an update must issue the same operators in the same order"
        )


def collect(collector: Graph | TaskUpdate, tasks: list[Task], seq: int, log) -> None:
    """Add tasks to a graph being captured (or a task update), within its room (limits.GRAPH_TASKS) and the
    session's buffers (limits.GRAPH_TASK_BYTES a task). Past them the capture fails, as a real model stream
    that is full does, and holds nothing more: capture_end (update_end) reports it."""
    if collector.failure is not None:
        return
    try:
        if len(collector.tasks) + len(tasks) > collector.room:
            raise collector.overflow(len(collector.tasks) + len(tasks))
        collector.tab.add(len(tasks) * limits.GRAPH_TASK_BYTES, f"{collector.what} ({len(tasks)} more tasks)")
    except FlexNPUError as exc:
        log.info("capture_refused", seq=seq, code=int(exc.code), error=exc.message)
        collector.failure = AsyncFailure(seq, exc)
        collector.tasks.clear()  # a failed capture is good for nothing: let its tasks go now
        collector.tab.settle()
        return
    collector.tasks.extend(tasks)
