"""Messages between vdevfsd and its NPU processes: pickled Python values, length-prefixed on a Unix stream socket,
with file descriptors riding along (SCM_RIGHTS: the shared memory of IPC exports).

Both ends are this project's own processes, made by vdevfsd on a socketpair nobody else can reach, so pickle is
safe here and spares a schema for the status dicts and commands. An NPU process calls vdevfsd synchronously
(`Caller`: its event loop stops for a call, which only rare IPC calls make, and vdevfsd never waits on an NPU
process to answer one: no cycle, no deadlock); vdevfsd talks to an NPU process asynchronously (`Peer`).
"""

from __future__ import annotations

import array
import pickle
import socket
import struct

import trio

HEADER = struct.Struct("<II")  # payload bytes, file descriptors attached
MAX_FDS = 16


class LinkClosed(Exception):
    """The other end is gone."""


def _pack(message: object, fds: list[int]) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload), len(fds)) + payload


def _fds(ancillary: list) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class Caller:
    """A blocking request/answer channel (the NPU process's side of its exchange with vdevfsd)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def call(self, message: object, fds: tuple[int, ...] = ()) -> tuple[object, list[int]]:
        data = _pack(message, list(fds))
        try:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
            return self.receive()
        except OSError as exc:
            raise LinkClosed(str(exc)) from None

    def receive(self) -> tuple[object, list[int]]:
        header, ancillary, _, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
        if len(header) < HEADER.size:
            header += self._exactly(HEADER.size - len(header))
        size, _ = HEADER.unpack(header)
        return pickle.loads(self._exactly(size)), _fds(ancillary)

    def _exactly(self, n: int) -> bytes:
        parts = []
        while n:
            part = self.sock.recv(n)
            if not part:
                raise LinkClosed("the other end closed the link")
            parts.append(part)
            n -= len(part)
        return b"".join(parts)


class Peer:
    """One end of a link in a trio loop: send messages, receive them (one receiver at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self._sending = trio.Lock()

    async def send(self, message: object, fds: list[int] | tuple[int, ...] = ()) -> None:
        data = _pack(message, list(fds))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        async with self._sending:
            try:
                sent = await self.sock.sendmsg([data], ancillary)
                if sent < len(data):
                    await self._send_all(memoryview(data)[sent:])
            except OSError as exc:
                raise LinkClosed(str(exc)) from None

    async def _send_all(self, data: memoryview) -> None:
        while data:
            sent = await self.sock.send(data)
            data = data[sent:]

    async def receive(self) -> tuple[object, list[int]]:
        """The next message and the descriptors that came with it; LinkClosed at the end."""
        try:
            header, ancillary, _, _ = await self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
            if len(header) < HEADER.size:
                header += await self._exactly(HEADER.size - len(header))
            size, _ = HEADER.unpack(header)
            return pickle.loads(await self._exactly(size)), _fds(ancillary)
        except OSError as exc:
            raise LinkClosed(str(exc)) from None

    async def _exactly(self, n: int) -> bytes:
        parts = []
        while n:
            part = await self.sock.recv(min(n, 1 << 20))
            if not part:
                raise LinkClosed("the other end closed the link")
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        self.sock.close()
