"""The FUSE filesystem of device nodes: davinci0..N, the ancillary nodes containers expect, `status` and `control`.

One open() of a device node is one session: frames come in by write(), replies go out by read(). Nodes are
regular files opened with direct_io (no page cache, so every write and read reaches us, and big writes arrive
as 1 MiB pieces at increasing offsets) and nonseekable (offsets mean nothing on a channel).

Device nodes come and go with their virtual NPUs (`vdevctl vnpu`): a new node takes an inode never used before,
so nothing the kernel cached of a removed one can alias it; a removed node's open files answer ENODEV, which
the client reports as the device lost.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import stat
import time
from collections.abc import Callable

import pyfuse3
import structlog

from interposer.topology import Topology, VirtualNPU
from interposer.translate import Translator, VersionOnly
from npu.errors import FlexNPUError
from vdevfs import access
from vdevfs.channel import Channel
from vdevfs.control import Control
from vdevfs.limits import BufferAccount, BufferLimits, Tenants, give_back_freed_memory

log = structlog.get_logger()

ROOT = pyfuse3.ROOT_INODE
STATUS_INODE = ROOT + 1
CONTROL_INODE = ROOT + 2
ANCILLARY = ("davinci_manager", "devmm_svm", "hisi_hdc")
FIRST_ANCILLARY_INODE = ROOT + 3
FIRST_DEVICE_INODE = ROOT + 16
STATUS_NAME = "status"
CONTROL_NAME = "control"


class Lost:
    """An open file of a virtual NPU that was destroyed under it: every call is refused, until it is closed."""

    def __init__(self, device: str) -> None:
        self.device = device


def fuse_handler(method):
    """Only FUSEError may leave a pyfuse3 handler (anything else unmounts the filesystem): translate the rest."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FlexNPUError as exc:  # already logged, with its session, where it was raised
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("handler_crashed", handler=method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class DeviceFS(pyfuse3.Operations):
    def __init__(self, topology: Topology, info: dict, limits: BufferLimits) -> None:
        super().__init__()
        self.topology = topology
        self.limits = limits
        self.tenants = Tenants()  # sessions per user, bounded
        self.info = info  # daemon facts for the status file: pid, mount point, config source
        self.started = time.time()
        self.names: dict[bytes, int] = {STATUS_NAME.encode(): STATUS_INODE, CONTROL_NAME.encode(): CONTROL_INODE}
        self.names |= {n.encode(): FIRST_ANCILLARY_INODE + i for i, n in enumerate(ANCILLARY)}
        self.devices: dict[int, VirtualNPU] = {}
        self._next_inode = FIRST_DEVICE_INODE
        for vdev in topology.virtual:
            self.add_node(vdev)
        self.open_files: dict[int, Channel | Control | Lost | bytes] = {}
        # Virtual NPUs changed: the daemon keeps them for the next start; why it could not, if it could not.
        self.on_change: Callable[[], str | None] = lambda: None
        self.owner = os.getuid(), os.getgid()  # of the control node: who runs the daemon may command it
        self._next_fh = 1
        self.spawn: Callable | None = None  # set by the daemon once its nursery is open

    # -- device nodes of virtual NPUs made and removed at run time (vdevfs/control.py's Nodes) ---------------

    def add_node(self, vdev: VirtualNPU) -> None:
        inode, self._next_inode = self._next_inode, self._next_inode + 1
        self.names[vdev.name.encode()] = inode
        self.devices[inode] = vdev

    def end_sessions(self, vdev: VirtualNPU) -> int:
        ended = 0
        for fh, content in self.open_files.items():
            if isinstance(content, Channel) and getattr(content.handler, "vdev", None) is vdev:
                self.tenants.release(content)
                content.close()
                self.open_files[fh] = Lost(vdev.name)
                ended += 1
        give_back_freed_memory()
        return ended

    def remove_node(self, vdev: VirtualNPU) -> None:
        inode = self.names.pop(vdev.name.encode())
        del self.devices[inode]
        pyfuse3.invalidate_entry_async(ROOT, vdev.name.encode())  # the kernel may hold the name for a second

    def changed(self) -> str | None:
        return self.on_change()

    # -- metadata -----------------------------------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_nlink = 1
        attr.st_size = 0
        stamp = int(self.started * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        attr.attr_timeout = attr.entry_timeout = 1.0
        if inode == ROOT:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode == STATUS_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
        elif inode == CONTROL_INODE:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_uid, attr.st_gid = self.owner
        elif inode in self.devices:
            vdev = self.devices[inode]
            attr.st_mode = stat.S_IFREG | vdev.mode
            attr.st_uid, attr.st_gid = vdev.uid, vdev.gid
        elif FIRST_ANCILLARY_INODE <= inode < FIRST_ANCILLARY_INODE + len(ANCILLARY):
            attr.st_mode = stat.S_IFREG | 0o666
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    @fuse_handler
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @fuse_handler
    async def lookup(self, parent_inode, name, ctx=None):
        inode = self.names.get(name) if parent_inode == ROOT else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    @fuse_handler
    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_handler
    async def readdir(self, fh, start_id, token):
        entries = sorted(self.names.items(), key=lambda item: item[1])
        for name, inode in entries:
            if inode > start_id and not pyfuse3.readdir_reply(token, name, self._attr(inode), inode):
                return

    # -- channels -----------------------------------------------------------------------------------------

    @fuse_handler
    async def open(self, inode, flags, ctx):
        if inode == STATUS_INODE:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            content: Channel | Control | bytes = self.status_bytes(ctx.uid, ctx.gid)
        elif inode == CONTROL_INODE:
            if ctx.uid not in (0, self.owner[0]):  # the kernel checks the mode first; this holds without it too
                raise pyfuse3.FUSEError(errno.EACCES)
            content = Control(self.topology, log.bind(pid=ctx.pid, uid=ctx.uid), nodes=self)
        elif inode in self.devices:
            vdev = self.devices[inode]
            self.tenants.admit(ctx.uid, vdev.name)
            account = BufferAccount(self.limits, vdev.name)
            translator = Translator(vdev, pid=ctx.pid, buffers=account)
            content = Channel(translator, translator.log, account, spawn=self.spawn)
            translator.admit_delivery = content.account.admit_delivery
            self.tenants.hold(content, ctx.uid)
        elif FIRST_ANCILLARY_INODE <= inode < FIRST_ANCILLARY_INODE + len(ANCILLARY):
            name = ANCILLARY[inode - FIRST_ANCILLARY_INODE]
            content = Channel(VersionOnly(name), log.bind(pid=ctx.pid, device=name), BufferAccount(self.limits, name))
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self.open_files[fh] = content
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=inode != STATUS_INODE)

    @fuse_handler
    async def write(self, fh, off, buf):
        channel = self.open_files.get(fh)
        if isinstance(channel, Lost):
            raise pyfuse3.FUSEError(errno.ENODEV)
        if isinstance(channel, Control):
            channel.write(buf)
        elif isinstance(channel, Channel):
            channel.write(buf)  # never waits on the device: the kernel holds the node's lock until we answer
        else:
            raise pyfuse3.FUSEError(errno.EBADF)
        return len(buf)

    @fuse_handler
    async def read(self, fh, off, size):
        content = self.open_files.get(fh)
        if isinstance(content, bytes):
            return content[off : off + size]
        if isinstance(content, Channel):
            data = await content.read(size)  # waits while this session's frame waits on the device
            if not data and isinstance(self.open_files.get(fh), Lost):  # destroyed under the wait
                raise pyfuse3.FUSEError(errno.ENODEV)
            return data
        if content is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if isinstance(content, Lost):
            raise pyfuse3.FUSEError(errno.ENODEV)
        return content.read(size)

    @fuse_handler
    async def poll(self, inode, fh, poll_handle, ctx):
        """Readable once a reply is there (or none is coming), so a client may wait in poll() or select()
        instead of in a read; always writable (a write never waits on the device)."""
        content = self.open_files.get(fh)
        if not isinstance(content, Channel) or content.readable():
            return select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM
        if poll_handle is not None:
            content.on_reply = poll_handle.notify
        return select.POLLOUT | select.POLLWRNORM

    @fuse_handler
    async def release(self, fh):
        content = self.open_files.pop(fh, None)
        if isinstance(content, Channel):
            self.tenants.release(content)
            content.close()
            give_back_freed_memory()

    @fuse_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        """chmod and chown apply to device nodes, as on /dev, and are kept for the next start with the other
        run-time changes (vdevfs/state.py); the kernel has already checked the caller may (default_permissions).
        The other nodes refuse them. O_TRUNC and new timestamps change nothing: there is nothing to truncate or date."""
        if fields.update_mode or fields.update_uid or fields.update_gid:
            vdev = self.devices.get(inode)
            if vdev is None:
                raise pyfuse3.FUSEError(errno.EPERM)
            if fields.update_mode:
                vdev.mode = attr.st_mode & 0o777
            if fields.update_uid:
                vdev.uid = attr.st_uid
            if fields.update_gid:
                vdev.gid = attr.st_gid
            log.info("node_changed", device=vdev.name, mode=oct(vdev.mode), uid=vdev.uid, gid=vdev.gid, by=ctx.uid)
            self.changed()
        return self._attr(inode)

    def status(self) -> dict:
        """The whole status: the daemon (or NPU process) and its NPUs."""
        daemon = {**self.info, "uptime_s": round(time.time() - self.started, 1), "buffers": self.limits.status()}
        return {"daemon": daemon | self.tenants.status()} | self.topology.status()

    async def status_async(self) -> dict:
        return self.status()

    def status_bytes(self, uid: int, gid: int) -> bytes:
        """The status file as the requester sees it: only the virtual NPUs they may open, and their sessions."""
        return access.status_file(self.status(), self.topology.virtual, uid, gid)
