"""One open device node: frames in by write(), replies out by read(), within the session's buffer limits.

A write() is a frame: FUSE keeps write boundaries, except that it cuts a write bigger than its maximum write
size (1 MiB) into pieces. A piece ends where the request's 256 page slots run out: 1 MiB less the buffer's
offset in its first page for one buffer, less for a writev of many small buffers. So a write may end inside a
frame only if it started that frame (or continues it) and is big enough to be such a piece; any other write
that leaves a frame unfinished is a truncated frame, or one whose header gives the wrong length, and is
refused with EINVAL. A write that starts with a frame header while a frame is unfinished starts afresh (the
unfinished one was cut short by its writer). Either way one bad write never swallows the frames after it.

The first piece of a big frame reserves the whole frame in the session's buffer limits. A refusal must come
there: once FUSE has passed on one piece of a write, a later piece's error only makes the write() short,
which tells the writer nothing.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio

from interposer import wire
from interposer.session import Handler, answer_async
from interposer.wire import FrameBuffer, Op, Record
from npu.errors import FlexNPUError, ProtocolError
from vdevfs.limits import BufferAccount, BufferFull

# The shortest write that may end inside a frame. The client's own pieces are far longer: a big frame is one
# buffer, or a writev of a few headers and the bulk data, or of over 64 KiB in at most 1024 buffers.
MIN_PIECE = mmap.PAGESIZE
REPLY_ROOM = 512  # kept for each synchronous record's reply: a header and an error message
FRAME_START = wire.MAGIC + wire.PROTOCOL_VERSION.to_bytes(2, "little")


@dataclass(eq=False)
class Channel:
    handler: Handler
    log: structlog.typing.FilteringBoundLogger
    account: BufferAccount  # what this session holds here: the unfinished frame, unread replies
    spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None  # start a task in the daemon's nursery
    frames: FrameBuffer = field(default_factory=FrameBuffer)
    partial: int = 0  # the size of the unfinished frame, reserved by its first piece
    replies: list[bytes | memoryview] = field(default_factory=list)
    queued: int = 0  # bytes in replies
    deferred: list[list[Record]] = field(default_factory=list)  # asynchronous-only frames not yet run
    writing: bool = False
    done_writing: trio.Event | None = None  # made only when a second writer has to wait

    def __post_init__(self) -> None:
        self.execute = self.handler.execute  # the session logic drives this channel as its Handler

    async def write(self, data: bytes) -> None:
        # Writes to one channel must not interleave while one waits on the device. This is a lock whose
        # uncontended path costs a flag (a trio.Lock costs a few us per call, a large part of a round trip).
        while self.writing:
            self.done_writing = self.done_writing or trio.Event()
            await self.done_writing.wait()
        self.writing = True
        try:
            self._run_deferred()
            if self.partial and data[: len(FRAME_START)] == FRAME_START:
                self.log.warning("frame_abandoned", announced=self.partial, reason="a new frame began")
                self._drop_partial()
            if not self.partial and len(data) >= MIN_PIECE:  # maybe the first piece of a big frame
                _, length = wire.check_header(data)
                if wire.FRAME_HEADER_SIZE + length > len(data):
                    self.account.check(wire.FRAME_HEADER_SIZE + length, "this frame")
                    self.partial = wire.FRAME_HEADER_SIZE + length
                    self.account.add(self.partial)
            complete = self.frames.feed(data)
            pending = self.frames.pending
            if pending and (not self.partial or len(data) < MIN_PIECE):
                raise ProtocolError(
                    f"truncated frame: the write ended {pending} bytes into a frame whose header announces "
                    "more; write each frame whole, with the length its header gives"
                )
            if not pending and self.partial:  # the big frame is complete
                self.account.add(-self.partial)
                self.partial = 0
            for count, body in complete:
                await self._run(wire.decode_records(count, body))  # a malformed frame fails its own write
        except FlexNPUError as exc:
            # Drop the bad frame and whatever followed it in this write. The write fails with EINVAL; the
            # explanation waits in a reply (seq 0), if it fits, for a client that wants to tell its user.
            self.log.warning("frame_refused", error=exc.message)
            self._drop_partial()
            explanation = wire.frame(wire.encode_reply(0, exc.code, exc.message.encode()), 1)
            with contextlib.suppress(BufferFull):  # a client that never reads gets no more of them
                self.account.check(sum(len(p) for p in explanation), "the explanation")
                self._queue(explanation)
            raise
        finally:
            self.writing = False
            if self.done_writing is not None:
                self.done_writing.set()
                self.done_writing = None

    async def _run(self, records: list[Record]) -> None:
        if self.spawn is not None and not records[-1].command.sync and not any(r.command.sync for r in records):
            # Nobody waits for an answer: let the write return now and run the records right after, so the
            # client encodes its next batch while the daemon translates this one.
            self.deferred.append(records)
            self.spawn(self._run_deferred_soon)
            return
        room = 0  # kept for the reply: the bytes of blocking device-to-host copies, and a little per record
        for record in records:
            if record.command.op is Op.MEMCPY_D2H:
                room += record.args.count
        if room or self.queued:  # a client that reads its replies asks for no room otherwise: keep its path short
            room += REPLY_ROOM * len(records)
            self.account.check(room, "the reply to this frame")
            self.account.add(room)
        try:
            reply = await answer_async(self, records)
        finally:
            if room:
                self.account.add(-room)
        if reply is not None:
            self._queue(reply)

    def _queue(self, reply: wire.Parts) -> None:
        self.replies += reply
        size = len(reply[0]) if len(reply) == 1 else sum(len(p) for p in reply)
        self.queued += size
        self.account.add(size)

    def _drop_partial(self) -> None:
        self.frames = FrameBuffer()
        self.account.add(-self.partial)
        self.partial = 0

    def take_deliveries(self) -> list[tuple[int, bytes]]:
        """The translator's, now becoming part of a reply (queued, so no longer counted as deliveries)."""
        taken = self.handler.take_deliveries()
        if taken:
            size = sum(len(data) for _, data in taken)
            self.account.delivering -= size
            self.account.add(-size)
        return taken

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
        self.frames = FrameBuffer()  # most of a 256 MiB frame, maybe: free it now, not at some later GC
        self.replies.clear()
        self.handler.close()
        self.account.close()

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of queued replies; the client reads until it has a whole frame."""
        if len(self.replies) == 1 and len(self.replies[0]) <= size:  # the usual: one small reply, whole
            out = bytes(self.replies.pop())
        else:
            parts = []
            while self.replies and size > 0:
                head = self.replies[0]
                if len(head) <= size:
                    parts.append(self.replies.pop(0))
                else:
                    head = memoryview(head)
                    parts.append(head[:size])
                    self.replies[0] = head[size:]
                size -= len(parts[-1])
            out = b"".join(parts)
        self.queued -= len(out)
        self.account.add(-len(out))
        return out
