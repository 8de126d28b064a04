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


class Policy(Protocol):
    name: str

    def select(self, ready: list[TaskEntry], running: list[TaskEntry], chip: ChipProfile, now: float) -> list[Dispatch]:
        """Which of `ready` (one head per idle stream) to hand to the chip now, in that order, and with what
        core limits. Handed over, a task's blocks take cores as they free up, in start order."""
        ...

    def drained(self, stream: Stream, now: float) -> None:
        """`stream` ran out of queued work at `now` (a step's end, for a serving engine)."""
        ...

    def status(self) -> dict:
        """What `vdevctl ls` shows of the policy's state."""
        ...


@dataclass
class Cores:
    """Cores held on a chip, per phase: each running kernel holds its block count of its kind's cores."""

    chip: ChipProfile
    held: dict[Phase, list[int]]

    @classmethod
    def of(cls, running: list[TaskEntry], chip: ChipProfile) -> Cores:
        held = {phase: [0, 0] for phase in Phase}
        for entry in running:
            assert entry.job is not None and entry.task is not None
            cube, vector = entry.task.cost().needs
            held[entry.phase][0] += cube * entry.job.blocks
            held[entry.phase][1] += vector * entry.job.blocks
        return cls(chip, held)

    def used(self, phases: tuple[Phase, ...] = tuple(Phase)) -> tuple[int, int]:
        return sum(self.held[p][0] for p in phases), sum(self.held[p][1] for p in phases)

    def fits(self, entry: TaskEntry, cube: int, vector: int, phases: tuple[Phase, ...], cap: tuple[int, int]) -> bool:
        """Whether `entry`, launched with these limits, has every block on a free core at once, the cores of
        `phases` staying within `cap` (cube, vector)."""
        assert entry.task is not None
        cost = entry.task.cost()
        blocks = cost.block_dim(cube, vector)
        need_c, need_v = cost.needs
        used_c, used_v = self.used(phases)
        all_c, all_v = self.used()
        return (
            used_c + need_c * blocks <= cap[0]
            and used_v + need_v * blocks <= cap[1]
            and all_c + need_c * blocks <= self.chip.ai_cores
            and all_v + need_v * blocks <= self.chip.vector_cores
        )

    def take(self, entry: TaskEntry, cube: int, vector: int) -> None:
        """Count `entry`'s blocks as held (it was just dispatched with these limits)."""
        assert entry.task is not None
        cost = entry.task.cost()
        blocks = cost.block_dim(cube, vector)
        self.held[entry.phase][0] += cost.needs[0] * blocks
        self.held[entry.phase][1] += cost.needs[1] * blocks


class Quiet:
    """No-ops for the hooks a policy has no use for."""

    def drained(self, stream: Stream, now: float) -> None:
        pass

    def status(self) -> dict:
        return {}


class Fifo(Quiet):
    """Passthrough: arrival order, every task may use the whole chip — and waits behind earlier ones."""

    name = "fifo"

    def select(self, ready, running, chip, now):
        return [Dispatch(e, chip.ai_cores, chip.vector_cores) for e in sorted(ready, key=lambda e: e.arrival)]
