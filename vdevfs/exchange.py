"""IPC memory across NPU processes: one registry of export keys in vdevfsd, used by every NPU process.

A key exported on npu0 may be imported on npu0 (the same bytes: a prefill process hands its KV cache to a decode
process on its NPU) or, with peer access, on npu1 (copied device to device across the interconnect: the
disaggregated KV pull). Each NPU process serves its own sessions, so the keys, allow-lists and holders live in
vdevfsd (`Exchange`, interposer/ipc.py's registry as it is) and an NPU process reaches them through `RemoteIpc`,
which the translator uses as it would the registry. Sessions travel as (npu process, session number), allocations
as (npu process, buffer number): vdevfsd interns both, because the registry compares them by identity.

Bytes: in numeric mode an exported allocation moves into shared memory (a memfd, its contents copied once) and
its descriptor goes to vdevfsd with the export; an importer on another NPU process maps the same pages, so a
peer copy moves real bytes between processes. In timing mode only the bookkeeping crosses. An NPU process that dies
takes its memory with it: an importer elsewhere keeps its mapping of the bytes (numeric mode) until it lets go.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np
import structlog

from interposer.ipc import IpcRegistry
from npu.errors import FlexNPUError, InvalidParam
from npu.memory import Buffer, Region
from vdevfs.link import Caller

log = structlog.get_logger()


@dataclass(frozen=True)
class Shared:
    """An exported range as it crosses processes: whose allocation, where in it, how big the allocation is."""

    npu: str
    buffer: int  # the allocation's number in its NPU process
    offset: int
    size: int
    allocation: int  # bytes of the whole allocation (what an importer maps)
    has_bytes: bool  # numeric mode: a memfd of the allocation comes with it


@dataclass(eq=False)
class Held:
    """What vdevfsd holds of one export: its descriptor and, in numeric mode, the memfd of its allocation."""

    shared: Shared
    fd: int | None


class Exchange:
    """vdevfsd's side: the registry of every NPU process's exports, answering their calls.

    An import on another NPU process holds the exporter's allocation as one on its own NPU would: the exporter's
    process is told (`notices`: ("hold" | "let_go", buffer number) for an NPU process) so that the bytes, and the
    exporting virtual NPU's quota, stay until the last importer lets go."""

    def __init__(self) -> None:
        self.registry = IpcRegistry()
        self._names: dict[tuple, tuple] = {}  # interned sessions and buffers
        self._held: dict[str, Held] = {}  # by key
        self._remote: dict[tuple, tuple[str, int]] = {}  # (importing session, key) -> exporter's (npu, buffer)
        self.notices: list[tuple[str, tuple]] = []  # for NPU processes, sent by the caller after each call

    def _intern(self, name: tuple) -> tuple:
        return self._names.setdefault(name, name)

    def call(self, npu: str, message: tuple, fds: list[int]) -> tuple[object, list[int]]:
        """Run one call from NPU process `npu`: (answer, descriptors to send with it)."""
        op, session, *args = message
        session = self._intern((npu, session))
        try:
            answer, out = getattr(self, "_" + op)(npu, session, *args, fds=fds), []
            if isinstance(answer, tuple) and answer and answer[0] == "with_fd":
                answer, out = answer[1], [answer[2]]
        except FlexNPUError as exc:
            answer, out = ("error", exc.message, int(exc.code)), []
        finally:
            self._drop_gone()
        return answer, out

    def _export(self, npu, session, shared: Shared, flags: int, fds):
        buffer = self._intern((npu, shared.buffer))
        region = Region(buffer, shared.offset, shared.size)  # type: ignore[arg-type]  # a stand-in, compared by identity
        key = self.registry.export(session, region, npu, flags)
        self._held[key] = Held(shared, fds[0] if fds else None)
        return key

    def _allow(self, npu, session, key: str, pids: list[int], fds):
        self.registry.allow(session, key, pids)

    def _open(self, npu, session, pid: int, key: str, flags: int, fds):
        self.registry.open(session, pid, key, npu, flags)
        held = self._held[key]
        if held.shared.npu == npu:
            return held.shared
        self._remote[session, key] = (held.shared.npu, held.shared.buffer)
        self.notices.append((held.shared.npu, ("hold", held.shared.buffer)))
        return ("with_fd", held.shared, held.fd) if held.fd is not None else held.shared

    def _close(self, npu, session, key: str, fds):
        export = self.registry.close(session, key)
        self._let_go((session, key))
        return "exporter" if export.exporter is session else "importer"

    def _let_go(self, *imports: tuple) -> None:
        for name in imports:
            exporter = self._remote.pop(name, None)
            if exporter is not None:
                self.notices.append((exporter[0], ("let_go", exporter[1])))

    def _importers_of(self, npu, session, buffer: int, fds):
        return self.registry.importers_of(session, self._intern((npu, buffer)))

    def _withdraw(self, npu, session, buffer: int, fds):
        self.registry.withdraw(session, self._intern((npu, buffer)))

    def _forget(self, npu, session, fds):
        self.registry.forget(session)
        self._let_go(*[name for name in self._remote if name[0] is session])

    def _held_count(self, npu, session, fds):
        return self.registry.held(session)

    def forget_process(self, npu: str) -> None:
        """An NPU process died: every session it served let go of what it held."""
        for name in [n for n in self._names if n[0] == npu]:
            self.registry.forget(name)
        self._let_go(*[name for name in self._remote if name[0][0] == npu])
        for name in [name for name, exporter in self._remote.items() if exporter[0] == npu]:
            del self._remote[name]  # its memory went with it
        self.notices = [(to, notice) for to, notice in self.notices if to != npu]
        self._drop_gone()

    def _drop_gone(self) -> None:
        for key in [k for k in self._held if k not in self.registry.exports]:
            held = self._held.pop(key)
            if held.fd is not None:
                os.close(held.fd)


class PeerMemory:
    """Memory of another NPU process's chip, mapped here for peer copies; let go with its last holder."""

    def __init__(self, npu: str) -> None:
        self.npu = npu

    def free(self, buffer: Buffer) -> None:
        if buffer.let_go():
            buffer.freed = True
            buffer.data = None  # unmaps the shared pages (once no task holds a view of them)


@dataclass(eq=False)
class Imported:
    """An import as the translator sees one (interposer/ipc.py's Export: its region)."""

    key: str
    region: Region


@dataclass(eq=False)
class RemoteIpc:
    """An NPU process's side: interposer/ipc.py's registry interface, answered by vdevfsd."""

    caller: Caller
    npu: str
    memory: object  # this NPU's DeviceMemory: imports of its own allocations map the same Buffer
    _sessions: dict = field(default_factory=dict)  # session -> number
    _buffers: dict = field(default_factory=dict)  # number -> Buffer, for exported allocations
    _numbers: dict = field(default_factory=dict)  # Buffer -> number
    _imports: dict = field(default_factory=dict)  # (session, key) -> Imported
    _payers: dict = field(default_factory=dict)  # as IpcRegistry's: memory whose allocating session is gone
    _fds: dict = field(default_factory=dict)  # number -> memfd of an exported numeric allocation

    def _call(self, session: object, op: str, *args, fds: tuple[int, ...] = ()) -> tuple[object, list[int]]:
        number = self._sessions.setdefault(session, len(self._sessions) + 1)
        answer, received = self.caller.call((op, number, *args), fds)
        if isinstance(answer, tuple) and answer and answer[0] == "error":
            _, message, code = answer
            raise InvalidParam(message, code)
        return answer, received

    def held(self, session: object) -> int:
        return self._call(session, "held_count")[0] if session in self._sessions else 0

    def export(self, exporter: object, region: Region, physical: object, flags: int) -> str:
        buffer = region.buffer
        number = self._numbers.get(buffer)
        if number is None:
            number = self._numbers[buffer] = len(self._numbers) + 1
            self._buffers[number] = buffer
        if buffer.data is not None and number not in self._fds:
            self._fds[number] = _share(buffer)
        fd = self._fds.get(number)
        size = len(buffer.data) if buffer.data is not None else buffer.size
        shared = Shared(self.npu, number, region.offset, region.size, size, fd is not None)
        return self._call(exporter, "export", shared, flags, fds=(fd,) if fd is not None else ())[0]

    def allow(self, session: object, key: str, pids: list[int]) -> None:
        self._call(session, "allow", key, pids)

    def open(self, importer: object, pid: int, key: str, physical: object, flags: int) -> Imported:
        shared, fds = self._call(importer, "open", pid, key, flags)
        if shared.npu == self.npu:
            region = Region(self._buffers[shared.buffer], shared.offset, shared.size)
        else:
            region = Region(_peer_buffer(shared, fds), shared.offset, shared.size)
        imported = self._imports[importer, key] = Imported(key, region)
        return imported

    def close(self, session: object, key: str) -> Imported | None:
        role, _ = self._call(session, "close", key)
        return self._imports.pop((session, key), None) if role == "importer" else None

    def importers_of(self, session: object, buffer: Buffer) -> int:
        number = self._numbers.get(buffer)
        return 0 if number is None else self._call(session, "importers_of", number)[0]

    def withdraw(self, session: object, buffer: Buffer) -> None:
        number = self._numbers.get(buffer)
        if number is not None:
            self._call(session, "withdraw", number)
            self._let_go_of_freed()

    def forget(self, session: object) -> None:
        if session in self._sessions:
            self._call(session, "forget")
            del self._sessions[session]
        for key in [k for k in self._imports if k[0] is session]:
            del self._imports[key]
        self._let_go_of_freed()

    def _let_go_of_freed(self) -> None:
        for number, buffer in list(self._buffers.items()):
            if buffer.freed or buffer.holders == 0:
                del self._buffers[number], self._numbers[buffer]
                fd = self._fds.pop(number, None)
                if fd is not None:
                    os.close(fd)

    def hold(self, number: int) -> None:
        """An importer on another NPU process holds this exported allocation (vdevfsd's notice)."""
        buffer = self._buffers.get(number)
        if buffer is not None and not buffer.freed:
            buffer.holders += 1

    def let_go(self, number: int) -> None:
        """That importer let go: the bytes go back with the last holder, and whoever paid for them stops."""
        buffer = self._buffers.get(number)
        if buffer is not None and not buffer.freed:
            buffer.home.free(buffer)
            if buffer.freed:
                self.settle(buffer)
                self._let_go_of_freed()

    def owe(self, buffer: Buffer, vdev) -> None:
        self._payers[buffer] = vdev

    def settle(self, buffer: Buffer) -> None:
        vdev = self._payers.pop(buffer, None)
        if vdev is not None:
            vdev.used -= buffer.size


def _share(buffer: Buffer) -> int:
    """Move a numeric allocation's bytes into shared memory (once); a descriptor of it, for vdevfsd."""
    data = buffer.data
    fd = os.memfd_create("flexnpu-ipc", os.MFD_CLOEXEC)
    os.ftruncate(fd, max(len(data), 1))
    shared = mmap.mmap(fd, max(len(data), 1))
    view = np.frombuffer(shared, dtype=np.uint8, count=len(data))
    view[:] = data
    buffer.data = view
    return fd


def _peer_buffer(shared: Shared, fds: list[int]) -> Buffer:
    data = None
    if fds:
        try:
            mapped = mmap.mmap(fds[0], max(shared.allocation, 1))
            data = np.frombuffer(mapped, dtype=np.uint8, count=shared.allocation)
        finally:
            for fd in fds:
                os.close(fd)
    return Buffer(shared.allocation, data, home=PeerMemory(shared.npu))
