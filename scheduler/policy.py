"""Dispatch policies: which ready task heads start now, and on how many AI cores.

A policy is pure logic: it sees the ready heads and what is running, and returns decisions. It never sees
time sources, transports or threads, so the daemon, a simulator and a test drive it alike.
"""

from __future__ import annotations

from typing import Protocol

from scheduler.stream import TaskEntry


class Policy(Protocol):
    name: str

    def select(self, ready: list[TaskEntry], running: list[TaskEntry], total_cores: int) -> list[tuple[TaskEntry, int]]:
        """Which of `ready` (one head per idle stream) to start, each with its core count."""
        ...


class Fifo:
    """Passthrough: arrival order, every task may use the whole chip (concurrent tasks share it)."""

    name = "fifo"

    def select(self, ready, running, total_cores):
        return [(entry, total_cores) for entry in sorted(ready, key=lambda e: e.arrival)]


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Fifo,)}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r} (have {', '.join(POLICIES)})") from None
