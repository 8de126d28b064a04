"""Work a physical NPU executes: copies, fills and (from npu.emulated.ops) kernels.

A task names its operands as physical Regions (virtual addresses were resolved by the translator), knows its
cost for the timing model, and computes its numerics in run(). Tasks run in stream order, so run() may read
what earlier tasks on the same stream wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from npu.memory import Region


class Unit(StrEnum):
    """Which engine of the chip runs a task. On 910B-class chips an AI core is one cube core (AIC) paired with
    two vector cores (AIV); kernels are compiled for one of the kinds (Ascend C: KERNEL_TYPE_AIC_ONLY,
    AIV_ONLY, MIX_AIC_1_2)."""

    CUBE = "cube"  # cube cores only: matrix multiplies
    VECTOR = "vector"  # vector cores only: elementwise, norms, rotary, gathers
    MIX = "mix"  # one cube core and two vector cores per block: fused attention
    DMA = "dma"  # copy engines (host link, SDMA): copies and fills hold no AI core


@dataclass(frozen=True, slots=True)
class Cost:
    """What a task asks of the chip, as totals, and how it splits into blocks.

    A kernel cuts its work into `tiles` equal pieces and launches with a block dimension of at most that many
    blocks (and at most the cores its stream may use); each block runs ceil(tiles / blocks) tiles on one core,
    so a shape that does not divide evenly pays for its last, partial wave. `efficiency` is the fraction of a
    core's peak cube rate its tiles reach (tile shape, pipeline fill), from the op's calibrated cost function.
    """

    flops: float = 0.0  # cube FLOPs
    hbm_bytes: float = 0.0  # HBM bytes read plus written
    link_bytes: float = 0.0  # host-link bytes
    peer_bytes: float = 0.0  # bytes across the interconnect to another chip
    unit: Unit = Unit.VECTOR
    tiles: int = 1
    efficiency: float = 1.0
    launches: int = 1  # back-to-back launches of the same kernel on the same blocks (the simulator folds layers)

    def repeated(self, n: int) -> Cost:
        """`n` launches of this kernel, one after another on the same blocks: one task for the simulator."""
        return replace(
            self,
            flops=self.flops * n,
            hbm_bytes=self.hbm_bytes * n,
            link_bytes=self.link_bytes * n,
            peer_bytes=self.peer_bytes * n,
            launches=self.launches * n,
        )

    @property
    def needs(self) -> tuple[int, int]:
        """(cube, vector) cores one of its blocks holds."""
        return NEEDS[self.unit]

    def block_dim(self, cube_cores: int, vector_cores: int) -> int:
        """How many blocks it launches with when it may use this many cores (0 for a copy: it holds no core):
        at most its tiles, and persistent kernels launch at most one block per core they may use."""
        unit = self.unit
        if unit is Unit.DMA:
            return 0
        cap = (
            cube_cores
            if unit is Unit.CUBE
            else vector_cores
            if unit is Unit.VECTOR
            else min(cube_cores, vector_cores // 2)
        )
        return max(1, min(self.tiles, cap))


# Cores one block holds: (cube, vector).
NEEDS = {Unit.CUBE: (1, 0), Unit.VECTOR: (0, 1), Unit.MIX: (1, 2), Unit.DMA: (0, 0)}


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
        return Cost(hbm_bytes=self.dst.size, link_bytes=self.dst.size, unit=Unit.DMA)

    def run(self) -> None:
        self.dst.write(self.data)


@dataclass(frozen=True, slots=True)
class DeviceToHost:
    """`deliver` gets the source region when the task runs: an asynchronous copy takes its bytes for the
    client's next sync, a blocking one answers from the region itself (its client waits, nothing changes it)."""

    src: Region
    deliver: Callable[[Region], None]
    name: str = "memcpy_d2h"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=self.src.size, link_bytes=self.src.size, unit=Unit.DMA)

    def run(self) -> None:
        self.deliver(self.src)


@dataclass(frozen=True, slots=True)
class DeviceToDevice:
    dst: Region
    src: Region
    name: str = "memcpy_d2d"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=2 * self.dst.size, unit=Unit.DMA)

    def run(self) -> None:
        src, dst = self.src.view(), self.dst.view()
        if dst is not None:
            dst[:] = 0 if src is None else src


@dataclass(frozen=True, slots=True)
class PeerCopy(DeviceToDevice):
    """A copy between this chip's memory and another chip's (IPC memory imported with peer access): the bytes
    cross the interconnect; this chip's copy engines move them, reading or writing its HBM once."""

    name: str = "memcpy_peer"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=self.dst.size, peer_bytes=self.dst.size, unit=Unit.DMA)


@dataclass(frozen=True, slots=True)
class Fill:
    dst: Region
    value: int
    name: str = "memset"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=self.dst.size, unit=Unit.DMA)

    def run(self) -> None:
        view = self.dst.view()
        if view is not None:
            view.fill(self.value)
