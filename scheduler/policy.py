"""Dispatch policies: which ready task heads start now, and on how many AI cores.

A policy is pure logic: it sees the ready heads, what is running and the modeled time, and returns decisions.
It never sees time sources, transports or threads, so the daemon, the simulator and a test drive it alike.
Its lever is Ascend's own: a core limit per launch (what `aclrtSetStreamResLimit` sets, and what the pyacl
backend applies on real hardware). A kernel launches with one block per core it may use (at most its tiles),
and a block holds its core until it is done: so a policy that wants a kernel to start at once dispatches it
only when all of its blocks fit on free cores (Cores.fits), or the kernel's blocks would wait on the chip
behind earlier ones — the head-of-line blocking that fifo shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from npu.profiles import ChipProfile
from scheduler.stream import Phase, Stream, TaskEntry


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start `entry` now, on at most this many cube and vector cores (a stream core limit, Ascend's lever)."""

    entry: TaskEntry
    cube: int
    vector: int


ALL = tuple(Phase)


class Policy(Protocol):
    name: str

    def select(self, ready: list[TaskEntry], running: list[TaskEntry], chip: ChipProfile, now: float) -> list[Dispatch]:
        """Which of `ready` (one head per idle stream) to hand to the chip now, in that order, and with what
        core limits. Handed over, a task's blocks take cores as they free up, in start order."""
        ...

    def check(self, chip: ChipProfile) -> None:
        """Raise ValueError if the policy's options cannot work on `chip` (before it is put in charge of one)."""
        ...

    def drained(self, stream: Stream, now: float) -> None:
        """`stream` ran out of queued work at `now` (a step's end, for a serving engine)."""
        ...

    def status(self) -> dict:
        """What `vdevctl ls` shows of the policy's state."""
        ...


class Cores:
    """Cores held on a chip, per phase: each running kernel holds its block count of its kind's cores."""

    __slots__ = ("chip", "held")

    def __init__(self, chip: ChipProfile, held: dict[Phase, list[int]]) -> None:
        self.chip = chip
        self.held = held

    @classmethod
    def of(cls, running: list[TaskEntry], chip: ChipProfile) -> Cores:
        held = {phase: [0, 0] for phase in Phase}
        for entry in running:
            cube, vector = entry.task.cost().needs
            blocks = entry.job.blocks
            counts = held[entry.phase]
            counts[0] += cube * blocks
            counts[1] += vector * blocks
        return cls(chip, held)

    def used(self, phases: tuple[Phase, ...] = ALL) -> tuple[int, int]:
        cube = vector = 0
        for phase in phases:
            c, v = self.held[phase]
            cube += c
            vector += v
        return cube, vector

    def fits(self, entry: TaskEntry, cube: int, vector: int, phases: tuple[Phase, ...], cap: tuple[int, int]) -> bool:
        """Whether `entry`, launched with these limits, has every block on a free core at once, the cores of
        `phases` staying within `cap` (cube, vector)."""
        cost = entry.task.cost()
        blocks = cost.block_dim(cube, vector)
        if not blocks:
            return True  # a copy holds no core
        need_c, need_v = cost.needs
        need_c, need_v = need_c * blocks, need_v * blocks
        used_c, used_v = self.used(phases)
        all_c, all_v = self.used()
        return (
            used_c + need_c <= cap[0]
            and used_v + need_v <= cap[1]
            and all_c + need_c <= self.chip.ai_cores
            and all_v + need_v <= self.chip.vector_cores
        )

    def take(self, entry: TaskEntry, cube: int, vector: int) -> None:
        """Count `entry`'s blocks as held (it was just dispatched with these limits)."""
        cost = entry.task.cost()
        blocks = cost.block_dim(cube, vector)
        counts = self.held[entry.phase]
        counts[0] += cost.needs[0] * blocks
        counts[1] += cost.needs[1] * blocks


class Quiet:
    """No-ops for the hooks a policy has no use for."""

    def check(self, chip: ChipProfile) -> None:
        pass

    def drained(self, stream: Stream, now: float) -> None:
        pass

    def status(self) -> dict:
        return {}


class Fifo(Quiet):
    """Passthrough: arrival order, every task may use the whole chip — and waits behind earlier ones."""

    name = "fifo"

    def select(self, ready, running, chip, now):
        return [Dispatch(e, chip.ai_cores, chip.vector_cores) for e in sorted(ready, key=lambda e: e.arrival)]
