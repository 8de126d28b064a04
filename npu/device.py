"""What the scheduler needs of a physical NPU, whatever backs it."""

from __future__ import annotations

from typing import Protocol

from npu.memory import DeviceMemory
from npu.profiles import ChipProfile
from npu.tasks import Task


class PhysicalNPU(Protocol):
    name: str
    profile: ChipProfile
    mode: str  # "numeric" or "timing"
    memory: DeviceMemory

    def duration(self, task: Task, cores: int) -> float:
        """Modeled seconds `task` takes alone on `cores` AI cores."""
        ...
