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

    def rates(self, running: list[tuple[Task, int]]) -> list[float]:
        """Progress per modeled second (1.0 = the whole task) of tasks running together, each with the
        number of AI cores its policy allows."""
        ...
