"""The engine of one physical NPU: stream queues in, tasks through the policy onto the chip, completions out.

It is a synchronous state machine over modeled time. `advance(now)` replays every event up to `now` at the
modeled time it happens, so the schedule does not depend on how late a driver calls it; it returns the
modeled time of the next completion for the driver to wait for. The daemon drives it from a trio task in real
time, direct mode and simulations from the calling thread, tests step by step.
"""

from __future__ import annotations

import itertools

import structlog

from npu.device import PhysicalNPU
from npu.errors import AclError, FlexNPUError
from scheduler.policy import Policy
from scheduler.stream import (
    AsyncFailure,
    Entry,
    FailEntry,
    RecordEntry,
    Stream,
    TaskEntry,
    WaitEntry,
)

log = structlog.get_logger()

_EPS = 1e-12


class Engine:
    def __init__(self, npu: PhysicalNPU, policy: Policy) -> None:
        self.npu = npu
        self.policy = policy
        self.t = 0.0  # modeled time everything has been processed up to
        self.streams: set[Stream] = set()
        self.running: list[TaskEntry] = []
        self._arrivals = itertools.count()
        self._stale = False  # the running set changed since rates were computed
        self._due = 0.0  # the earliest completion at the current rates (valid while not stale)

    # -- what the translator calls -------------------------------------------------------------------------

    def add_stream(self, stream: Stream) -> None:
        self.streams.add(stream)

    def remove_stream(self, stream: Stream) -> None:
        """Drop a stream and everything still queued on it (its owner is gone or destroyed it)."""
        self.streams.discard(stream)
        if stream.running is not None:
            self.running.remove(stream.running)
            stream.running = None
            self._stale = True
        stream.queue.clear()

    def submit(self, entry: Entry, now: float) -> None:
        self.advance(now)
        entry.arrival = next(self._arrivals)
        entry.stream.queue.append(entry)
        self._dispatch()

    @property
    def queued(self) -> int:
        return sum(len(s.queue) for s in self.streams)

    # -- what a driver calls ------------------------------------------------------------------------------

    def advance(self, now: float) -> float | None:
        """Process everything that happens up to modeled time `now`; return the next completion time."""
        while True:
            self._dispatch()
            nxt = self._next_completion()
            if nxt is None or nxt > now:
                break
            self._progress(nxt)
        if now > self.t:
            self._progress(now)
        return self._next_completion()

    # -- internals ----------------------------------------------------------------------------------------

    def _next_completion(self) -> float | None:
        if not self.running:
            return None
        if self._stale:
            self._rerate()
        return self._due

    def _progress(self, t: float) -> None:
        if self._stale:
            self._rerate()
        dt = t - self.t
        self.t = t
        finished = []
        for entry in self.running:
            entry.remaining -= entry.rate * dt
            if entry.due <= t or entry.remaining <= _EPS * max(1.0, entry.rate):
                finished.append(entry)
        for entry in finished:
            self.running.remove(entry)
            entry.stream.running = None
            self._complete(entry)
        self._stale |= bool(finished)

    def _complete(self, entry: Entry) -> None:
        stream = entry.stream
        popped = stream.queue.popleft()
        assert popped is entry
        stream.completed += 1
        if isinstance(entry, RecordEntry):
            assert entry.event is not None
            entry.event.completed = max(entry.event.completed, entry.generation)
            entry.event.timestamp = self.t

    def _dispatch(self) -> None:
        """Complete zero-time heads (records, satisfied waits, failures), then let the policy start tasks."""
        while True:
            ready: list[TaskEntry] = []
            progressed = False
            for stream in self.streams:
                if stream.running is not None or not stream.queue:
                    continue
                head = stream.queue[0]
                if isinstance(head, TaskEntry):
                    if stream.failure is None:
                        ready.append(head)
                        continue
                    # Sticky failure: skip the stream's tasks until a synchronisation reports it.
                elif isinstance(head, WaitEntry):
                    if not head.satisfied:
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
        chosen = self.policy.select(ready, self.running, self.npu.profile.ai_cores)
        for entry, cores in chosen:
            assert entry.task is not None
            try:
                entry.task.run()
            except Exception as exc:  # a failing kernel fails its stream, never the engine (nor the daemon)
                if not isinstance(exc, FlexNPUError):
                    log.exception("kernel_crashed", task=entry.task.name, seq=entry.seq)
                    exc = FlexNPUError(f"{entry.task.name} failed on the device: {exc!r}", AclError.RT_AICORE_EXCEPTION)
                entry.stream.failure = AsyncFailure(entry.seq, exc)
                log.info("async_task_failed", task=entry.task.name, seq=entry.seq, error=exc.message)
                self._complete(entry)
                continue
            entry.cores = cores
            entry.started_at = self.t
            entry.stream.running = entry
            self.running.append(entry)
        self._stale |= bool(chosen)
        return bool(chosen)

    def _rerate(self) -> None:
        """Running tasks share the chip: every start or finish changes everyone's rate. Computed lazily, once
        per change of the running set, just before progress is measured."""
        self._stale = False
        if self.running:
            rates = self.npu.rates([(entry.task, entry.cores) for entry in self.running])
            for entry, rate in zip(self.running, rates, strict=True):
                entry.rate = rate
                entry.due = self.t + entry.remaining / rate  # unchanged by progress until the next rerate
            self._due = min(entry.due for entry in self.running)
