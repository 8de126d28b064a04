"""Streams, events and the entries queued on streams.

A stream runs its entries in order; streams run concurrently. Events order work across streams: a record
completes when everything queued before it on its stream has, a wait holds its stream until the record it
was queued after (the event's latest record at the time of the wait) has completed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from npu.errors import FlexNPUError
from npu.executor import Job
from npu.profiles import ChipProfile
from npu.tasks import Task


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    UNKNOWN = "unknown"


class PhaseSource(StrEnum):
    """Where a stream's phase came from, strongest first (scheduler/phase.py)."""

    ROLE = "role"  # the virtual NPU's role in the config
    CLIENT = "client"  # the client declared it (FLEXNPU_PHASE, in HELLO)
    OPERATOR = "operator"  # inferred: the stream ran a prefill or decode attention operator
    INTENSITY = "intensity"  # inferred: its kernels' FLOPs per HBM byte against the chip's ridge point
    NONE = "none"


@dataclass(frozen=True, slots=True)
class AsyncFailure:
    """A failed asynchronous record, kept on its stream until a synchronisation reports it."""

    seq: int
    error: FlexNPUError


@dataclass(eq=False)
class Event:
    recorded: int = 0  # records submitted so far
    completed: int = 0  # records completed so far
    timestamp: float | None = None  # modeled time the latest completed record completed
    waiters: list[Stream] | None = None  # streams whose head waits on it (the engine's business)


@dataclass(eq=False, slots=True)
class Tenant:
    """The virtual NPU a stream belongs to, as the engine sees it: a core cap that every policy obeys (compute
    isolation that holds whatever the policy decides), and what its kernels used."""

    cores: int | None = None  # cube cores every kernel may use at most (vector: in the chip's proportion)
    kernels: int = 0  # kernels finished
    core_s: float = 0.0  # AI-core seconds (modeled) they held


@dataclass(eq=False)
class Stream:
    phase: Phase = Phase.UNKNOWN
    phase_from: PhaseSource = PhaseSource.NONE
    queue: deque[Entry] = field(default_factory=deque)
    running: TaskEntry | None = None
    failure: AsyncFailure | None = None  # sticky: later tasks on the stream are skipped until it is taken
    completed: int = 0  # entries completed, shown per session by vdevctl ls --json
    # Core limits its client set (aclrtSetStreamResLimit, or the process's aclrtSetDeviceResLimit); None: the
    # whole chip. A ceiling for every policy.
    cube_limit: int | None = None
    vector_limit: int | None = None
    tenant: Tenant = field(default_factory=Tenant)  # its virtual NPU's (one of its own for a bare engine)
    # Kernel FLOPs and HBM bytes it queued, for phase inference by arithmetic intensity.
    flops: float = 0.0
    hbm_bytes: float = 0.0
    kernels: int = 0

    @property
    def idle(self) -> bool:
        return not self.queue

    def take_failure(self) -> AsyncFailure | None:
        failure, self.failure = self.failure, None
        return failure


@dataclass(eq=False, slots=True)
class Entry:
    stream: Stream
    seq: int  # the client's record sequence number, to name it in errors
    arrival: int = -1  # engine-wide arrival order, set on submit


@dataclass(eq=False, slots=True)
class TaskEntry(Entry):
    task: Task | None = None
    phase: Phase = Phase.UNKNOWN  # its stream's phase when it was queued: what policies plan with
    limits: Stream | None = None  # the stream whose core limits apply, if not its own (a thread's res stream)
    job: Job | None = None  # once handed to the chip: its core limits, start and finish times


def ceiling(entry: TaskEntry, chip: ChipProfile) -> tuple[int, int]:
    """The most (cube, vector) cores `entry` may launch on whatever a policy decides: its client's core limits and
    its virtual NPU's cap (vector cores in the chip's proportion)."""
    holder, cap = entry.limits or entry.stream, entry.stream.tenant.cores
    if cap is None and holder.cube_limit is None and holder.vector_limit is None:  # the common case, per dispatch
        return chip.ai_cores, chip.vector_cores
    cap = cap or chip.ai_cores
    return (
        min(holder.cube_limit or chip.ai_cores, cap),
        min(holder.vector_limit or chip.vector_cores, cap * chip.vector_cores // chip.ai_cores),
    )


@dataclass(eq=False, slots=True)
class RecordEntry(Entry):
    event: Event | None = None
    generation: int = 0


@dataclass(eq=False, slots=True)
class WaitEntry(Entry):
    event: Event | None = None
    generation: int = 0  # the record this wait is ordered after; 0: the event was never recorded

    @property
    def satisfied(self) -> bool:
        assert self.event is not None
        return self.event.completed >= self.generation


@dataclass(eq=False, slots=True)
class FailEntry(Entry):
    """A record the translator rejected, queued so that its error surfaces in stream order."""

    error: FlexNPUError | None = None
