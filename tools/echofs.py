"""The bare pyfuse3 baseline for `vdevctl bench rt`: one file that echoes each write back to the next read.

Same stack as the daemon (pyfuse3 on trio, direct_io, nonseekable), none of its work: the round trip through
a virtual device file is judged against this one. Run: python -m tools.echofs MOUNTPOINT
"""

from __future__ import annotations

import errno
import signal
import stat
import sys

import pyfuse3
import trio

ECHO_INODE = pyfuse3.ROOT_INODE + 1


class EchoFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, list[bytes]] = {}
        self.next_fh = 1

    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_nlink = 1
        attr.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o666)
        return attr

    async def lookup(self, parent_inode, name, ctx=None):
        if name != b"echo":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(ECHO_INODE)

    async def open(self, inode, flags, ctx):
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.pending[fh] = []
        return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=True)

    async def write(self, fh, off, buf):
        self.pending[fh].append(buf)
        return len(buf)

    async def read(self, fh, off, size):
        queue = self.pending[fh]
        if not queue:
            return b""
        head = queue[0]
        if len(head) <= size:
            return queue.pop(0)
        queue[0] = head[size:]
        return head[:size]

    async def release(self, fh):
        self.pending.pop(fh, None)


async def main(mountpoint: str) -> None:
    pyfuse3.init(EchoFS(), mountpoint, set(pyfuse3.default_options) | {"fsname=flexnpu-echo"})
    try:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
