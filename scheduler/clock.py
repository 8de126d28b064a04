"""Modeled time. A real clock paces modeled time against the wall clock by `time_scale` (wall seconds per
modeled second; 1.0 is real time); a virtual clock has no wall clock at all and jumps to the next event."""

from __future__ import annotations

import time


class RealClock:
    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0 for a real clock, got {time_scale}")
        self.time_scale = time_scale
        self._origin = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._origin) / self.time_scale

    def until(self, t: float) -> float:
        """Wall seconds to wait until modeled time `t`."""
        return max(0.0, (t - self.now()) * self.time_scale)


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def until(self, t: float) -> float:
        self.t = max(self.t, t)
        return 0.0


def make_clock(time_scale: float) -> RealClock | VirtualClock:
    """time_scale 0 means no clock: run modeled time as fast as the work allows."""
    return VirtualClock() if time_scale == 0 else RealClock(time_scale)
