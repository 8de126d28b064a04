"""One emulated Ascend NPU: its memory and its timing model."""

from __future__ import annotations

from npu.emulated import timing
from npu.memory import DeviceMemory
from npu.profiles import ChipProfile
from npu.tasks import Task

MODES = ("numeric", "timing")


class EmulatedNPU:
    def __init__(self, name: str, profile: ChipProfile, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.name = name
        self.profile = profile
        self.mode = mode
        self.memory = DeviceMemory(profile.memory_bytes, backed=mode == "numeric")

    def rates(self, running: list[tuple[Task, int]]) -> list[float]:
        return timing.rates(self.profile, [(task.cost(), cores) for task, cores in running])
