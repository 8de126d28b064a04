"""The FUSE filesystem of device nodes: davinci0..N, the ancillary nodes containers expect, and `status`.

One open() of a device node is one session: frames come in by write(), replies go out by read(). Nodes are
regular files opened with direct_io (no page cache, so every write and read reaches us, and big writes arrive
as 1 MiB pieces at increasing offsets) and nonseekable (offsets mean nothing on a channel).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pyfuse3
import structlog
import trio

from interposer import wire
from interposer.session import Handler, answer_async
from interposer.topology import Topology, VirtualNPU
from interposer.translate import Translator, VersionOnly
from interposer.wire import FrameBuffer, Record
from npu.errors import FlexNPUError

log = structlog.get_logger()

ROOT = pyfuse3.ROOT_INODE
STATUS_INODE = ROOT + 1
ANCILLARY = ("davinci_manager", "devmm_svm", "hisi_hdc")
FIRST_ANCILLARY_INODE = ROOT + 2
FIRST_DEVICE_INODE = ROOT + 16
STATUS_NAME = "status"


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


@dataclass(eq=False)
class Channel:
    """One open device node: reassembles frames, runs them, queues the replies for read()."""

    handler: Handler
    log: structlog.typing.FilteringBoundLogger
    frames: FrameBuffer = field(default_factory=FrameBuffer)
    spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None  # start a task in the daemon's nursery
    replies: list[bytes | memoryview] = field(default_factory=list)
    deferred: list[list[Record]] = field(default_factory=list)  # asynchronous-only frames not yet run
    writing: bool = False
    done_writing: trio.Event | None = None  # made only when a second writer has to wait

    async def write(self, data: bytes) -> None:
        # Writes to one channel must not interleave while one waits on the device. This is a lock whose
        # uncontended path costs a flag (a trio.Lock costs a few us per call, a large part of a round trip).
        while self.writing:
            self.done_writing = self.done_writing or trio.Event()
            await self.done_writing.wait()
        self.writing = True
        try:
            self._run_deferred()
            for count, body in self.frames.feed(data):
                records = wire.decode_records(count, body)  # a malformed frame fails its own write
                if self.spawn is not None and not any(r.command.sync for r in records):
                    # Nobody waits for an answer: let the write return now and run the records right after,
                    # so the client encodes its next batch while the daemon translates this one.
                    self.deferred.append(records)
                    self.spawn(self._run_deferred_soon)
                    continue
                reply = await answer_async(self.handler, records)
                if reply is not None:
                    self.replies += reply
        except FlexNPUError as exc:
            # Drop the bad frame and whatever followed it in this write. The write fails with EINVAL; the
            # explanation waits in a reply (seq 0) for a client that wants to tell its user what was wrong.
            self.log.warning("frame_refused", error=exc.message)
            self.frames = FrameBuffer()
            self.replies += wire.frame(wire.encode_reply(0, exc.code, exc.message.encode()), 1)
            raise
        finally:
            self.writing = False
            if self.done_writing is not None:
                self.done_writing.set()
                self.done_writing = None

    def _run_deferred(self) -> None:
        """Run deferred frames in arrival order; a later write runs them first itself if it gets there first.
        Asynchronous records never wait, so this runs to completion without yielding to other tasks."""
        while self.deferred:
            for record in self.deferred.pop(0):
                self.handler.execute(record)

    async def _run_deferred_soon(self) -> None:
        self._run_deferred()

    def close(self) -> None:
        self.deferred.clear()
        self.handler.close()

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of queued replies; the client reads until it has a whole frame."""
        if len(self.replies) == 1 and len(self.replies[0]) <= size:  # the usual: one small reply, whole
            return bytes(self.replies.pop())
        out = []
        while self.replies and size > 0:
            head = self.replies[0]
            if len(head) <= size:
                out.append(self.replies.pop(0))
            else:
                head = memoryview(head)
                out.append(head[:size])
                self.replies[0] = head[size:]
            size -= len(out[-1])
        return b"".join(out)


class DeviceFS(pyfuse3.Operations):
    def __init__(self, topology: Topology, info: dict) -> None:
        super().__init__()
        self.topology = topology
        self.info = info  # daemon facts for the status file: pid, mount point, config source
        self.started = time.time()
        self.names: dict[bytes, int] = {STATUS_NAME.encode(): STATUS_INODE}
        self.names |= {n.encode(): FIRST_ANCILLARY_INODE + i for i, n in enumerate(ANCILLARY)}
        self.devices: dict[int, VirtualNPU] = {}
        for i, vdev in enumerate(topology.virtual):
            self.names[vdev.name.encode()] = FIRST_DEVICE_INODE + i
            self.devices[FIRST_DEVICE_INODE + i] = vdev
        self.open_files: dict[int, Channel | bytes] = {}
        self._next_fh = 1
        self.spawn: Callable | None = None  # set by the daemon once its nursery is open

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
            content: Channel | bytes = self.status_bytes()
        elif inode in self.devices:
            translator = Translator(self.devices[inode], pid=ctx.pid)
            content = Channel(translator, translator.log, spawn=self.spawn)
        elif FIRST_ANCILLARY_INODE <= inode < FIRST_ANCILLARY_INODE + len(ANCILLARY):
            name = ANCILLARY[inode - FIRST_ANCILLARY_INODE]
            content = Channel(VersionOnly(name), log.bind(pid=ctx.pid, device=name))
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self.open_files[fh] = content
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=inode != STATUS_INODE)

    @fuse_handler
    async def write(self, fh, off, buf):
        channel = self.open_files.get(fh)
        if not isinstance(channel, Channel):
            raise pyfuse3.FUSEError(errno.EBADF)
        await channel.write(buf)
        return len(buf)

    @fuse_handler
    async def read(self, fh, off, size):
        content = self.open_files.get(fh)
        if isinstance(content, bytes):
            return content[off : off + size]
        if content is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return content.read(size)

    @fuse_handler
    async def release(self, fh):
        content = self.open_files.pop(fh, None)
        if isinstance(content, Channel):
            content.close()

    @fuse_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)  # O_TRUNC on a device node: nothing to truncate

    def status_bytes(self) -> bytes:
        status = {"daemon": {**self.info, "uptime_s": round(time.time() - self.started, 1)}}
        status |= self.topology.status()
        return json.dumps(status, indent=1).encode() + b"\n"
