"""IPC memory, the session's side (the registry of exports is interposer/ipc.py): export a region under a key,
allow pids to import it, import by key (mapped like an allocation), close; the room for keys, and the bare
tgid a process gives its peers for the allow-list."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from interposer import limits, wire
from interposer.limits import TooMany
from interposer.translate.memory import region_of, unmap
from interposer.translate.protocol import OK, ok
from interposer.wire import Op
from npu.errors import InvalidParam

if TYPE_CHECKING:
    from interposer.translate import Translator


def keys_room(session: Translator, what: str) -> None:
    held = session.vdev.ipc.held(session)
    if held >= limits.IPC_KEYS:
        raise TooMany(
            f"{what}: this process holds {held} IPC memory keys (exported or imported), as many as one process "
            f"may ({limits.IPC_KEYS}); close some with acl.rt.ipc_mem_close first"
        )


# -- the records ------------------------------------------------------------------------------------------------


def ipc_export(session: Translator, seq, args, data):
    region = region_of(session, args.ptr, args.size, "ipc_mem_get_export_key dev_ptr")
    keys_room(session, "ipc_mem_get_export_key")
    key = session.vdev.ipc.export(session, region, session.vdev.physical, args.flags)
    return ok(wire.COMMANDS[Op.IPC_EXPORT], key=key.encode())


def ipc_allow(session: Translator, seq, args, data):
    if len(data) % 4:
        raise InvalidParam(f"ipc_mem_set_import_pid: {len(data)} bytes of pids is not a whole number of int32s")
    pids = list(struct.unpack(f"<{len(data) // 4}i", bytes(data)))
    session.vdev.ipc.allow(session, _key(args.key), pids)
    return OK


def ipc_import(session: Translator, seq, args, data):
    keys_room(session, "ipc_mem_import_by_key")
    export = session.vdev.ipc.open(session, session.pid, _key(args.key), session.vdev.physical, args.flags)
    region = export.region
    region.buffer.holders += 1
    alloc = session.vdev.space.map(region.size, region.buffer, session, offset=region.offset, imported=export)
    return ok(wire.COMMANDS[Op.IPC_IMPORT], ptr=alloc.start)


def ipc_close(session: Translator, seq, args, data):
    export = session.vdev.ipc.close(session, _key(args.key))
    for alloc in session.vdev.space.allocations(session):
        if alloc.imported is export:
            unmap(session, alloc.start)
    return OK


def bare_tgid(session: Translator, seq, args, data):
    return ok(wire.COMMANDS[Op.BARE_TGID], pid=session.pid)


def _key(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidParam("an IPC memory key is 64 ASCII characters, as ipc_mem_get_export_key returns") from None
