"""Drivers of an Engine: one trio task per physical NPU in the daemon, the calling thread in direct mode.

Both offer the same two things to the translator: `submit(entry)` and a way to wait until a condition on the
engine holds (a stream drained, an event completed). The translator returns such conditions as data; the
transport picks the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from npu.errors import AclError, FlexNPUError
from scheduler.clock import RealClock, VirtualClock
from scheduler.engine import Engine
from scheduler.policy import Policy
from scheduler.stream import Entry

BURST_S = 0.005


class Stalled(FlexNPUError):
    """A synchronisation that can never finish."""

    code = AclError.RT_STREAM_SYNC_TIMEOUT

    def __init__(self) -> None:
        super().__init__(
            "synchronisation can never finish: its stream waits on an event that no queued work will record "
            "(check the order of record_event and stream_wait_event)"
        )


class Runner:
    """An engine plus its clock. Driving is the subclasses' business."""

    def __init__(self, engine: Engine, clock: RealClock | VirtualClock) -> None:
        self.engine = engine
        self.clock = clock

    def submit(self, entry: Entry) -> None:
        self.engine.submit(entry, self.clock.now())
        self._kick()

    def submit_all(self, entries: list[Entry]) -> None:
        self.engine.submit_all(entries, self.clock.now())
        self._kick()

    def now(self) -> float:
        return self.clock.now()

    def catch_up(self) -> None:
        """Process what is due by now (before answering a query about the engine's state)."""
        self.engine.advance(self.clock.now())

    def set_policy(self, policy: Policy) -> None:
        """Switch the engine's policy now; ValueError, and nothing changed, if it cannot work on this chip."""
        policy.check(self.engine.npu.profile)  # before the engine moves
        self.engine.advance(self.clock.now())  # the new policy's first dispatch is at the present
        self.engine.set_policy(policy)
        self._kick()  # the daemon's driver re-plans its wait: the new policy may have started work

    def _kick(self) -> None:
        pass


class SyncRunner(Runner):
    """Direct mode: nothing runs until the caller waits, and then the engine catches up in modeled time."""

    def wait_until(self, done: Callable[[], bool]) -> None:
        while True:
            nxt = self.engine.advance(self.clock.now())
            if done():
                return
            if nxt is None:
                raise Stalled()
            wait = self.clock.until(nxt)
            if wait > 0:  # a virtual clock jumps instead; sleep(0) would still yield the CPU
                time.sleep(wait)


class TrioRunner(Runner):
    """The daemon: a task advances the engine at each completion and wakes whoever waits on it."""

    def __init__(self, engine: Engine, clock: RealClock | VirtualClock) -> None:
        super().__init__(engine, clock)
        self._wakeup = trio.Event()  # set when work arrives
        self._changed = trio.Event()  # set when the engine advanced

    def _kick(self) -> None:
        self._wakeup.set()

    def submit(self, entry: Entry) -> None:
        self.engine.submit(entry, self._present())
        self._kick()

    def submit_all(self, entries: list[Entry]) -> None:
        self.engine.submit_all(entries, self._present())
        self._kick()

    def catch_up(self) -> None:
        self._present()

    def _present(self) -> float:
        """Now, as far as the engine catches up within a burst. An engine that has fallen behind the wall clock
        (a tenant's flood of tiny tasks costs more of our time than of the chip's) takes new work at its own
        present instead of first working off the backlog in the caller's turn: others' calls are not held up,
        and their work runs beside the flood, as on a chip, not after it."""
        now = self.clock.now()
        nxt = self.engine.advance(now, time.monotonic() + BURST_S)
        return now if nxt is None or nxt > now else self.engine.t

    async def run(self) -> None:
        while True:
            nxt = self._advance()
            self._changed.set()
            self._changed = trio.Event()
            self._wakeup = trio.Event()
            if nxt is None:
                await self._wakeup.wait()
                continue
            wait = self.clock.until(nxt)
            if wait > 0:
                with trio.move_on_after(wait):
                    await self._wakeup.wait()
            else:
                await trio.lowlevel.checkpoint()  # let clients in between bursts

    def _advance(self) -> float | None:
        """Advance to now, in a burst of at most BURST_S of our time: with no wall clock, run on through
        completions that are due at once instead of a scheduler pass per completion; with one, stop there even
        if the engine has fallen behind (one tenant's flood of tiny tasks), so other sessions get in between."""
        deadline = time.monotonic() + BURST_S
        nxt = self.engine.advance(self.clock.now(), deadline)
        while nxt is not None and self.clock.until(nxt) == 0 and time.monotonic() < deadline:
            nxt = self.engine.advance(self.clock.now(), deadline)
        return nxt

    async def wait_until(self, done: Callable[[], bool]) -> None:
        self._kick()  # once: the driver then advances at each event, and a kick per pass would spin it
        while not done():
            await self._changed.wait()
            if not done() and not self.engine.running:
                # The engine just advanced and nothing runs: what is queued waits on events that no queued
                # work will record (events belong to one session, and that session is here, waiting).
                raise Stalled()
