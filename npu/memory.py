"""Device memory of one physical NPU: allocations, and byte views of them in numeric mode.

In timing mode allocations have no backing store, so a 7B model's weights cost no host memory; reads of such
memory return zeros and writes are dropped. Memory of a real device (the pyacl backend) lives on that device:
its buffers carry the device address and the `Store` that copies bytes in and out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from npu.errors import InvalidParam, OutOfMemory

ALIGN = 32


def rounded_size(size: int) -> int:
    """What aclrtMalloc really takes: the size rounded up to a multiple of 32, plus 32."""
    return (size + ALIGN - 1) // ALIGN * ALIGN + ALIGN


class Store(Protocol):
    """Bytes in and out of a device that is not this process's memory."""

    def read(self, address: int, size: int) -> bytes: ...

    def write(self, address: int, data) -> None: ...


@dataclass(eq=False, slots=True)
class Buffer:
    """One physical allocation. `data` is None in timing mode and on a real device (then `store` has the bytes)."""

    size: int
    data: np.ndarray | None
    freed: bool = field(default=False)
    address: int = 0  # on a real device: its device address
    store: Store | None = None
    holders: int = 1  # the session that allocated it, and each process that imported it (IPC memory)
    home: object = None  # the device memory it belongs to (a peer chip's, for IPC memory imported across chips)

    def let_go(self) -> bool:
        """One holder lets go; True when that was the last one and the bytes can go back."""
        self.holders -= 1
        return self.holders == 0 and not self.freed


@dataclass(frozen=True, slots=True)
class Region:
    """A byte range inside one allocation; every task names its operands by Region."""

    buffer: Buffer
    offset: int
    size: int

    def view(self) -> np.ndarray | None:
        data = self.buffer.data
        return None if data is None else data[self.offset : self.offset + self.size]

    @property
    def address(self) -> int:
        return self.buffer.address + self.offset

    def peek(self) -> bytes | memoryview:
        """The bytes without copying them where they are in this process (zeros in timing mode)."""
        view = self.view()
        return self.read() if view is None else memoryview(view)

    def read(self) -> bytes:
        view, store = self.view(), self.buffer.store
        if view is None:
            return bytes(self.size) if store is None else store.read(self.address, self.size)
        return view.tobytes()

    def write(self, data) -> None:
        """Copy in `data`: bytes-like, or an object with `.parts`, bytes-like pieces laid end to end."""
        view, store = self.view(), self.buffer.store
        if view is None:
            if store is not None:
                store.write(self.address, b"".join(getattr(data, "parts", (data,))))
            return
        offset = 0
        for part in getattr(data, "parts", (data,)):
            view[offset : offset + len(part)] = np.frombuffer(part, dtype=np.uint8)
            offset += len(part)


class DeviceMemory:
    """Capacity accounting plus backing store. Quotas are the virtual device's business, not this one's."""

    def __init__(self, capacity: int, backed: bool) -> None:
        self.capacity = capacity
        self.backed = backed
        self.used = 0

    def alloc(self, size: int) -> Buffer:
        if size <= 0:
            raise InvalidParam(f"malloc size must be > 0, got {size}")
        real = rounded_size(size)
        if self.used + real > self.capacity:
            raise OutOfMemory(
                f"physical device out of memory: {real} bytes requested, "
                f"{self.capacity - self.used} of {self.capacity} free"
            )
        # np.zeros maps fresh pages lazily, so untouched numeric memory costs no RSS either; but the host still
        # refuses one allocation it could never back.
        try:
            data = np.zeros(size, dtype=np.uint8) if self.backed else None
        except MemoryError:
            raise OutOfMemory(
                f"numeric mode backs device memory with host memory, and the host cannot back {size} bytes; "
                'use mode = "timing" for this physical NPU (shapes only, no backing store)'
            ) from None
        self.used += real
        return Buffer(real, data, home=self)

    def free(self, buffer: Buffer) -> None:
        """One holder lets go of `buffer`; the memory goes back with the last."""
        if not buffer.let_go():
            return
        buffer.freed = True
        self.used -= buffer.size
        # Work still queued against a freed buffer then runs on no backing store (reads zeros, writes
        # nothing), as timing mode does, and the host memory goes back at once.
        buffer.data = None
