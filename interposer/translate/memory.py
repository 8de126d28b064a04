"""Device memory: the regions behind the session's device pointers, malloc/free within the virtual NPU's quota,
get_mem_info, and giving back an allocation or an IPC import (which settles who pays for shared bytes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from interposer import wire
from interposer.translate.protocol import OK, ok
from interposer.wire import Op
from npu.errors import AclError, InvalidParam, OutOfMemory
from npu.memory import Region, rounded_size

if TYPE_CHECKING:
    from interposer.translate import Translator

MALLOC_POLICIES = range(6)  # ACL_MEM_MALLOC_HUGE_FIRST .. ACL_MEM_MALLOC_NORMAL_ONLY_P2P
ACL_HBM_MEM = 1


def region_of(session: Translator, ptr: int, count: int, what: str, peer: bool = False) -> Region:
    """The bytes at [ptr, ptr+count); another chip's (imported with peer access) only where `peer` allows."""
    region = session.vdev.space.region(ptr, count, session, what)
    if not peer and region.buffer.home is not session.vdev.physical.npu.memory:
        raise InvalidParam(
            f"{what} 0x{ptr:x}: memory of another NPU (IPC memory imported with peer access) can only be "
            "copied device to device"
        )
    return region


def unmap(session: Translator, ptr: int) -> None:
    """Give back an allocation or an import. The bytes go back to the chip they live on (an import with peer
    access maps another chip's) once their last holder lets go; until then the virtual NPU that allocated
    them pays its quota for them, even after the allocating session is gone (interposer/ipc.py)."""
    alloc = session.vdev.space.unmap(ptr, session)
    buffer = alloc.buffer
    ipc = session.vdev.ipc
    if alloc.imported is None:
        session.memory -= buffer.size
        if buffer.holders > 1:  # still imported: the quota goes on paying until the last import closes
            ipc.owe(buffer, session.vdev)
        else:
            session.vdev.used -= buffer.size
    buffer.home.free(buffer)
    if buffer.freed and alloc.imported is not None:
        ipc.settle(buffer)


# -- the records ------------------------------------------------------------------------------------------------


def malloc(session: Translator, seq, args, data):
    size, policy = args.size, args.policy
    if policy not in MALLOC_POLICIES:
        raise InvalidParam(
            f"malloc policy {policy} is not an aclrtMemMallocPolicy (0-5)", AclError.RT_INVALID_MALLOC_TYPE
        )
    if size <= 0:
        raise InvalidParam(f"malloc size must be > 0, got {size}")
    vdev, need = session.vdev, rounded_size(size)
    if vdev.used + need > vdev.quota:
        raise OutOfMemory(
            f"{vdev.name}: out of memory: malloc({size}) needs {need} bytes, {vdev.quota - vdev.used} of its "
            f"{vdev.quota}-byte quota are free; free memory or raise the quota ([[virtual]] memory in the config)"
        )
    buffer = vdev.physical.npu.memory.alloc(size)
    alloc = vdev.space.map(size, buffer, session)
    vdev.used += buffer.size
    session.memory += buffer.size
    return ok(wire.COMMANDS[Op.MALLOC], ptr=alloc.start)


def free(session: Translator, seq, args, data):
    alloc = session.vdev.space.find(args.ptr, session)
    if alloc is not None and alloc.imported is not None:
        raise InvalidParam(f"free(0x{args.ptr:x}): imported IPC memory is let go with acl.rt.ipc_mem_close")
    if alloc is not None and (holding := session.vdev.ipc.importers_of(session, alloc.buffer)):
        raise InvalidParam(
            f"free(0x{args.ptr:x}): {holding} process(es) still import this memory; they must call "
            "acl.rt.ipc_mem_close first",
            AclError.RT_MEMORY_FREE,
        )
    if alloc is not None:
        session.vdev.ipc.withdraw(session, alloc.buffer)
    unmap(session, args.ptr)
    return OK


def mem_info(session: Translator, seq, args, data):
    if args.attr == ACL_HBM_MEM:
        available, total = session.vdev.quota - session.vdev.used, session.vdev.quota
    elif args.attr == 0:
        available, total = 0, 0  # ACL_DDR_MEM: the emulated chip has no device-side DDR
    else:
        raise InvalidParam(f"get_mem_info attr {args.attr} is not ACL_DDR_MEM (0) or ACL_HBM_MEM (1)")
    return ok(wire.COMMANDS[Op.MEM_INFO], free=available, total=total)
