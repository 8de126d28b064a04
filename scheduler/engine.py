"""The engine of one physical NPU: stream queues in, tasks through the policy onto the chip, completions out.

It is a synchronous state machine over modeled time. `advance(now)` replays every event up to `now` at the
modeled time it happens, so the schedule does not depend on how late a driver calls it; it returns the
modeled time of the next event for the driver to wait for. The chip itself is an Executor (npu/executor.py):
the engine decides what to hand it, and when; the executor decides how long it takes. The daemon drives it
from a trio task in real time, direct mode and simulations from the calling thread, tests step by step.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import structlog

from npu.executor import Executor, Job
from scheduler import phase
from scheduler.policy import Policy
from scheduler.stream import (
    AsyncFailure,
    Entry,
    FailEntry,
    Phase,
    RecordEntry,
    Stream,
    TaskEntry,
    WaitEntry,
    ceiling,
)

log = structlog.get_logger()


class Engine:
    def __init__(self, npu: Executor, policy: Policy) -> None:
        policy.check(npu.profile)
        self.npu = npu
        self.policy = policy
        self.t = 0.0  # modeled time everything has been processed up to
        self.streams: dict[Stream, None] = {}  # insertion-ordered: dispatch order never depends on hashes
        # Streams with queued work, less those whose head waits on an event (parked on it until its record
        # completes): a dispatch pass costs the streams that can move, not every stream of every session.
        self.busy: dict[Stream, None] = {}
        self.running: list[TaskEntry] = []  # tasks handed to the chip, in start order
        self._arrivals = itertools.count()
        # (phase, start, finish, cube cores, vector cores) of every finished kernel, when someone wants a timeline
        self.trace: list[tuple] | None = None
        self.core_s = dict.fromkeys(Phase, 0.0)  # AI-core seconds finished kernels held, by their phase

    def set_policy(self, policy: Policy) -> None:
        """Switch policies at run time: queued work stays queued, in order; what runs finishes as it started.
        A policy that cannot work on this chip raises ValueError and changes nothing."""
        policy.check(self.npu.profile)
        self.policy = policy
        self._dispatch()

    # -- what the translator calls -------------------------------------------------------------------------

    def add_stream(self, stream: Stream) -> None:
        self.streams[stream] = None

    def remove_stream(self, stream: Stream) -> None:
        """Drop a stream and what is still queued on it (its owner is gone or destroyed it). A task already on
        the chip runs to its end, as on hardware; its completion is then ignored."""
        self.streams.pop(stream, None)
        self.busy.pop(stream, None)
        stream.queue.clear()

    def submit(self, entry: Entry, now: float) -> None:
        self.submit_all((entry,), now)

    def submit_all(self, entries: Iterable[Entry], now: float) -> None:
        """Queue entries at modeled time `now`, in order (a graph replay queues its tasks at once)."""
        self.advance(now)
        entries = list(entries)
        chip = self.npu.profile
        for entry in entries:  # a graph replay's step is tagged by all of its tasks
            if isinstance(entry, TaskEntry):
                phase.observe(entry.stream, entry.task, chip)
        for entry in entries:
            entry.arrival = next(self._arrivals)
            if isinstance(entry, TaskEntry):
                entry.phase = entry.stream.phase
            entry.stream.queue.append(entry)
            self.busy[entry.stream] = None
        self._dispatch()

    @property
    def queued(self) -> int:
        return sum(len(s.queue) for s in self.streams)

    # -- what a driver calls ------------------------------------------------------------------------------

    def advance(self, now: float, deadline: float | None = None) -> float | None:
        """Process everything that happens up to modeled time `now`; return the time of the next event. With a
        `deadline` (time.monotonic()), stop once it has passed with events still due, and return the first of
        them (at or before `now`): the driver lets others in, then calls again, so no tenant's backlog holds
        the daemon for longer than that."""
        npu = self.npu
        while True:
            self._dispatch()
            nxt = npu.next_event()
            if nxt is None or nxt > now:
                break
            if deadline is not None and time.monotonic() > deadline:
                return nxt
            self.t = max(self.t, nxt)
            for job in npu.advance(self.t):
                self._finish(job.owner)
        if now > self.t:
            self.t = now
            for job in npu.advance(now):  # nothing is due before the next event; this only moves time
                self._finish(job.owner)
        return npu.next_event()

    # -- internals ----------------------------------------------------------------------------------------

    def _finish(self, entry: TaskEntry) -> None:
        job = entry.job
        job.owner = None  # entry and job point at each other: unlinked, a copy's bytes go when the entry does
        self.running.remove(entry)
        if self.trace is not None and job.blocks:
            cube, vector = job.task.cost().needs
            self.trace.append((entry.phase, job.started_at, job.finished_at, cube * job.blocks, vector * job.blocks))
        stream = entry.stream
        stream.running = None
        if job.blocks:
            stream.tenant.kernels += 1
            stream.tenant.core_s += job.core_s
            self.core_s[entry.phase] += job.core_s
        if entry.job.failure is not None:
            exc = entry.job.failure
            stream.failure = AsyncFailure(entry.seq, exc)
            log.info("async_task_failed", task=entry.job.task.name, seq=entry.seq, error=exc.message)
        if stream.queue and stream.queue[0] is entry:  # else the stream was removed while its task ran
            self._complete(entry)

    def _complete(self, entry: Entry) -> None:
        stream = entry.stream
        popped = stream.queue.popleft()
        assert popped is entry
        stream.completed += 1
        if not stream.queue:
            self.busy.pop(stream, None)
            self.policy.drained(stream, self.t)
        if isinstance(entry, RecordEntry):
            event = entry.event
            assert event is not None
            event.completed = max(event.completed, entry.generation)
            event.timestamp = self.t
            if event.waiters:  # their heads may move now
                for waiter in event.waiters:
                    self.busy[waiter] = None
                event.waiters = None

    def _dispatch(self) -> None:
        """Complete zero-time heads (records, satisfied waits, failures), then let the policy start tasks."""
        while True:
            ready: list[TaskEntry] = []
            progressed = False
            for stream in list(self.busy):
                if not stream.queue or stream not in self.streams:  # drained, or removed while parked
                    del self.busy[stream]
                    continue
                if stream.running is not None:
                    continue
                head = stream.queue[0]
                if isinstance(head, TaskEntry):
                    if stream.failure is None:
                        ready.append(head)
                        continue
                    # Sticky failure: skip the stream's tasks until a synchronisation reports it.
                elif isinstance(head, WaitEntry):
                    if not head.satisfied:
                        del self.busy[stream]  # parked until the record it waits for completes
                        event = head.event
                        event.waiters = event.waiters or []
                        event.waiters.append(stream)
                        continue
                elif isinstance(head, FailEntry):
                    assert head.error is not None
                    if stream.failure is None:
                        stream.failure = AsyncFailure(head.seq, head.error)
                self._complete(head)
                progressed = True
            if ready:
                progressed |= self._start(ready)
            if not progressed:
                return

    def _start(self, ready: list[TaskEntry]) -> bool:
        profile = self.npu.profile
        chosen = self.policy.select(ready, self.running, profile, self.t)
        for d in chosen:
            entry, stream = d.entry, d.entry.stream
            assert entry.task is not None
            # The limits its client and its virtual NPU set are ceilings no policy lifts.
            most_cube, most_vector = ceiling(entry, profile)
            cube, vector = min(d.cube, most_cube), min(d.vector, most_vector)
            entry.job = Job(entry.task, cube, vector, owner=entry)
            stream.running = entry
            self.running.append(entry)
            self.npu.start(entry.job, self.t)
        return bool(chosen)
