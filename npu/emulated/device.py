"""One emulated Ascend NPU, an Executor: its memory, the numerics of its tasks, and its block-level timing."""

from __future__ import annotations

import structlog

from npu.emulated.timing import BlockTiming
from npu.errors import AclError, FlexNPUError
from npu.executor import Job
from npu.memory import DeviceMemory
from npu.profiles import ChipProfile

log = structlog.get_logger()

MODES = ("numeric", "timing")


class EmulatedNPU:
    def __init__(self, name: str, profile: ChipProfile, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.name = name
        self.profile = profile
        self.mode = mode
        self.memory = DeviceMemory(profile.memory_bytes, backed=mode == "numeric")
        self.timing = BlockTiming(profile)

    def start(self, job: Job, t: float) -> None:
        """Numerics run when the task starts: tasks of a stream start in order, and work on other streams that
        depends on this one waits for its completion through events. `t` is where the engine last advanced us."""
        task = job.task
        try:
            task.run()
        except Exception as exc:  # a failing kernel fails its stream, never the engine (nor the daemon)
            if not isinstance(exc, FlexNPUError):
                log.exception("kernel_crashed", task=task.name)
                exc = FlexNPUError(f"{task.name} failed on the device: {exc!r}", AclError.RT_AICORE_EXCEPTION)
            job.failure = exc
            self.timing.fail(job)
            return
        self.timing.start(job, task.cost())

    def next_event(self) -> float | None:
        return self.timing.next_event()

    def advance(self, t: float) -> list[Job]:
        return self.timing.advance(t)

    @property
    def busy(self) -> bool:
        return self.timing.busy
