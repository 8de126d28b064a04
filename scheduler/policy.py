"""Dispatch policies: which ready task heads start now, and on how many AI cores.

A policy is pure logic: it sees the ready heads and what is running, and returns decisions. It never sees
time sources, transports or threads, so the daemon, a simulator and a test drive it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from npu.profiles import ChipProfile
from scheduler.stream import TaskEntry


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start `entry` now, on at most this many cube and vector cores (a stream core limit, Ascend's lever)."""

    entry: TaskEntry
    cube: int
    vector: int


class Policy(Protocol):
    name: str

    def select(self, ready: list[TaskEntry], running: list[TaskEntry], chip: ChipProfile) -> list[Dispatch]:
        """Which of `ready` (one head per idle stream) to hand to the chip now, in that order, and with what
        core limits. Handed over, a task's blocks take cores as they free up, in start order."""
        ...


class Fifo:
    """Passthrough: arrival order, every task may use the whole chip — and waits behind earlier ones."""

    name = "fifo"

    def select(self, ready, running, chip):
        return [Dispatch(e, chip.ai_cores, chip.vector_cores) for e in sorted(ready, key=lambda e: e.arrival)]


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Fifo,)}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r} (have {', '.join(POLICIES)})") from None
