"""Dispatch policies: which ready task heads start now, and on how many AI cores.

A policy is pure logic: it sees the ready heads, what is running and the modeled time, and returns decisions.
It never sees time sources, transports or threads, so the daemon, the simulator and a test drive it alike.
Its lever is Ascend's own: a core limit per launch (what `aclrtSetStreamResLimit` sets, and what the pyacl
backend applies on real hardware). A kernel launches with one block per core it may use (at most its tiles),
and a block holds its core until it is done: so a policy that wants a kernel to start at once dispatches it
only when all of its blocks fit on free cores (Cores.claim), or the kernel's blocks would wait on the chip
behind earlier ones — the head-of-line blocking that fifo shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from npu.profiles import ChipProfile
from scheduler.stream import Phase, Stream, TaskEntry, ceiling


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
    """Cores held on a chip by each side — decode, and everything else (prefill and unknown phases) — counting
    each running kernel's blocks times the cores one block holds."""

    __slots__ = ("chip", "decode", "rest")

    def __init__(self, chip: ChipProfile, decode: list[int], rest: list[int]) -> None:
        self.chip = chip
        self.decode = decode  # [cube, vector]
        self.rest = rest

    @classmethod
    def of(cls, running: list[TaskEntry], chip: ChipProfile) -> Cores:
        decode, rest = [0, 0], [0, 0]
        for entry in running:
            cube, vector = entry.task.cost().needs
            blocks = entry.job.blocks
            side = decode if entry.phase is Phase.DECODE else rest
            side[0] += cube * blocks
            side[1] += vector * blocks
        return cls(chip, decode, rest)

    def claim(self, entry: TaskEntry, cube: int, vector: int, cap: tuple[int, int]) -> bool:
        """If `entry`, launched with these limits, has every block on a free core at once, its side staying within
        `cap` (cube, vector): count its blocks as held and say yes. A copy holds no core: always yes. Its blocks
        are counted as the engine will launch them: within its client's limits and its virtual NPU's cap."""
        cost = entry.task.cost()
        most_cube, most_vector = ceiling(entry, self.chip)
        blocks = cost.block_dim(min(cube, most_cube), min(vector, most_vector))
        if not blocks:
            return True
        need_c, need_v = cost.needs
        need_c, need_v = need_c * blocks, need_v * blocks
        side = self.decode if entry.phase is Phase.DECODE else self.rest
        other = self.rest if side is self.decode else self.decode
        if (
            side[0] + need_c > cap[0]
            or side[1] + need_v > cap[1]
            or side[0] + other[0] + need_c > self.chip.ai_cores
            or side[1] + other[1] + need_v > self.chip.vector_cores
        ):
            return False
        side[0] += need_c
        side[1] += need_v
        return True


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
