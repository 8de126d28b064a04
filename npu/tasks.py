"""Work a physical NPU executes: copies, fills and (from npu.emulated.ops) kernels.

A task names its operands as physical Regions (virtual addresses were resolved by the translator), knows its
cost for the timing model, and computes its numerics in run(). Tasks run in stream order, so run() may read
what earlier tasks on the same stream wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from npu.memory import Region


@dataclass(frozen=True, slots=True)
class Cost:
    """What a task asks of the chip: cube FLOPs, HBM bytes moved, host-link bytes moved."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    link_bytes: float = 0.0


class Task(Protocol):
    name: str

    def cost(self) -> Cost: ...

    def run(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HostToDevice:
    dst: Region
    data: bytes
    name: str = "memcpy_h2d"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=self.dst.size, link_bytes=self.dst.size)

    def run(self) -> None:
        self.dst.write(self.data)


@dataclass(frozen=True, slots=True)
class DeviceToHost:
    """The bytes go to `deliver` when the task runs; the transport hands them to the client at its next sync."""

    src: Region
    deliver: Callable[[bytes], None]
    name: str = "memcpy_d2h"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=self.src.size, link_bytes=self.src.size)

    def run(self) -> None:
        self.deliver(self.src.read())


@dataclass(frozen=True, slots=True)
class DeviceToDevice:
    dst: Region
    src: Region
    name: str = "memcpy_d2d"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=2 * self.dst.size)

    def run(self) -> None:
        src, dst = self.src.view(), self.dst.view()
        if dst is not None:
            dst[:] = 0 if src is None else src


@dataclass(frozen=True, slots=True)
class Fill:
    dst: Region
    value: int
    name: str = "memset"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=self.dst.size)

    def run(self) -> None:
        view = self.dst.view()
        if view is not None:
            view.fill(self.value)
