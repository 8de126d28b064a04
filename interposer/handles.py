"""Virtual objects: opaque typed handles per session, and device virtual addresses per virtual NPU.

A handle is 64 bits: a type tag (8), the session's tag (16) and a per-session sequence number (40). A destroyed
handle is never reused within its session, so use-after-destroy is reported as such instead of aliasing a
newer object. Session tags are unique among live sessions (SessionTags): a process's sessions on two devices
never hand out the same handle, however many sessions came and went before (the client routes each handle to
its device by its value). Device addresses live far above any host address (x86-64 and arm64 user space stay below
2**48), so the interposer can tell a device pointer from a host pointer for ACL_MEMCPY_DEFAULT.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from npu.errors import AclError, FlexNPUError, InvalidHandle, InvalidParam
from npu.memory import Buffer, Region

SEQ_BITS = 40
SESSION_BITS = 16

DEVICE_VA_BASE = 0x1000_0000_0000_0000
VA_SPAN_PER_VDEV = 1 << 52
VA_ALIGN = 1 << 16  # also leaves a guard gap after each allocation, so small overruns hit no neighbour
FREED_REMEMBERED = 4096
_MISSING = object()


class Kind(IntEnum):
    CONTEXT = 0xC1
    STREAM = 0xC2
    EVENT = 0xC3
    GRAPH = 0xC4
    TASK_GROUP = 0xC5


def is_device_address(ptr: int) -> bool:
    return ptr >= DEVICE_VA_BASE


class SessionTags:
    """The session field of handles: a tag no other live session holds (1 .. 2**SESSION_BITS - 1), handed out
    round-robin so a tag given back is the last to be reused. More live sessions than tags is an error."""

    def __init__(self, bits: int = SESSION_BITS) -> None:
        self.count = (1 << bits) - 1
        self._live: set[int] = set()
        self._next = 1

    def take(self) -> int:
        if len(self._live) >= self.count:
            raise FlexNPUError(
                f"{len(self._live)} sessions are open: every session tag of the handle format is taken; close "
                "sessions first",
                AclError.RT_OVER_LIMIT,
            )
        while True:
            tag, self._next = self._next, self._next % self.count + 1
            if tag not in self._live:
                self._live.add(tag)
                return tag

    def give_back(self, tag: int) -> None:
        self._live.discard(tag)

    def __len__(self) -> int:
        return len(self._live)


TAGS = SessionTags()  # one per process: every daemon session (and every direct-mode one) of this process


class HandleTable:
    def __init__(self, session_id: int) -> None:
        self.session_id = session_id & ((1 << SESSION_BITS) - 1)
        self._next = 1
        self._kinds: dict[Kind, dict[int, Any]] = {kind: {} for kind in Kind}  # live objects by kind, by handle

    def add(self, kind: Kind, obj: Any) -> int:
        handle = (kind << 56) | (self.session_id << SEQ_BITS) | self._next
        self._next += 1
        self._kinds[kind][handle] = obj
        return handle

    def get(self, handle: int, kind: Kind) -> Any:
        obj = self._kinds[kind].get(handle, _MISSING)
        if obj is _MISSING:
            raise InvalidHandle(self._explain(handle, kind))
        return obj

    def remove(self, handle: int, kind: Kind) -> Any:
        obj = self.get(handle, kind)
        del self._kinds[kind][handle]
        return obj

    def values(self, kind: Kind) -> list[Any]:
        return list(self._kinds[kind].values())

    def count(self, kind: Kind) -> int:
        return len(self._kinds[kind])

    def _explain(self, handle: int, kind: Kind) -> str:
        name = kind.name.lower()
        tag, session, seq = (
            handle >> 56,
            (handle >> SEQ_BITS) & ((1 << SESSION_BITS) - 1),
            handle & ((1 << SEQ_BITS) - 1),
        )
        if tag != kind:
            actual = Kind(tag).name.lower() if tag in Kind._value2member_map_ else "no"
            return f"{name} handle 0x{handle:x} is not a {name} (it is a {actual} handle)"
        if session != self.session_id:
            return f"{name} handle 0x{handle:x} belongs to another process's session, not this one"
        if 0 < seq < self._next:
            return f"{name} handle 0x{handle:x} was already destroyed"
        return f"{name} handle 0x{handle:x} was never created"


@dataclass(eq=False, slots=True)
class Allocation:
    start: int
    size: int  # what the caller asked for; accesses are checked against it
    buffer: Buffer
    owner: object  # the session (translator) that allocated it, or imported it
    offset: int = 0  # where in the buffer it starts (an import maps part of another's allocation)
    imported: object = None  # the IPC export it maps, if imported


class AddressSpace:
    """Device virtual addresses of one virtual NPU. Addresses are handed out once and never reused."""

    def __init__(self, index: int, name: str) -> None:
        self.name = name
        self._base = DEVICE_VA_BASE + index * VA_SPAN_PER_VDEV
        self._next = self._base
        self._starts: list[int] = []
        self._allocs: dict[int, Allocation] = {}
        self._owned: dict[object, dict[int, Allocation]] = {}  # the same, by owner: a session's close is O(its own)
        self._freed: dict[int, None] = {}  # recently freed starts (insertion-ordered), to name a double free

    def map(self, size: int, buffer: Buffer, owner: object, offset: int = 0, imported: object = None) -> Allocation:
        start = self._next
        self._next = (start + size + 2 * VA_ALIGN - 1) // VA_ALIGN * VA_ALIGN
        alloc = Allocation(start, size, buffer, owner, offset, imported)
        self._allocs[start] = alloc
        self._owned.setdefault(owner, {})[start] = alloc
        bisect.insort(self._starts, start)
        return alloc

    def unmap(self, ptr: int, owner: object) -> Allocation:
        alloc = self._allocs.get(ptr)
        if alloc is None:
            if ptr in self._freed:
                raise InvalidParam(
                    f"free(0x{ptr:x}): double free, this pointer was already freed", AclError.RT_MEMORY_FREE
                )
            inner = self._find(ptr)
            if inner is not None and inner.owner is owner:
                raise InvalidParam(
                    f"free(0x{ptr:x}): pointer is {ptr - inner.start} bytes into the allocation at "
                    f"0x{inner.start:x}; free takes the pointer malloc returned"
                )
            raise InvalidParam(f"free(0x{ptr:x}): {self._stranger(ptr, inner, owner)}")
        if alloc.owner is not owner:
            raise InvalidParam(f"free(0x{ptr:x}): {self._stranger(ptr, alloc, owner)}")
        del self._allocs[ptr]
        owned = self._owned[owner]
        del owned[ptr]
        if not owned:
            del self._owned[owner]
        del self._starts[bisect.bisect_left(self._starts, ptr)]
        self._freed[ptr] = None
        if len(self._freed) > FREED_REMEMBERED:  # bounded: a long malloc/free loop must not grow the daemon
            del self._freed[next(iter(self._freed))]
        return alloc

    def region(self, ptr: int, count: int, owner: object, what: str) -> Region:
        """The physical bytes behind [ptr, ptr+count) if the caller may touch all of them."""
        alloc = self._find(ptr)
        if alloc is None or alloc.owner is not owner:
            raise InvalidParam(f"{what} 0x{ptr:x}: {self._stranger(ptr, alloc, owner)}")
        offset = ptr - alloc.start
        if count < 0 or offset + count > alloc.size:
            raise InvalidParam(
                f"{what} 0x{ptr:x}: {count} bytes at offset {offset} run past the end of its "
                f"{alloc.size}-byte allocation at 0x{alloc.start:x}"
            )
        return Region(alloc.buffer, alloc.offset + offset, count)

    def find(self, ptr: int, owner: object) -> Allocation | None:
        """The caller's allocation that starts at `ptr`, if any."""
        alloc = self._allocs.get(ptr)
        return alloc if alloc is not None and alloc.owner is owner else None

    def allocations(self, owner: object) -> list[Allocation]:
        return list(self._owned.get(owner, {}).values())

    def count(self, owner: object) -> int:
        return len(self._owned.get(owner, ()))

    def _find(self, ptr: int) -> Allocation | None:
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            return None
        alloc = self._allocs[self._starts[i]]
        return alloc if ptr < alloc.start + alloc.size else None

    def _stranger(self, ptr: int, alloc: Allocation | None, owner: object) -> str:
        if alloc is not None:
            return "belongs to another session on this device; processes cannot touch each other's memory"
        if not is_device_address(ptr):
            return "is not a device address (a host pointer where a device pointer was expected?)"
        if not self._base <= ptr < self._base + VA_SPAN_PER_VDEV:
            return f"is not an address of {self.name} (a pointer from another device?)"
        return f"is not inside any live allocation on {self.name} (freed, or never allocated)"
