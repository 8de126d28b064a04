"""IPC memory shared between processes (aclrtIpcMemGetExportKey, aclrtIpcMemSetImportPid,
aclrtIpcMemImportByKey, aclrtIpcMemClose): an exporter names part of one of its allocations by a key; processes
it allows import it into their own virtual NPU's address space — the same physical bytes, no copy, as a prefill
process hands its KV cache to a decode process on the same NPU.

The daemon keeps the allow-list (pids as the daemon sees them, which is what aclrtDeviceGetBareTgid answers, so
it holds across container pid namespaces) and who holds what: an export cannot be imported once closed or
freed, its memory cannot be freed while imported, and the physical bytes stay until the exporter and every
importer have let go (a killed importer's imports are closed with its session; a killed exporter's memory
lives on until its importers close). The virtual NPU that allocated the memory pays its quota for it until then
(`owe`, `settle`): a session cannot escape its quota by exporting memory and closing. Memory of another chip,
imported with peer access, can only be copied to and from (over the chips' interconnect): no kernel reads
another chip's memory, and the bytes go back to their own chip.

Every lookup is by key or by session (`_held`), so a session's calls and its close cost what it holds, not what
every session holds.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from npu.errors import AclError, InvalidParam
from npu.memory import Buffer, Region

KEY_BYTES = 64  # pyACL's key is a 65-byte C string: 64 characters and the NUL
EXPORT_DISABLE_PID_VALIDATION = 1  # ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION
IMPORT_ENABLE_PEER_ACCESS = 1  # ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS


@dataclass(eq=False)
class Export:
    key: str
    region: Region  # the exported bytes
    exporter: object  # the exporting session
    physical: object  # the physical NPU the bytes live on
    pids: set[int] | None  # who may import; None: anyone (pid validation disabled)
    importers: set = field(default_factory=set)  # sessions holding it now
    closed: bool = False  # the exporter closed it: no new imports


class IpcRegistry:
    """Every export of one daemon (or of one direct-mode process), by key."""

    def __init__(self) -> None:
        self.exports: dict[str, Export] = {}
        self._held: dict[object, dict[Export, None]] = {}  # each session's exports and imports
        self._payers: dict[Buffer, object] = {}  # memory whose allocating session is gone: the vNPU paying for it

    def held(self, session: object) -> int:
        """How many exports and imports `session` holds."""
        return len(self._held.get(session, ()))

    def export(self, exporter: object, region: Region, physical: object, flags: int) -> str:
        if flags not in (0, EXPORT_DISABLE_PID_VALIDATION):
            raise InvalidParam(f"ipc_mem_get_export_key flags {flags} is not 0 (pid allow-list) or 1 (no validation)")
        key = secrets.token_hex(KEY_BYTES // 2)
        pids = None if flags == EXPORT_DISABLE_PID_VALIDATION else set()
        export = self.exports[key] = Export(key, region, exporter, physical, pids)
        self._hold(exporter, export)
        return key

    def allow(self, session: object, key: str, pids: list[int]) -> None:
        export = self._get(key, "ipc_mem_set_import_pid")
        if export.exporter is not session:
            raise InvalidParam(f"ipc_mem_set_import_pid: key {key[:8]}… was exported by another process")
        if export.pids is None:
            raise InvalidParam(f"ipc_mem_set_import_pid: key {key[:8]}… was exported with pid validation disabled")
        export.pids.update(pids)

    def open(self, importer: object, pid: int, key: str, physical: object, flags: int) -> Export:
        """Check that `importer` (process `pid`, on `physical`) may import `key`; record that it holds it."""
        export = self._get(key, "ipc_mem_import_by_key")
        if export.closed:
            raise InvalidParam(f"ipc_mem_import_by_key: key {key[:8]}… was closed by its exporter")
        if export.pids is not None and pid not in export.pids:
            raise InvalidParam(
                f"ipc_mem_import_by_key: pid {pid} is not on key {key[:8]}…'s allow-list; the exporter must call "
                "acl.rt.ipc_mem_set_import_pid with the pid acl.rt.device_get_bare_tgid gives the importer",
                AclError.RT_NO_PERMISSION,
            )
        if flags & ~IMPORT_ENABLE_PEER_ACCESS:
            raise InvalidParam(f"ipc_mem_import_by_key flags {flags}: only 0 and 1 (enable peer access) exist")
        if export.physical != physical and not flags & IMPORT_ENABLE_PEER_ACCESS:
            raise InvalidParam(
                "ipc_mem_import_by_key: the memory is on another physical NPU; import it with "
                "ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS (1), then copy it device to device",
                AclError.FEATURE_UNSUPPORTED,
            )
        if importer is export.exporter or importer in export.importers:
            raise InvalidParam(f"ipc_mem_import_by_key: this process already holds key {key[:8]}…")
        export.importers.add(importer)
        self._hold(importer, export)
        return export

    def close(self, session: object, key: str) -> Export:
        """The importer lets go of its import (its caller unmaps it), or the exporter closes the export."""
        export = self._get(key, "ipc_mem_close")
        if session in export.importers:
            export.importers.discard(session)
            self._let_go(session, export)
        elif session is export.exporter:
            export.closed = True
        else:
            raise InvalidParam(f"ipc_mem_close: this process neither exported nor imported key {key[:8]}…")
        self._drop_if_done(export)
        return export

    def importers_of(self, session: object, buffer: Buffer) -> int:
        """How many importers hold exports of `session`'s `buffer` (its free must wait for 0)."""
        return sum(len(e.importers) for e in self._own_exports(session, buffer))

    def withdraw(self, session: object, buffer: Buffer) -> None:
        """`session` freed `buffer`: its exports of it close."""
        for export in self._own_exports(session, buffer):
            export.closed = True
            self._drop_if_done(export)

    def forget(self, session: object) -> None:
        """A session ended: its exports close, its imports are let go (its caller unmaps them)."""
        for export in list(self._held.pop(session, ())):
            export.importers.discard(session)
            if export.exporter is session:
                export.closed = True
            self._drop_if_done(export)

    def owe(self, buffer: Buffer, vdev) -> None:
        """`buffer`'s allocating session let go while importers still hold it: `vdev` pays until they let go."""
        self._payers[buffer] = vdev

    def settle(self, buffer: Buffer) -> None:
        """`buffer`'s last holder let go: whoever was left paying for it stops."""
        vdev = self._payers.pop(buffer, None)
        if vdev is not None:
            vdev.used -= buffer.size

    def _own_exports(self, session: object, buffer: Buffer) -> list[Export]:
        return [e for e in self._held.get(session, ()) if e.exporter is session and e.region.buffer is buffer]

    def _hold(self, session: object, export: Export) -> None:
        self._held.setdefault(session, {})[export] = None

    def _let_go(self, session: object, export: Export) -> None:
        held = self._held.get(session)
        if held is not None:
            held.pop(export, None)
            if not held:
                del self._held[session]

    def _get(self, key: str, what: str) -> Export:
        export = self.exports.get(key)
        if export is None:
            raise InvalidParam(f"{what}: no export has key {key[:8]}… (never exported, or closed by all)")
        return export

    def _drop_if_done(self, export: Export) -> None:
        if export.closed and not export.importers:
            del self.exports[export.key]
            self._let_go(export.exporter, export)
