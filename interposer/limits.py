"""Core limits a client sets, as CANN defines them (aclrtSetStreamResLimit, aclrtSetDeviceResLimit,
aclrtGetStreamResLimit): a stream's limit is its own, else its process's device limit, else the whole chip. The
engine reads the result from each stream (Stream.cube_limit / vector_limit) as a ceiling no policy lifts.

A launch from a thread that called aclrtUseStreamResInCurrentThread takes that stream's limits instead of its
own stream's (the client names it in the launch record).
"""

from __future__ import annotations

from npu.errors import InvalidParam
from npu.profiles import ChipProfile
from scheduler.stream import Stream

CUBE_CORE, VECTOR_CORE = 0, 1  # aclrtDevResLimitType


class CoreLimits:
    def __init__(self, chip: ChipProfile) -> None:
        self.cores = {CUBE_CORE: chip.ai_cores, VECTOR_CORE: chip.vector_cores}
        self.device: dict[int, int] = {}  # the process's limits, by kind
        self.own: dict[Stream, dict[int, int]] = {}  # each stream's own limits, by kind

    def set_stream(self, stream: Stream, kind: int, value: int) -> None:
        self.own.setdefault(stream, {})[self._check(kind, value)] = value
        self.apply(stream)

    def get_stream(self, stream: Stream, kind: int) -> int:
        self._check(kind)
        return self.own.get(stream, {}).get(kind) or self.get_device(kind)

    def set_device(self, kind: int, value: int, streams: list[Stream]) -> None:
        self.device[self._check(kind, value)] = value
        for stream in streams:
            self.apply(stream)

    def get_device(self, kind: int) -> int:
        return self.device.get(self._check(kind), self.cores[kind])

    def apply(self, stream: Stream) -> None:
        """Write the stream's limits where the engine reads them (None: the whole chip)."""
        own = self.own.get(stream, {})
        stream.cube_limit = own.get(CUBE_CORE) or self.device.get(CUBE_CORE)
        stream.vector_limit = own.get(VECTOR_CORE) or self.device.get(VECTOR_CORE)

    def forget(self, stream: Stream) -> None:
        self.own.pop(stream, None)

    def _check(self, kind: int, value: int | None = None) -> int:
        if kind not in self.cores:
            raise InvalidParam(
                f"resource limit type {kind} is not an aclrtDevResLimitType "
                f"(ACL_RT_DEV_RES_CUBE_CORE = {CUBE_CORE}, ACL_RT_DEV_RES_VECTOR_CORE = {VECTOR_CORE})"
            )
        if value is not None and not 1 <= value <= self.cores[kind]:
            what = "cube" if kind == CUBE_CORE else "vector"
            raise InvalidParam(f"{what} core limit {value} is out of range: this chip has 1-{self.cores[kind]}")
        return kind
