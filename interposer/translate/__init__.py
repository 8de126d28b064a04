"""From records to work: one Translator per session maps its virtual handles and device addresses onto the
physical NPU's objects, checks quota and ownership, and turns each record into engine work and an answer.

It is sans-IO: `execute(record)` returns an Answer, nothing (asynchronous records), or a Wait — a condition on
the engine plus what to answer once it holds — and the transport decides how to wait (a trio task in the
daemon, the calling thread in direct mode). It never raises a FlexNPUError: errors become answers, or, for
asynchronous records, failures that the next synchronisation reports.

How it is put together: the Translator below is the session's state (handles, virtual NPU, memory held,
captures) and its entry points (execute, close, status), nothing else. Each record is handled by a plain
function `handler(session, seq, args, data)` of the module for its concern: protocol (answers, HELLO, phase,
contexts), streams (streams, events, core limits, syncs, submission), memory (pointers, malloc/free, quota),
copies, sharing (IPC memory), ops (templates, launches) and graphs (capture, replay, task groups; Graph,
TaskGroup and TaskUpdate are in collectors). HANDLERS maps each Op straight to its handler, so a record costs
one lookup, as before the split. Helpers take the session too and are imported by name, so a reader finds
where each comes from in the imports (no mixins), and each module is tested by driving a Translator with
records (tests/unit/test_translate_<concern>.py).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import structlog

from interposer.handles import TAGS, HandleTable, Kind
from interposer.limits import Backlog, Buffers, CoreLimits, Ledger
from interposer.topology import VirtualNPU
from interposer.translate import copies, graphs, memory, ops, protocol, sharing, streams
from interposer.translate.collectors import Graph, TaskGroup, TaskUpdate
from interposer.translate.protocol import (
    DAEMON_VERSION,
    OK,
    PHASES,
    Answer,
    VersionOnly,
    Wait,
    error_answer,
    ok,
    session_phase,
    version_answer,
)
from interposer.wire import Op, Record
from npu.emulated.ops import Kernel
from npu.errors import AclError, FlexNPUError, InvalidParam
from scheduler.stream import AsyncFailure, Phase, Stream

__all__ = [
    "DAEMON_VERSION",
    "OK",
    "PHASES",
    "Answer",
    "Graph",
    "TaskGroup",
    "TaskUpdate",
    "Translator",
    "VersionOnly",
    "Wait",
    "error_answer",
    "ok",
    "version_answer",
]

log = structlog.get_logger()

_session_ids = itertools.count(1)


class Translator:
    def __init__(self, vdev: VirtualNPU, pid: int = 0, buffers: Buffers | None = None) -> None:
        self.id = next(_session_ids)
        self.vdev = vdev
        self.pid = pid
        self.phase = Phase.UNKNOWN
        self.greeted = False
        self.runner = vdev.physical.runner
        tag = TAGS.take()  # unique among live sessions, so no two of a process's sessions share a handle
        self._untag = weakref.finalize(self, TAGS.give_back, tag)
        self.handles = HandleTable(tag)
        self.memory = 0  # bytes this session holds (rounded as the device counts them)
        # Host bytes its objects hold (copies' data, graphs), within the transport's buffers (direct mode: none).
        self.ledger = Ledger(buffers)
        self.deliveries: list[tuple[int, bytes]] = []  # async device-to-host bytes awaiting the next sync
        # The transport's say on keeping (seq, size) bytes of a delivery: the daemon bounds them, direct mode not.
        self.admit_delivery: Callable[[int, int], None] = lambda seq, size: None
        self.failure: AsyncFailure | None = None  # a failed async record that named no valid stream
        self.templates: dict[int, Kernel | FlexNPUError] = {}  # operator descriptions, by the client's id
        self.capturing: dict[Stream, Graph] = {}  # streams whose work is being captured into a graph
        self.grouping: dict[Stream, int] = {}  # capturing streams inside a task group: where the group starts
        self.updating: dict[Stream, TaskUpdate] = {}  # streams whose work replaces a task group's
        self.limits = CoreLimits(vdev.physical.npu.profile)
        self.default_stream = streams.open_stream(self)
        self.backlog = Backlog(_queued_on(self.default_stream, self.handles))  # entries it has queued, bounded
        self.log = log.bind(session=self.id, pid=pid, device=vdev.name)
        vdev.sessions[self] = None

    # -- the entry points ---------------------------------------------------------------------------------

    def execute(self, record: Record) -> Answer | Wait | None:
        op = record.command.op
        if not self.greeted and op not in (Op.HELLO, Op.VERSION):
            return self._refuse(record, InvalidParam(f"{op.name} before HELLO: a session must start with HELLO"))
        try:
            result = HANDLERS[op](self, record.seq, record.args, record.data)
        except FlexNPUError as exc:
            return self._refuse(record, exc)
        except Exception as exc:  # a bug or an input nobody foresaw: this record fails, the daemon goes on
            return self._refuse(record, self._crashed(record, exc))
        if isinstance(result, Wait):
            return Wait(result.runner, result.done, self._guarded(record, result.then))
        return result

    def close(self) -> None:
        """Free everything the session holds; its queued work is dropped."""
        engine = self.runner.engine
        for stream in streams.all_streams(self):
            engine.remove_stream(stream)
        self.capturing.clear()
        self.grouping.clear()
        self.updating.clear()
        self.vdev.ipc.forget(self)
        for alloc in self.vdev.space.allocations(self):
            memory.unmap(self, alloc.start)
        self.vdev.sessions.pop(self, None)
        self.ledger.close()
        self._untag()
        self.log.info("session_closed")

    def take_deliveries(self) -> list[tuple[int, bytes]]:
        taken, self.deliveries = self.deliveries, []
        return taken

    def status(self) -> dict:
        held = streams.all_streams(self)
        return {
            "session": self.id,
            "pid": self.pid,
            "phase": session_phase(self).value,
            "streams": len(held),
            "stream_phases": [{"phase": s.phase.value, "from": s.phase_from.value} for s in held],
            "queued": sum(len(s.queue) for s in held),
            "completed": sum(s.completed for s in held),
            "events": self.handles.count(Kind.EVENT),
            "memory_used": self.memory,
        }

    # -- failures -----------------------------------------------------------------------------------------

    def _refuse(self, record: Record, exc: FlexNPUError) -> Answer | None:
        self.log.info(
            "record_refused", op=record.command.op.name, seq=record.seq, code=int(exc.code), error=exc.message
        )
        if record.command.sync:
            return error_answer(exc.code, exc.message)
        if self.failure is None:
            self.failure = AsyncFailure(record.seq, exc)
        return None

    def _guarded(self, record: Record, then: Callable[[], Answer]) -> Callable[[], Answer]:
        def run() -> Answer:
            try:
                return then()
            except FlexNPUError as exc:
                return self._refuse(record, exc) or OK
            except Exception as exc:
                return self._refuse(record, self._crashed(record, exc)) or OK

        return run

    def _crashed(self, record: Record, exc: Exception) -> FlexNPUError:
        self.log.exception("record_crashed", op=record.command.op.name, seq=record.seq)
        return FlexNPUError(
            f"{record.command.op.name} failed inside the daemon ({exc!r}); the daemon log has the traceback",
            AclError.INTERNAL_ERROR,
        )


HANDLERS: dict[Op, Callable] = {
    Op.HELLO: protocol.hello,
    Op.VERSION: protocol.version,
    Op.CONTEXT_CREATE: protocol.context_create,
    Op.CONTEXT_DESTROY: protocol.context_destroy,
    Op.STREAM_CREATE: streams.stream_create,
    Op.STREAM_DESTROY: streams.stream_destroy,
    Op.STREAM_SYNC: streams.stream_sync,
    Op.DEVICE_SYNC: streams.device_sync,
    Op.STREAM_LIMIT_SET: streams.stream_limit_set,
    Op.STREAM_LIMIT_GET: streams.stream_limit_get,
    Op.DEVICE_LIMIT_SET: streams.device_limit_set,
    Op.DEVICE_LIMIT_GET: streams.device_limit_get,
    Op.EVENT_CREATE: streams.event_create,
    Op.EVENT_DESTROY: streams.event_destroy,
    Op.EVENT_RECORD: streams.event_record,
    Op.EVENT_WAIT: streams.event_wait,
    Op.EVENT_SYNC: streams.event_sync,
    Op.EVENT_QUERY: streams.event_query,
    Op.EVENT_RESET: streams.event_reset,
    Op.EVENT_ELAPSED: streams.event_elapsed,
    Op.MALLOC: memory.malloc,
    Op.FREE: memory.free,
    Op.MEM_INFO: memory.mem_info,
    Op.MEMCPY_H2D: copies.memcpy_h2d,
    Op.MEMCPY_D2H: copies.memcpy_d2h,
    Op.MEMCPY_D2D: copies.memcpy_d2d,
    Op.MEMSET: copies.memset,
    Op.MEMCPY_H2D_ASYNC: copies.memcpy_h2d_async,
    Op.MEMCPY_D2H_ASYNC: copies.memcpy_d2h_async,
    Op.MEMCPY_D2D_ASYNC: copies.memcpy_d2d_async,
    Op.MEMSET_ASYNC: copies.memset_async,
    Op.OP_TEMPLATE: ops.op_template,
    Op.OP_LAUNCH: ops.op_launch,
    Op.GRAPH_CAPTURE_BEGIN: graphs.capture_begin,
    Op.GRAPH_CAPTURE_END: graphs.capture_end,
    Op.GRAPH_LAUNCH: graphs.graph_launch,
    Op.GRAPH_DESTROY: graphs.graph_destroy,
    Op.GRAPH_GROUP_BEGIN: graphs.group_begin,
    Op.GRAPH_GROUP_END: graphs.group_end,
    Op.GRAPH_UPDATE_BEGIN: graphs.update_begin,
    Op.GRAPH_UPDATE_END: graphs.update_end,
    Op.IPC_EXPORT: sharing.ipc_export,
    Op.IPC_ALLOW: sharing.ipc_allow,
    Op.IPC_IMPORT: sharing.ipc_import,
    Op.IPC_CLOSE: sharing.ipc_close,
    Op.BARE_TGID: sharing.bare_tgid,
}


def _queued_on(default: Stream, handles: HandleTable) -> Callable[[], int]:
    """How many entries a session's streams hold; no reference to the session, so a closed one is freed at once
    (its events and graphs with it) instead of at the garbage collector's next full pass."""
    return lambda: len(default.queue) + sum(len(s.queue) for s in handles.values(Kind.STREAM))
