"""Limits of one session: the core limits its client sets, and what it may make the daemon hold.

Core limits, as CANN defines them (aclrtSetStreamResLimit, aclrtSetDeviceResLimit, aclrtGetStreamResLimit): a
stream's limit is its own, else its process's device limit, else the whole chip. The engine reads the result
from each stream (Stream.cube_limit / vector_limit) as a ceiling no policy lifts. A launch from a thread that
called aclrtUseStreamResInCurrentThread takes that stream's limits instead of its own stream's (the client names
it in the launch record).

Objects and bytes: every user who may open a device node can make the daemon hold objects (streams, events,
graphs, IPC exports, queued tasks) and host bytes (the data of asynchronous and captured host-to-device copies,
captured graphs). Each kind is bounded per session, with the code real CANN returns when a device runs out of
it, so one tenant cannot make the daemon slow or large for the others (docs/reliability.md). A session is one
process's view of one device, so where CANN publishes a device's figure for the 910B (Atlas A2) and 910C
(Atlas A3) class of chip, the session's limit is that figure.
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Callable
from typing import Protocol

from npu.errors import AclError, FlexNPUError, InvalidParam
from npu.profiles import ChipProfile
from scheduler.stream import Stream

# Streams, counting the default stream: "Stream最大数" 1984 on Atlas A2/A3 (CANN 9.0 aclrtCreateStream; 2048 in
# CANN 8.0). Past it ACL_ERROR_RT_NO_STREAM_RESOURCE.
STREAMS = 1984
# Contexts: each brings a default stream on a real device, so no more than streams.
CONTEXTS = STREAMS
# Events: "单个Device支持的Event最大数" 65,535 on Atlas A2 (CANN 8.0 aclrtCreateEvent). ACL_ERROR_RT_NO_EVENT_RESOURCE.
EVENTS = 65535
# Tasks one captured graph holds: a model (captured) stream's queue is at most STREAM_SQ_MAX_DEPTH = 32,768 deep
# (hicann/runtime src/runtime/core/src/stream/stream.hpp); a task past it fails with "The model stream is full"
# (EE1019, RT_ERROR_STREAM_FULL -> ACL_ERROR_RT_STREAM_TASK_FULL). So one launch of a graph queues at most this.
GRAPH_TASKS = 32768
# Entries one session may have queued on the engine at once. No CANN figure: a real stream's queue is 2,048 deep
# on the 910B (rtsqDepth, hicann/runtime src/runtime/config/910_B_93/dev_info_reg.cc) and the submitting host
# thread waits when it is full; asynchronous records cannot wait here, so past this they fail with
# ACL_ERROR_RT_STREAM_TASK_FULL at the next synchronisation. Two full graphs fit.
QUEUED_TASKS = 2 * GRAPH_TASKS
# Captured graphs and task groups. No public figure (the driver reports its model capacity at run time); past
# it ACL_ERROR_RT_NO_MODEL_RESOURCE. Graphs also count against the session's buffers (GRAPH_TASK_BYTES).
GRAPHS = 1024
TASK_GROUPS = GRAPH_TASKS
# IPC exports and imports one session holds at once. No public figure; ACL_ERROR_RT_OVER_LIMIT.
IPC_KEYS = 4096
# Host bytes a captured graph costs the daemon per task it replays (a task of a graph replayed inside another
# is not copied, but each launch queues it again): counted against the session's buffer limit
# ([daemon] session_buffer) for as long as the graph lives, so graphs are bounded in bytes as well as in count.
GRAPH_TASK_BYTES = 256


class TooMany(FlexNPUError):
    """A session holds as many objects of a kind as it may. `code` is the one CANN gives for the resource."""

    code = AclError.RT_OVER_LIMIT
    errno = errno.ENOSPC


class Buffers(Protocol):
    """The transport's bounds on host bytes (vdevfs.limits.BufferAccount): refuse, then count."""

    def check(self, extra: int, what: str) -> None: ...

    def add(self, n: int) -> None: ...


class Tab:
    """Bytes counted for one object, growing with it; given back when the object is gone."""

    __slots__ = ("ledger", "bytes")

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.bytes = 0

    def add(self, n: int, what: str) -> None:
        self.ledger.charge(n, what)
        self.bytes += n

    def settle(self) -> None:
        self.ledger.release(self.bytes)
        self.bytes = 0


class Ledger:
    """Host bytes a session's objects hold beyond its frames and replies (the data of queued and captured
    host-to-device copies, captured graphs), counted against the transport's buffer limits for as long as the
    objects live: a tab on an object is settled when the object is collected, which CPython does the moment the
    last queue, graph or handle lets go of it. Without buffers (direct mode: the bytes are the process's own)
    nothing is counted."""

    def __init__(self, buffers: Buffers | None = None) -> None:
        self.buffers = buffers
        self.held = 0
        self.closed = False

    def tab(self, obj: object) -> Tab:
        tab = Tab(self)
        if self.buffers is not None:
            weakref.finalize(obj, tab.settle)
        return tab

    def charge(self, n: int, what: str) -> None:
        if self.buffers is None or self.closed:
            return
        self.buffers.check(n, what)
        self.buffers.add(n)
        self.held += n

    def release(self, n: int) -> None:
        if self.buffers is None or self.closed:
            return
        self.held -= n
        self.buffers.add(-n)

    def close(self) -> None:
        """The session ended: what its objects still hold stops counting now, not when they are collected."""
        if not self.closed and self.buffers is not None:
            self.buffers.add(-self.held)
        self.held, self.closed = 0, True


class Backlog:
    """Entries a session has queued on the engine, at most `limit`. The engine pops them without telling the
    session, so the figure kept is an upper bound, recounted (O(the session's streams)) only when it would refuse:
    a session that keeps its queues short pays one addition per record."""

    def __init__(self, count: Callable[[], int], limit: int = QUEUED_TASKS) -> None:
        self.count = count
        self.limit = limit
        self.queued = 0

    def admit(self, n: int, what: str) -> None:
        if self.queued + n > self.limit:
            self.queued = self.count()
            if self.queued + n > self.limit:
                raise TooMany(
                    f"{what}: {n} more task(s) would take this process past {self.limit} queued on the device "
                    f"({self.queued} are); synchronize a stream before queuing more",
                    AclError.RT_STREAM_TASK_FULL,
                )
        self.queued += n


CUBE_CORE, VECTOR_CORE = 0, 1  # aclrtDevResLimitType


class CoreLimits:
    def __init__(self, chip: ChipProfile) -> None:
        self.cores = {CUBE_CORE: chip.ai_cores, VECTOR_CORE: chip.vector_cores}
        self.device: dict[int, int] = {}  # the process's limits, by kind
        self.own: dict[Stream, dict[int, int]] = {}  # each stream's own limits, by kind

    def set_stream(self, stream: Stream, kind: int, value: int) -> None:
        self.own.setdefault(stream, {})[self._check(kind, value)] = value
        self.apply(stream)

    def get_stream(self, stream: Stream, kind: int) -> int:
        self._check(kind)
        return self.own.get(stream, {}).get(kind) or self.get_device(kind)

    def set_device(self, kind: int, value: int, streams: list[Stream]) -> None:
        self.device[self._check(kind, value)] = value
        for stream in streams:
            self.apply(stream)

    def get_device(self, kind: int) -> int:
        return self.device.get(self._check(kind), self.cores[kind])

    def apply(self, stream: Stream) -> None:
        """Write the stream's limits where the engine reads them (None: the whole chip)."""
        own = self.own.get(stream, {})
        stream.cube_limit = own.get(CUBE_CORE) or self.device.get(CUBE_CORE)
        stream.vector_limit = own.get(VECTOR_CORE) or self.device.get(VECTOR_CORE)

    def forget(self, stream: Stream) -> None:
        self.own.pop(stream, None)

    def _check(self, kind: int, value: int | None = None) -> int:
        if kind not in self.cores:
            raise InvalidParam(
                f"resource limit type {kind} is not an aclrtDevResLimitType "
                f"(ACL_RT_DEV_RES_CUBE_CORE = {CUBE_CORE}, ACL_RT_DEV_RES_VECTOR_CORE = {VECTOR_CORE})"
            )
        if value is not None and not 1 <= value <= self.cores[kind]:
            what = "cube" if kind == CUBE_CORE else "vector"
            raise InvalidParam(f"{what} core limit {value} is out of range: this chip has 1-{self.cores[kind]}")
        return kind
