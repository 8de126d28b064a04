"""What the engine needs of a physical NPU, whatever backs it: an Executor starts tasks on the cores a policy
allows and reports when they complete, in modeled time.

The engine (scheduler/) keeps the queues, events and the policy; it hands a task over as a Job once the
task heads its stream and the policy chose to dispatch it, with the core limits the policy decided (the same
lever as `aclrtSetStreamResLimit`). From then on the task is the chip's: its blocks take cores as they free
up, in the order jobs were started, and nothing can pull it back — as with a task already sent to a real
device's queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from npu.errors import FlexNPUError
from npu.memory import DeviceMemory
from npu.profiles import ChipProfile
from npu.tasks import Task


@dataclass(eq=False, slots=True)
class Job:
    """One task on the chip. `owner` is the engine's own record of it, carried through untouched."""

    task: Task
    cube_limit: int  # at most this many cube cores (and its blocks at most this many)
    vector_limit: int  # at most this many vector cores
    owner: object = None
    started_at: float = 0.0
    finished_at: float = 0.0
    blocks: int = 0  # the block dimension it launched with (0: a copy, no AI core)
    failure: FlexNPUError | None = None  # the task failed on the device; it completes at once
    # AI-core seconds its blocks held (cube cores; a vector-only kernel's vector cores count as the AI cores
    # they are part of): utilisation per tenant and per phase, from the executor's own placement of blocks.
    core_s: float = 0.0


class Executor(Protocol):
    name: str
    profile: ChipProfile
    mode: str  # "numeric" or "timing"
    memory: DeviceMemory

    def start(self, job: Job, t: float) -> None:
        """Hand `job` to the chip at modeled time `t` (not before the last advance)."""
        ...

    def next_event(self) -> float | None:
        """Modeled time of the next change on the chip (blocks finishing) at the current sharing; None when
        nothing runs. The engine advances to it and dispatches again: freed cores may take new work."""
        ...

    def advance(self, t: float) -> list[Job]:
        """Move modeled time to `t`; return the jobs that completed by then, in completion order."""
        ...

    @property
    def busy(self) -> bool:
        """Whether any job is on the chip."""
        ...
