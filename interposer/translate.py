"""From records to work: one Translator per session maps its virtual handles and device addresses onto the
physical NPU's objects, checks quota and ownership, and turns each record into engine work and an answer.

It is sans-IO: `execute(record)` returns an Answer, nothing (asynchronous records), or a Wait — a condition on
the engine plus what to answer once it holds — and the transport decides how to wait (a trio task in the
daemon, the calling thread in direct mode). It never raises a FlexNPUError: errors become answers, or, for
asynchronous records, failures that the next synchronisation reports.
"""

from __future__ import annotations

import itertools
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import structlog
from construct import ConstructError

from interposer import limits, wire
from interposer.handles import TAGS, HandleTable, Kind
from interposer.limits import Backlog, Buffers, CoreLimits, Ledger, Tab, TooMany
from interposer.topology import VirtualNPU
from interposer.wire import Op, Record
from npu.emulated import dtypes
from npu.emulated.ops import Kernel, KernelTask, TensorSpec, bind
from npu.errors import AclError, FlexNPUError, InvalidParam, NotSupported, OutOfMemory
from npu.memory import Region, rounded_size
from npu.tasks import DeviceToDevice, DeviceToHost, Fill, HostToDevice, PeerCopy, Task
from scheduler import phase
from scheduler.runner import Runner
from scheduler.stream import (
    AsyncFailure,
    Event,
    FailEntry,
    Phase,
    PhaseSource,
    RecordEntry,
    Stream,
    TaskEntry,
    WaitEntry,
)

log = structlog.get_logger()

DAEMON_VERSION = "flexnpu 0.1.0"
PHASES = {0: Phase.UNKNOWN, 1: Phase.PREFILL, 2: Phase.DECODE}
MALLOC_POLICIES = range(6)  # ACL_MEM_MALLOC_HUGE_FIRST .. ACL_MEM_MALLOC_NORMAL_ONLY_P2P
ACL_HBM_MEM = 1
PLAIN_FORMATS = {-1, 0, 1, 2}  # UNDEFINED, NCHW, NHWC, ND: row-major as described

_session_ids = itertools.count(1)


class Answer(NamedTuple):  # one per synchronous call: a NamedTuple builds at a third of a frozen dataclass's cost
    status: int = AclError.SUCCESS
    payload: bytes | memoryview = b""


@dataclass(frozen=True, slots=True)
class Wait:
    runner: Runner
    done: Callable[[], bool]
    then: Callable[[], Answer]


OK = Answer()


def ok(command: wire.Command, **fields) -> Answer:
    return Answer(AclError.SUCCESS, command.reply.build(fields))


def error_answer(code: int, message: str) -> Answer:
    return Answer(code, message.encode())


def version_answer() -> Answer:
    return ok(wire.COMMANDS[Op.VERSION], version=wire.PROTOCOL_VERSION, daemon=DAEMON_VERSION)


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
        self.default_stream = self._open_stream()
        self.backlog = Backlog(_queued_on(self.default_stream, self.handles))  # entries it has queued, bounded
        self.log = log.bind(session=self.id, pid=pid, device=vdev.name)
        vdev.sessions[self] = None

    # -- the entry point ----------------------------------------------------------------------------------

    def execute(self, record: Record) -> Answer | Wait | None:
        op = record.command.op
        if not self.greeted and op not in (Op.HELLO, Op.VERSION):
            return self._refuse(record, InvalidParam(f"{op.name} before HELLO: a session must start with HELLO"))
        try:
            result = self._HANDLERS[op](self, record.seq, record.args, record.data)
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
        for stream in self._streams():
            engine.remove_stream(stream)
        self.capturing.clear()
        self.grouping.clear()
        self.updating.clear()
        self.vdev.ipc.forget(self)
        for alloc in self.vdev.space.allocations(self):
            self._unmap(alloc.start)
        self.vdev.sessions.pop(self, None)
        self.ledger.close()
        self._untag()
        self.log.info("session_closed")

    def take_deliveries(self) -> list[tuple[int, bytes]]:
        taken, self.deliveries = self.deliveries, []
        return taken

    def status(self) -> dict:
        streams = self._streams()
        return {
            "session": self.id,
            "pid": self.pid,
            "phase": self._phase().value,
            "streams": len(streams),
            "stream_phases": [{"phase": s.phase.value, "from": s.phase_from.value} for s in streams],
            "queued": sum(len(s.queue) for s in streams),
            "completed": sum(s.completed for s in streams),
            "events": self.handles.count(Kind.EVENT),
            "memory_used": self.memory,
        }

    # -- helpers ------------------------------------------------------------------------------------------

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

    def _phase(self) -> Phase:
        return self.vdev.role if self.vdev.role is not Phase.UNKNOWN else self.phase

    def _declare(self, stream: Stream) -> None:
        if self.vdev.role is not Phase.UNKNOWN:
            phase.declare(stream, self.vdev.role, PhaseSource.ROLE)
        else:
            phase.declare(stream, self.phase, PhaseSource.CLIENT)

    def _open_stream(self) -> Stream:
        stream = Stream(tenant=self.vdev.tenant)
        self._declare(stream)
        self.limits.apply(stream)
        self.runner.engine.add_stream(stream)
        return stream

    def _streams(self) -> list[Stream]:
        return [self.default_stream, *self.handles.values(Kind.STREAM)]

    def _room(self, kind: Kind, limit: int, code: AclError, what: str, more: int = 0) -> None:
        """Refuse a new object of `kind` once the session holds `limit` (with `more` on the way)."""
        held = self.handles.count(kind) + more
        if held >= limit:
            raise TooMany(
                f"{what}: this process holds {held} {kind.name.lower().replace('_', ' ')}s on {self.vdev.name}, as "
                f"many as one process may (as on a real device); destroy some first",
                code,
            )

    def _stream(self, handle: int) -> Stream:
        return self.default_stream if handle == 0 else self.handles.get(handle, Kind.STREAM)

    def _region(self, ptr: int, count: int, what: str, peer: bool = False) -> Region:
        """The bytes at [ptr, ptr+count); another chip's (imported with peer access) only where `peer` allows."""
        region = self.vdev.space.region(ptr, count, self, what)
        if not peer and region.buffer.home is not self.vdev.physical.npu.memory:
            raise InvalidParam(
                f"{what} 0x{ptr:x}: memory of another NPU (IPC memory imported with peer access) can only be "
                "copied device to device"
            )
        return region

    def _copy(self, args, what: str) -> DeviceToDevice:
        """A device-to-device copy; across the interconnect when one side is another chip's memory."""
        dst = self._region(args.dst, args.count, f"{what} dst", peer=True)
        src = self._region(args.src, args.count, f"{what} src", peer=True)
        local = self.vdev.physical.npu.memory
        return DeviceToDevice(dst, src) if dst.buffer.home is src.buffer.home is local else PeerCopy(dst, src)

    def _idle(self) -> bool:
        return all(s.idle for s in self._streams())

    def _blocking(self, seq: int, task: Task, answer: Callable[[], Answer] = lambda: OK) -> Answer | Wait:
        """A blocking copy or fill is a task on the default stream, after the session's work on every stream
        (events order it after each busy one, as a legacy default stream waits for the others); the call
        returns once it completes. A stream already failed reports that failure instead."""
        stream = self.default_stream
        for other in self._streams()[1:]:
            if not other.idle:
                event = Event(recorded=1)
                self.runner.submit(RecordEntry(other, seq, event=event, generation=1))
                self.runner.submit(WaitEntry(stream, seq, event=event, generation=1))
        entry = TaskEntry(stream, seq, task=task)
        self.runner.submit(entry)

        def then() -> Answer:
            ran = entry.job is not None and entry.job.failure is None
            return answer() if ran else self._report(stream)

        return Wait(self.runner, lambda: stream.idle, then)

    def _submit(self, stream: Stream, seq: int, make_task: Callable[[], Task], limits: Stream | None = None) -> None:
        collector = self._collector(stream)
        if collector is None:
            self.backlog.admit(1, f"record seq {seq}")  # a refusal fails the session's next synchronisation
        try:
            task = make_task()
        except FlexNPUError as exc:
            self.log.info("async_record_refused", seq=seq, code=int(exc.code), error=exc.message)
            if collector is not None:
                collector.failure = collector.failure or AsyncFailure(seq, exc)
            else:
                self.runner.submit(FailEntry(stream, seq, error=exc))
            return
        if collector is not None:
            self._collect(collector, [task], seq)
        else:
            self.runner.submit(TaskEntry(stream, seq, task=task, limits=limits))

    def _collect(self, collector: Graph | TaskUpdate, tasks: list[Task], seq: int) -> None:
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
            self.log.info("capture_refused", seq=seq, code=int(exc.code), error=exc.message)
            collector.failure = AsyncFailure(seq, exc)
            collector.tasks.clear()  # a failed capture is good for nothing: let its tasks go now
            collector.tab.settle()
            return
        collector.tasks.extend(tasks)

    def _collector(self, stream: Stream) -> Graph | TaskUpdate | None:
        """Where a stream's tasks go instead of the device: a graph being captured, or a task group's update."""
        return self.capturing.get(stream) or self.updating.get(stream)

    def _not_capturing(self, stream: Stream, what: str) -> None:
        if stream in self.capturing:
            raise NotSupported(f"{what} on a stream being captured: a captured graph holds operators and copies only")

    def _report(self, *streams: Stream) -> Answer:
        """Answer a synchronisation: the earliest asynchronous failure it covers, else success."""
        failures = [f for f in (self.failure, *(s.take_failure() for s in streams)) if f is not None]
        self.failure = None
        if not failures:
            return OK
        first = min(failures, key=lambda f: f.seq)
        return error_answer(first.error.code, f"asynchronous record seq {first.seq} failed: {first.error.message}")

    def _unmap(self, ptr: int) -> None:
        """Give back an allocation or an import. The bytes go back to the chip they live on (an import with peer
        access maps another chip's) once their last holder lets go; until then the virtual NPU that allocated
        them pays its quota for them, even after the allocating session is gone (interposer/ipc.py)."""
        alloc = self.vdev.space.unmap(ptr, self)
        buffer = alloc.buffer
        ipc = self.vdev.ipc
        if alloc.imported is None:
            self.memory -= buffer.size
            if buffer.holders > 1:  # still imported: the quota goes on paying until the last import closes
                ipc.owe(buffer, self.vdev)
            else:
                self.vdev.used -= buffer.size
        buffer.home.free(buffer)
        if buffer.freed and alloc.imported is not None:
            ipc.settle(buffer)

    def _deliver(self, seq: int) -> Callable[[Region], None]:
        def deliver(region: Region) -> None:
            self.admit_delivery(seq, region.size)  # may refuse: the copy then fails, as a task on its stream
            self.deliveries.append((seq, region.read()))

        return deliver

    # -- session ------------------------------------------------------------------------------------------

    def _hello(self, seq, args, data):
        if args.version != wire.PROTOCOL_VERSION:
            raise InvalidParam(
                f"protocol version mismatch: client speaks {args.version}, daemon {wire.PROTOCOL_VERSION}"
            )
        phase = PHASES.get(args.phase)
        if phase is None:
            raise InvalidParam(f"HELLO phase {args.phase} is not 0 (unknown), 1 (prefill) or 2 (decode)")
        self.phase, self.greeted = phase, True
        self.pid = self.pid or args.pid
        self._declare(self.default_stream)
        self.log = log.bind(session=self.id, pid=self.pid, device=self.vdev.name)
        self.log.info("session_opened", phase=self._phase().value)
        return ok(
            wire.COMMANDS[Op.HELLO],
            version=wire.PROTOCOL_VERSION,
            total_memory=self.vdev.quota,
            name=self.vdev.name,
            chip=self.vdev.physical.npu.profile.name,
        )

    def _version(self, seq, args, data):
        return version_answer()

    def _context_create(self, seq, args, data):
        self._room(Kind.CONTEXT, limits.CONTEXTS, AclError.RT_NO_STREAM_RESOURCE, "create_context")
        return ok(wire.COMMANDS[Op.CONTEXT_CREATE], handle=self.handles.add(Kind.CONTEXT, object()))

    def _context_destroy(self, seq, args, data):
        self.handles.remove(args.handle, Kind.CONTEXT)
        return OK

    # -- streams and events -------------------------------------------------------------------------------

    def _stream_create(self, seq, args, data):
        # The default stream counts, as on a real device.
        self._room(Kind.STREAM, limits.STREAMS, AclError.RT_NO_STREAM_RESOURCE, "create_stream", more=1)
        return ok(wire.COMMANDS[Op.STREAM_CREATE], handle=self.handles.add(Kind.STREAM, self._open_stream()))

    def _stream_destroy(self, seq, args, data):
        stream = self.handles.get(args.handle, Kind.STREAM)

        def destroy() -> Answer:
            self.handles.remove(args.handle, Kind.STREAM)
            self.runner.engine.remove_stream(stream)
            self.limits.forget(stream)
            return OK

        return destroy() if stream.idle else Wait(self.runner, lambda: stream.idle, destroy)

    def _stream_limit_set(self, seq, args, data):
        self.limits.set_stream(self._stream(args.stream), args.kind, args.value)
        return OK

    def _stream_limit_get(self, seq, args, data):
        value = self.limits.get_stream(self._stream(args.stream), args.kind)
        return ok(wire.COMMANDS[Op.STREAM_LIMIT_GET], value=value)

    def _device_limit_set(self, seq, args, data):
        self.limits.set_device(args.kind, args.value, self._streams())
        return OK

    def _device_limit_get(self, seq, args, data):
        return ok(wire.COMMANDS[Op.DEVICE_LIMIT_GET], value=self.limits.get_device(args.kind))

    def _stream_sync(self, seq, args, data):
        stream = self._stream(args.handle)
        return Wait(self.runner, lambda: stream.idle, lambda: self._report(stream))

    def _device_sync(self, seq, args, data):
        return Wait(self.runner, self._idle, lambda: self._report(*self._streams()))

    def _event_create(self, seq, args, data):
        self._room(Kind.EVENT, limits.EVENTS, AclError.RT_NO_EVENT_RESOURCE, "create_event")
        return ok(wire.COMMANDS[Op.EVENT_CREATE], handle=self.handles.add(Kind.EVENT, Event()))

    def _event_destroy(self, seq, args, data):
        self.handles.remove(args.handle, Kind.EVENT)
        return OK

    def _event_record(self, seq, args, data):
        stream = self._stream(args.stream)
        self._not_capturing(stream, "record_event")
        event = self.handles.get(args.event, Kind.EVENT)
        self.backlog.admit(1, f"record_event seq {seq}")
        event.recorded += 1
        self.runner.submit(RecordEntry(stream, seq, event=event, generation=event.recorded))

    def _event_wait(self, seq, args, data):
        stream = self._stream(args.stream)
        self._not_capturing(stream, "stream_wait_event")
        event = self.handles.get(args.event, Kind.EVENT)
        self.backlog.admit(1, f"stream_wait_event seq {seq}")
        self.runner.submit(WaitEntry(stream, seq, event=event, generation=event.recorded))

    def _event_reset(self, seq, args, data):
        self._stream(args.stream)
        event = self.handles.get(args.event, Kind.EVENT)
        event.timestamp = None  # forget the completed record; pending waits still see their generation

    def _event_sync(self, seq, args, data):
        event = self.handles.get(args.handle, Kind.EVENT)
        target = event.recorded
        return Wait(self.runner, lambda: event.completed >= target, lambda: OK)

    def _event_query(self, seq, args, data):
        event = self.handles.get(args.handle, Kind.EVENT)
        self.runner.catch_up()
        return ok(wire.COMMANDS[Op.EVENT_QUERY], completed=int(event.completed >= event.recorded))

    def _event_elapsed(self, seq, args, data):
        start = self.handles.get(args.start, Kind.EVENT)
        end = self.handles.get(args.end, Kind.EVENT)
        if start.timestamp is None or end.timestamp is None:
            raise InvalidParam(
                "event_elapsed_time: both events must have completed a record (record them, then synchronize)"
            )
        ns = max(0, round((end.timestamp - start.timestamp) * 1e9))
        return ok(wire.COMMANDS[Op.EVENT_ELAPSED], ns=ns)

    # -- memory -------------------------------------------------------------------------------------------

    def _malloc(self, seq, args, data):
        size, policy = args.size, args.policy
        if policy not in MALLOC_POLICIES:
            raise InvalidParam(
                f"malloc policy {policy} is not an aclrtMemMallocPolicy (0-5)", AclError.RT_INVALID_MALLOC_TYPE
            )
        if size <= 0:
            raise InvalidParam(f"malloc size must be > 0, got {size}")
        vdev, need = self.vdev, rounded_size(size)
        if vdev.used + need > vdev.quota:
            raise OutOfMemory(
                f"{vdev.name}: out of memory: malloc({size}) needs {need} bytes, {vdev.quota - vdev.used} of its "
                f"{vdev.quota}-byte quota are free; free memory or raise the quota ([[virtual]] memory in the config)"
            )
        buffer = vdev.physical.npu.memory.alloc(size)
        alloc = vdev.space.map(size, buffer, self)
        vdev.used += buffer.size
        self.memory += buffer.size
        return ok(wire.COMMANDS[Op.MALLOC], ptr=alloc.start)

    def _free(self, seq, args, data):
        alloc = self.vdev.space.find(args.ptr, self)
        if alloc is not None and alloc.imported is not None:
            raise InvalidParam(f"free(0x{args.ptr:x}): imported IPC memory is let go with acl.rt.ipc_mem_close")
        if alloc is not None and (holding := self.vdev.ipc.importers_of(self, alloc.buffer)):
            raise InvalidParam(
                f"free(0x{args.ptr:x}): {holding} process(es) still import this memory; they must call "
                "acl.rt.ipc_mem_close first",
                AclError.RT_MEMORY_FREE,
            )
        if alloc is not None:
            self.vdev.ipc.withdraw(self, alloc.buffer)
        self._unmap(args.ptr)
        return OK

    # -- IPC memory (interposer/ipc.py) -------------------------------------------------------------------

    def _ipc_export(self, seq, args, data):
        region = self._region(args.ptr, args.size, "ipc_mem_get_export_key dev_ptr")
        self._keys_room("ipc_mem_get_export_key")
        key = self.vdev.ipc.export(self, region, self.vdev.physical, args.flags)
        return ok(wire.COMMANDS[Op.IPC_EXPORT], key=key.encode())

    def _ipc_allow(self, seq, args, data):
        if len(data) % 4:
            raise InvalidParam(f"ipc_mem_set_import_pid: {len(data)} bytes of pids is not a whole number of int32s")
        pids = list(struct.unpack(f"<{len(data) // 4}i", bytes(data)))
        self.vdev.ipc.allow(self, _key(args.key), pids)
        return OK

    def _ipc_import(self, seq, args, data):
        self._keys_room("ipc_mem_import_by_key")
        export = self.vdev.ipc.open(self, self.pid, _key(args.key), self.vdev.physical, args.flags)
        region = export.region
        region.buffer.holders += 1
        alloc = self.vdev.space.map(region.size, region.buffer, self, offset=region.offset, imported=export)
        return ok(wire.COMMANDS[Op.IPC_IMPORT], ptr=alloc.start)

    def _ipc_close(self, seq, args, data):
        export = self.vdev.ipc.close(self, _key(args.key))
        for alloc in self.vdev.space.allocations(self):
            if alloc.imported is export:
                self._unmap(alloc.start)
        return OK

    def _keys_room(self, what: str) -> None:
        held = self.vdev.ipc.held(self)
        if held >= limits.IPC_KEYS:
            raise TooMany(
                f"{what}: this process holds {held} IPC memory keys (exported or imported), as many as one process "
                f"may ({limits.IPC_KEYS}); close some with acl.rt.ipc_mem_close first"
            )

    def _bare_tgid(self, seq, args, data):
        return ok(wire.COMMANDS[Op.BARE_TGID], pid=self.pid)

    def _mem_info(self, seq, args, data):
        if args.attr == ACL_HBM_MEM:
            free, total = self.vdev.quota - self.vdev.used, self.vdev.quota
        elif args.attr == 0:
            free, total = 0, 0  # ACL_DDR_MEM: the emulated chip has no device-side DDR
        else:
            raise InvalidParam(f"get_mem_info attr {args.attr} is not ACL_DDR_MEM (0) or ACL_HBM_MEM (1)")
        return ok(wire.COMMANDS[Op.MEM_INFO], free=free, total=total)

    def _memcpy_h2d(self, seq, args, data):
        _check_count(args.count, data)
        return self._blocking(seq, HostToDevice(self._region(args.dst, args.count, "memcpy dst"), data))

    def _memcpy_d2h(self, seq, args, data):
        region = self._region(args.src, args.count, "memcpy src")
        # A view, not a copy: the session is blocked until the client has read it, so nothing can change it.
        return self._blocking(seq, DeviceToHost(region, _ignore), lambda: Answer(AclError.SUCCESS, region.peek()))

    def _memcpy_d2d(self, seq, args, data):
        return self._blocking(seq, self._copy(args, "memcpy"))

    def _memset(self, seq, args, data):
        return self._blocking(seq, Fill(self._region(args.ptr, args.count, "memset ptr"), _byte(args.value)))

    def _memcpy_h2d_async(self, seq, args, data):
        stream = self._stream(args.stream)

        def task():
            _check_count(args.count, data)
            # A copy: the frame's buffer is reused for the next frame before this task runs. Its bytes count
            # against the session's buffers for as long as a queue or a captured graph holds the task.
            copy = HeldHostToDevice(self._region(args.dst, args.count, "memcpy_async dst"), bytes(data))
            self.ledger.tab(copy).add(args.count, f"the data of asynchronous memcpy seq {seq}")
            return copy

        self._submit(stream, seq, task)

    def _memcpy_d2h_async(self, seq, args, data):
        stream = self._stream(args.stream)
        self._submit(
            stream,
            seq,
            lambda: DeviceToHost(self._region(args.src, args.count, "memcpy_async src"), self._deliver(seq)),
        )

    def _memcpy_d2d_async(self, seq, args, data):
        stream = self._stream(args.stream)
        self._submit(stream, seq, lambda: self._copy(args, "memcpy_async"))

    def _memset_async(self, seq, args, data):
        stream = self._stream(args.stream)
        self._submit(
            stream, seq, lambda: Fill(self._region(args.ptr, args.count, "memset_async ptr"), _byte(args.value))
        )

    # -- operators and graphs -----------------------------------------------------------------------------

    def _op_template(self, seq, args, data):
        """Check a description once; a refused one is kept, so each launch of it fails on its own stream."""
        try:
            description = wire.OpDescription.parse(bytes(data))
            op = description.op_type
            kernel: Kernel | FlexNPUError = bind(
                op,
                [_spec(op, f"input {i}", t) for i, t in enumerate(description.inputs)],
                [_spec(op, f"output {i}", t) for i, t in enumerate(description.outputs)],
                {a.name: a.value for a in description.attrs},
            )
        except ConstructError as exc:
            kernel = InvalidParam(f"operator description (template {args.template}) is malformed: {exc}")
        except FlexNPUError as exc:
            kernel = exc
        except (TypeError, ValueError) as exc:  # an attribute of the wrong kind, e.g. an int where a list goes
            kernel = InvalidParam(f"operator description (template {args.template}): an attribute is wrong: {exc}")
        if isinstance(kernel, FlexNPUError):
            self.log.info("operator_refused", seq=seq, template=args.template, error=kernel.message)
        self.templates[args.template] = kernel

    def _op_launch(self, seq, args, data):
        limits = None if args.limits == wire.OWN_LIMITS else self._stream(args.limits)
        self._submit(self._stream(args.stream), seq, lambda: self._kernel_task(args, data), limits)

    def _kernel_task(self, args, data) -> KernelTask:
        kernel = self.templates.get(args.template)
        if kernel is None:
            raise InvalidParam(f"operator launch names template {args.template}, never described in this session")
        if isinstance(kernel, FlexNPUError):
            raise kernel
        ins, outs = kernel.ins, kernel.outs
        if args.count != len(ins) + len(outs) or len(data) != 8 * args.count:
            raise InvalidParam(
                f"{kernel.op_type} launch: {args.count} buffers for {len(ins)} inputs and {len(outs)} outputs"
            )
        addresses = struct.unpack(f"<{args.count}Q", bytes(data))
        op = kernel.op_type
        return KernelTask(
            kernel,
            tuple(
                self._region(a, t.nbytes, f"{op} input {i}")
                for i, (a, t) in enumerate(zip(addresses, ins, strict=False))
            ),
            tuple(
                self._region(a, t.nbytes, f"{op} output {i}")
                for i, (a, t) in enumerate(zip(addresses[len(ins) :], outs, strict=True))
            ),
        )

    def _capture_begin(self, seq, args, data):
        stream = self._stream(args.stream)
        if stream in self.capturing:
            raise InvalidParam("capture_begin: this stream is already being captured")
        self._room(Kind.GRAPH, limits.GRAPHS, AclError.RT_NO_MODEL_RESOURCE, "ri_capture_begin", len(self.capturing))
        self.capturing[stream] = self._tabbed(Graph())
        return OK

    def _capture_end(self, seq, args, data):
        stream = self._stream(args.stream)
        if stream in self.grouping:
            raise InvalidParam(
                "ri_capture_end: a task group is still open on this stream; end it with ri_capture_task_grp_end "
                "first (the capture goes on)"
            )
        graph = self.capturing.pop(stream, None)
        if graph is None:
            raise InvalidParam("capture_end: this stream is not being captured (call capture_begin on it first)")
        if graph.failure is not None:
            f = graph.failure
            raise type(f.error)(f"captured record seq {f.seq} failed: {f.error.message}", f.error.code)
        return ok(wire.COMMANDS[Op.GRAPH_CAPTURE_END], handle=self.handles.add(Kind.GRAPH, graph))

    def _graph_launch(self, seq, args, data):
        graph = self.handles.get(args.graph, Kind.GRAPH)
        stream = self._stream(args.stream)
        capture = self.capturing.get(stream)
        if capture is not None:  # a replay inside a capture: the graph's tasks join the new graph, within its room
            self._collect(capture, graph.tasks, seq)
        else:  # one submission for the whole graph (at most GRAPH_TASKS): the engine catches up once
            self.backlog.admit(len(graph.tasks), f"ri_execute_async seq {seq}")
            self.runner.submit_all([TaskEntry(stream, seq, task=task) for task in graph.tasks])

    def _tabbed(self, collector: Graph | TaskUpdate) -> Graph | TaskUpdate:
        collector.tab = self.ledger.tab(collector)
        return collector

    def _graph_destroy(self, seq, args, data):
        self.handles.remove(args.handle, Kind.GRAPH)
        return OK

    # Task groups (aclmdlRICaptureTaskGrpBegin/End, aclmdlRICaptureTaskUpdateBegin/End): the operators of a
    # capture that a later update replaces with the same operators on new parameters, as a decode step's
    # attention takes each request's new length.

    def _group_begin(self, seq, args, data):
        stream = self._stream(args.stream)
        graph = self.capturing.get(stream)
        if graph is None or stream in self.grouping:
            raise InvalidParam("ri_capture_task_grp_begin: the stream must be capturing, outside a task group")
        self._room(Kind.TASK_GROUP, limits.TASK_GROUPS, AclError.RT_OVER_LIMIT, "ri_capture_task_grp_begin")
        self.grouping[stream] = len(graph.tasks)
        return OK

    def _group_end(self, seq, args, data):
        stream = self._stream(args.stream)
        start = self.grouping.pop(stream, None)
        graph = self.capturing.get(stream)
        if start is None or graph is None:
            raise InvalidParam("ri_capture_task_grp_end: no task group began on this stream")
        group = TaskGroup(graph, start, max(0, len(graph.tasks) - start))
        return ok(wire.COMMANDS[Op.GRAPH_GROUP_END], handle=self.handles.add(Kind.TASK_GROUP, group))

    def _update_begin(self, seq, args, data):
        stream = self._stream(args.stream)
        group = self.handles.get(args.group, Kind.TASK_GROUP)
        if stream in self.capturing or stream in self.updating:
            raise InvalidParam("ri_capture_task_update_begin: the stream must be neither capturing nor updating")
        self.updating[stream] = self._tabbed(TaskUpdate(group))

    def _update_end(self, seq, args, data):
        """Replace the group's tasks; a refusal fails the stream (its next synchronisation reports it)."""
        stream = self._stream(args.stream)
        update = self.updating.pop(stream, None)
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
            self.runner.submit(FailEntry(stream, seq, error=exc))
            return
        group.graph.tasks[group.start : group.start + group.count] = update.tasks

    _HANDLERS: dict[Op, Callable] = {
        Op.HELLO: _hello,
        Op.VERSION: _version,
        Op.CONTEXT_CREATE: _context_create,
        Op.CONTEXT_DESTROY: _context_destroy,
        Op.STREAM_CREATE: _stream_create,
        Op.STREAM_DESTROY: _stream_destroy,
        Op.STREAM_SYNC: _stream_sync,
        Op.DEVICE_SYNC: _device_sync,
        Op.STREAM_LIMIT_SET: _stream_limit_set,
        Op.STREAM_LIMIT_GET: _stream_limit_get,
        Op.DEVICE_LIMIT_SET: _device_limit_set,
        Op.DEVICE_LIMIT_GET: _device_limit_get,
        Op.EVENT_CREATE: _event_create,
        Op.EVENT_DESTROY: _event_destroy,
        Op.EVENT_RECORD: _event_record,
        Op.EVENT_WAIT: _event_wait,
        Op.EVENT_SYNC: _event_sync,
        Op.EVENT_QUERY: _event_query,
        Op.EVENT_RESET: _event_reset,
        Op.EVENT_ELAPSED: _event_elapsed,
        Op.MALLOC: _malloc,
        Op.FREE: _free,
        Op.MEM_INFO: _mem_info,
        Op.MEMCPY_H2D: _memcpy_h2d,
        Op.MEMCPY_D2H: _memcpy_d2h,
        Op.MEMCPY_D2D: _memcpy_d2d,
        Op.MEMSET: _memset,
        Op.MEMCPY_H2D_ASYNC: _memcpy_h2d_async,
        Op.MEMCPY_D2H_ASYNC: _memcpy_d2h_async,
        Op.MEMCPY_D2D_ASYNC: _memcpy_d2d_async,
        Op.MEMSET_ASYNC: _memset_async,
        Op.OP_TEMPLATE: _op_template,
        Op.OP_LAUNCH: _op_launch,
        Op.GRAPH_CAPTURE_BEGIN: _capture_begin,
        Op.GRAPH_CAPTURE_END: _capture_end,
        Op.GRAPH_LAUNCH: _graph_launch,
        Op.GRAPH_DESTROY: _graph_destroy,
        Op.GRAPH_GROUP_BEGIN: _group_begin,
        Op.GRAPH_GROUP_END: _group_end,
        Op.GRAPH_UPDATE_BEGIN: _update_begin,
        Op.GRAPH_UPDATE_END: _update_end,
        Op.IPC_EXPORT: _ipc_export,
        Op.IPC_ALLOW: _ipc_allow,
        Op.IPC_IMPORT: _ipc_import,
        Op.IPC_CLOSE: _ipc_close,
        Op.BARE_TGID: _bare_tgid,
    }


class VersionOnly:
    """The ancillary nodes (davinci_manager, devmm_svm, hisi_hdc): present for containers, answer VERSION only."""

    def __init__(self, name: str) -> None:
        self.name = name

    def execute(self, record: Record) -> Answer:
        if record.command.op is Op.VERSION:
            return version_answer()
        exc = NotSupported(f"{self.name} answers only VERSION; open a davinciN node for {record.command.op.name}")
        return error_answer(exc.code, exc.message) if record.command.sync else None

    def take_deliveries(self) -> list[tuple[int, bytes]]:
        return []

    def close(self) -> None:
        pass


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


@dataclass(frozen=True, slots=True, weakref_slot=True)
class HeldHostToDevice(HostToDevice):
    """An asynchronous host-to-device copy whose bytes the session's buffers count while the task lives."""


def _queued_on(default: Stream, handles: HandleTable) -> Callable[[], int]:
    """How many entries a session's streams hold; no reference to the session, so a closed one is freed at once
    (its events and graphs with it) instead of at the garbage collector's next full pass."""
    return lambda: len(default.queue) + sum(len(s.queue) for s in handles.values(Kind.STREAM))


def _spec(op: str, which: str, description) -> TensorSpec:
    dims = tuple(description.dims)
    if any(d < 0 for d in dims):
        raise InvalidParam(f"{op} {which}: dims {list(dims)} must be >= 0")
    if description.format not in PLAIN_FORMATS:
        raise NotSupported(
            f"{op} {which}: aclFormat {description.format} is a blocked layout the emulated op library does not "
            f"implement; describe the tensor as ACL_FORMAT_ND (2)",
            AclError.FEATURE_UNSUPPORTED,
        )
    return TensorSpec(dtypes.from_acl(description.dtype, f"{op} {which}"), dims)


def _check_count(count: int, data: memoryview) -> None:
    if count != len(data):
        raise InvalidParam(f"memcpy count {count} does not match the {len(data)} bytes sent")


def _key(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidParam("an IPC memory key is 64 ASCII characters, as ipc_mem_get_export_key returns") from None


def _ignore(region: Region) -> None:
    pass


def _byte(value: int) -> int:
    if not 0 <= value <= 255:
        raise InvalidParam(f"memset value {value} is not a byte (0-255)")
    return value
