"""vdevfsd's own files when each physical NPU has a process (vdevfs/npus.py): the one tree users see.

    /dev/flexnpu/status, control            the daemon's, as with one process (figures asked of the NPU processes)
    /dev/flexnpu/davinci_manager, ...       the ancillary nodes containers expect
    /dev/flexnpu/davinci0 -> .npu/npu0/davinci0
    /dev/flexnpu/.npu/npu0/                 where npu0's process mounts the device files it serves

A device file is a link into its NPU process's mount, so opening it lands there: writes and reads of a session
never pass through vdevfsd. A container binding /dev/flexnpu/davinci0 (a bind follows the link) binds that
process's file; a container bound before the process restarted holds the dead mount and must be restarted (the
host's path leads to the new one). While a process restarts, its directory here shows its virtual NPUs as files
that refuse to open with ENODEV ("no such device"), which a client reports as the device lost.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time

import pyfuse3
import structlog

from interposer.topology import VirtualNPU
from interposer.translate import VersionOnly
from vdevfs import access
from vdevfs.channel import Channel
from vdevfs.control import Control
from vdevfs.fs import ANCILLARY, CONTROL_NAME, STATUS_NAME, fuse_handler
from vdevfs.limits import BufferAccount, BufferLimits
from vdevfs.npus import Npus

log = structlog.get_logger()

ROOT = pyfuse3.ROOT_INODE
STATUS_INODE, CONTROL_INODE, NPUS_INODE = ROOT + 1, ROOT + 2, ROOT + 3
FIRST_ANCILLARY_INODE = ROOT + 4
FIRST_NPU_INODE = ROOT + 16
FIRST_NODE_INODE = ROOT + 1024  # then two per virtual NPU ever made: its link, and its file while its process is down
NPUS_NAME = ".npu"


class FrontFS(pyfuse3.Operations):
    def __init__(self, npus: Npus, info: dict, limits: BufferLimits) -> None:
        super().__init__()
        self.npus = npus
        self.topology = npus.topology
        self.info = info
        self.limits = limits
        self.started = time.time()
        self.names = {
            STATUS_NAME.encode(): STATUS_INODE,
            CONTROL_NAME.encode(): CONTROL_INODE,
            NPUS_NAME.encode(): NPUS_INODE,
        }
        self.names |= {n.encode(): FIRST_ANCILLARY_INODE + i for i, n in enumerate(ANCILLARY)}
        self.npu_inodes = {p.name.encode(): FIRST_NPU_INODE + i for i, p in enumerate(self.topology.physical)}
        self.links: dict[str, int] = {}  # virtual NPU name -> its link's inode (+1: its file while down)
        self._next_inode = FIRST_NODE_INODE
        self.open_files: dict[int, Channel | Control | bytes] = {}
        self._next_fh = 1
        self.owner = os.getuid(), os.getgid()
        self.spawn = None
        self.nodes_changed()
        npus.on_nodes_changed = self.nodes_changed

    def nodes_changed(self) -> None:
        """Links for every virtual NPU of the mirror; a removed one's name is forgotten by the kernel too."""
        names = {v.name for v in self.topology.virtual}
        for name in [n for n in self.links if n not in names]:
            del self.links[name]
            pyfuse3.invalidate_entry_async(ROOT, name.encode())
        for name in sorted(names - self.links.keys()):
            self.links[name], self._next_inode = self._next_inode, self._next_inode + 2

    def _link(self, name: str) -> int | None:
        """A virtual NPU's link, once its process has first started: a client that finds it finds it serving.
        (Waiting in lookup instead would hold the directory's lock, which the NPU process needs to mount.)"""
        inode = self.links.get(name)
        vdev = None if inode is None else self._vdev(inode)
        return inode if vdev is not None and self.npus.processes[vdev.physical.name].ready.is_set() else None

    def _vdev(self, inode: int) -> VirtualNPU | None:
        base = inode - (inode - FIRST_NODE_INODE) % 2
        for vdev in self.topology.virtual:
            if self.links.get(vdev.name) == base:
                return vdev
        return None

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_nlink = 1
        stamp = int(self.started * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        attr.attr_timeout = attr.entry_timeout = 1.0
        if inode in (ROOT, NPUS_INODE) or FIRST_NPU_INODE <= inode < FIRST_NPU_INODE + len(self.npu_inodes):
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.attr_timeout = attr.entry_timeout = 0.0  # a process's mount comes and goes on its directory
        elif inode == STATUS_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
        elif inode == CONTROL_INODE:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_uid, attr.st_gid = self.owner
        elif FIRST_ANCILLARY_INODE <= inode < FIRST_ANCILLARY_INODE + len(ANCILLARY):
            attr.st_mode = stat.S_IFREG | 0o666
        elif inode >= FIRST_NODE_INODE and (vdev := self._vdev(inode)) is not None:
            attr.st_uid, attr.st_gid = vdev.uid, vdev.gid
            if (inode - FIRST_NODE_INODE) % 2 == 0:
                attr.st_mode = stat.S_IFLNK | 0o777
                attr.st_size = len(self._target(vdev))
            else:  # its file while its process is down
                attr.st_mode = stat.S_IFREG | vdev.mode
                attr.attr_timeout = attr.entry_timeout = 0.0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    @staticmethod
    def _target(vdev: VirtualNPU) -> bytes:
        return f"{NPUS_NAME}/{vdev.physical.name}/{vdev.name}".encode()

    @fuse_handler
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @fuse_handler
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT:
            inode = self.names.get(name) or self._link(name.decode(errors="replace"))
        elif parent_inode == NPUS_INODE:
            inode = self.npu_inodes.get(name)
        else:  # a process's directory while it is down: its virtual NPUs, refusing to open
            npu = next((n.decode() for n, i in self.npu_inodes.items() if i == parent_inode), None)
            vdev = next((v for v in self.topology.virtual if v.name.encode() == name), None)
            inode = self.links[vdev.name] + 1 if vdev is not None and vdev.physical.name == npu else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    @fuse_handler
    async def readlink(self, inode, ctx):
        vdev = self._vdev(inode)
        if vdev is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._target(vdev)

    @fuse_handler
    async def opendir(self, inode, ctx):
        if inode not in (ROOT, NPUS_INODE) and inode not in self.npu_inodes.values():
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_handler
    async def readdir(self, fh, start_id, token):
        if fh == ROOT:
            entries = sorted(
                [*self.names.items(), *((n.encode(), i) for n, i in self.links.items())], key=lambda e: e[1]
            )
        elif fh == NPUS_INODE:
            entries = sorted(self.npu_inodes.items(), key=lambda e: e[1])
        else:
            return
        for name, inode in entries:
            if inode > start_id and not pyfuse3.readdir_reply(token, name, self._attr(inode), inode):
                return

    @fuse_handler
    async def open(self, inode, flags, ctx):
        if inode == STATUS_INODE:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            await self.npus.started()
            status = await self.npus.status()
            status["daemon"] = {**self.info, "uptime_s": round(time.time() - self.started, 1)} | status["daemon"]
            content: Channel | Control | bytes = access.status_file(status, self.topology.virtual, ctx.uid, ctx.gid)
        elif inode == CONTROL_INODE:
            if ctx.uid not in (0, self.owner[0]):
                raise pyfuse3.FUSEError(errno.EACCES)
            content = Control(self.topology, log.bind(pid=ctx.pid, uid=ctx.uid))  # commands go to self.npus
        elif FIRST_ANCILLARY_INODE <= inode < FIRST_ANCILLARY_INODE + len(ANCILLARY):
            name = ANCILLARY[inode - FIRST_ANCILLARY_INODE]
            content = Channel(VersionOnly(name), log.bind(pid=ctx.pid, device=name), BufferAccount(self.limits, name))
        elif inode >= FIRST_NODE_INODE and (vdev := self._vdev(inode)) is not None:
            log.warning(
                "open_refused", device=vdev.name, npu=vdev.physical.name, reason="its NPU process is restarting"
            )
            raise pyfuse3.FUSEError(errno.ENODEV)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self.open_files[fh] = content
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=inode != STATUS_INODE)

    @fuse_handler
    async def write(self, fh, off, buf):
        content = self.open_files.get(fh)
        if isinstance(content, Control):  # a command, carried out by the NPU processes; its reply read next
            command = content.command(buf)
            if command is not None:
                content.answer(await self.npus.command(command, content.log))
        elif isinstance(content, Channel):
            content.write(buf)
        else:
            raise pyfuse3.FUSEError(errno.EBADF)
        return len(buf)

    @fuse_handler
    async def read(self, fh, off, size):
        content = self.open_files.get(fh)
        if isinstance(content, bytes):
            return content[off : off + size]
        if isinstance(content, Control):
            return content.read(size)
        if isinstance(content, Channel):
            return await content.read(size)
        raise pyfuse3.FUSEError(errno.EBADF)

    @fuse_handler
    async def poll(self, inode, fh, poll_handle, ctx):
        return select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM

    @fuse_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        """chmod and chown of a device file reach its NPU process (they follow the link); the rest refuse them."""
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    @fuse_handler
    async def release(self, fh):
        content = self.open_files.pop(fh, None)
        if isinstance(content, Channel):
            content.close()
