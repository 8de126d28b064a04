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

write() never waits on the device. The kernel serialises direct writes per inode (it holds the inode's lock
until the daemon answers the write), and every process using a virtual NPU shares its node: a write that
waited for a long synchronize held up every other session's open + HELLO on that node until it finished. So
a write decodes its frames and runs them as far as they go without waiting; a frame that must wait on the
device (a synchronize, a blocking copy behind queued work) goes on in a task of its own, and read() waits
for its reply instead (direct-io reads take no inode lock). Frames of one session still run strictly in
order: a frame written while an earlier one waits is queued behind it, counted in the session's buffer limit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field

import structlog
import trio

from interposer import wire
from interposer.session import Handler, answer
from interposer.translate import Wait
from interposer.wire import FrameBuffer, Op, Record
from npu.errors import AclError, FlexNPUError, ProtocolError
from vdevfs.limits import BufferAccount, BufferFull

# The shortest write that may end inside a frame. The client's own pieces are far longer: a big frame is one
# buffer, or a writev of a few headers and the bulk data, or of over 64 KiB in at most 1024 buffers.
MIN_PIECE = mmap.PAGESIZE
REPLY_ROOM = 512  # kept for each synchronous record's reply: a header and an error message
FRAME_START = wire.MAGIC + wire.PROTOCOL_VERSION.to_bytes(2, "little")
Answering = Generator[Wait, None, "wire.Parts | None"]  # interposer.session.answer(), part way through


class ReadBusy(FlexNPUError):
    errno = errno.EBUSY


@dataclass(eq=False)
class Channel:
    handler: Handler
    log: structlog.typing.FilteringBoundLogger
    account: BufferAccount  # what this session holds here: the unfinished frame, unread replies, queued frames
    spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None  # start a task in the daemon's nursery
    frames: FrameBuffer = field(default_factory=FrameBuffer)
    partial: int = 0  # the size of the unfinished frame, reserved by its first piece
    replies: list[bytes | memoryview] = field(default_factory=list)
    queued: int = 0  # bytes in replies
    backlog: deque[tuple[list[Record], int]] = field(default_factory=deque)  # frames not yet run, bytes held
    waiting: bool = False  # a frame is waiting on the device, in a task of its own
    closed: bool = False
    arrived: trio.Event | None = None  # made only when a reader has to wait for a reply
    on_reply: Callable[[], None] | None = None  # told once a reply (or the end of a wait) comes: a poll's handle
    _scope: trio.CancelScope | None = None  # the waiting task's, cancelled by close()

    def __post_init__(self) -> None:
        self.execute = self.handler.execute  # the session logic drives this channel as its Handler

    def write(self, data: bytes) -> None:
        """Take a write: whole frames are run now as far as they go without waiting on the device (never
        longer: see the module's docstring); errors in the framing, or past the buffer limits, raise here."""
        try:
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
                self._take(wire.decode_records(count, body), len(body))  # a malformed frame fails its own write
        except FlexNPUError as exc:
            # Drop the bad frame and whatever followed it in this write. The write fails with EINVAL; the
            # explanation waits in a reply (seq 0), if it fits, for a client that wants to tell its user.
            self.log.warning("frame_refused", error=exc.message)
            self._drop_partial()
            explanation = wire.frame(wire.encode_reply(0, exc.code, exc.message.encode()), 1)
            with contextlib.suppress(BufferFull):  # a client that never reads gets no more of them
                self.account.check(sum(len(p) for p in explanation), "the explanation")
                self._queue(explanation)
                self._wake()
            raise

    def _take(self, records: list[Record], size: int) -> None:
        room = 0  # kept for the reply: the bytes of blocking device-to-host copies, and a little per record
        for record in records:
            if record.command.op is Op.MEMCPY_D2H:
                room += record.args.count
        if self.waiting:
            # Behind a frame that waits on the device: queued in order, its bytes and its reply's room counted.
            held = size + room + REPLY_ROOM * len(records)
            self.account.check(held, "this frame, queued behind one still waiting on the device")
            self.account.add(held)
            self.backlog.append((records, held))
            return
        if self.spawn is not None and not records[-1].command.sync and not any(r.command.sync for r in records):
            # Nobody waits for an answer: let the write return now and run the records right after, so the
            # client encodes its next batch while the daemon translates this one (a later write or read runs
            # them first itself if it gets there first).
            self.backlog.append((records, 0))
            self.spawn(self._run_backlog_soon)
            return
        self._run_backlog()
        if self.waiting:  # an earlier frame had to wait after all: this one queues behind it
            self._take(records, size)
            return
        if room or self.queued:  # a client that reads its replies asks for no room otherwise: keep its path short
            room += REPLY_ROOM * len(records)
            self.account.check(room, "the reply to this frame")
            self.account.add(room)
        self._drive(answer(self, records), room, records)

    def _drive(self, steps: Answering, held: int, records: list[Record], failure: Exception | None = None) -> None:
        """Run a frame's answer until it is done, or must wait on the device: then a task waits for it."""
        try:
            wait = steps.throw(failure) if failure is not None else next(steps)
            while wait.done():  # done already (nothing queued ahead of it): no task, no wait
                wait = steps.send(None)
        except StopIteration as stop:
            self._answered(held, stop.value)
            return
        except Exception as exc:  # a bug: this frame fails, the session and the daemon go on
            seq = next((r.seq for r in reversed(records) if r.command.sync), records[-1].seq)
            self.log.exception("frame_crashed", seq=seq)
            message = f"the daemon failed answering this frame ({exc!r}); the daemon log has the traceback"
            self._answered(held, wire.frame(wire.encode_reply(seq, AclError.INTERNAL_ERROR, message.encode()), 1))
            return
        if self.spawn is None:
            raise RuntimeError("a channel without a nursery to wait in was asked to wait on the device")
        self.waiting = True
        self._scope = trio.CancelScope()  # now, not when the task starts: a close() before then must cancel it
        self.spawn(functools.partial(self._wait, steps, wait, held, records, self._scope))

    def _answered(self, held: int, reply: wire.Parts | None) -> None:
        if held:
            self.account.add(-held)
        if reply is not None:
            self._queue(reply)

    async def _wait(
        self, steps: Answering, wait: Wait, held: int, records: list[Record], scope: trio.CancelScope
    ) -> None:
        failure = None
        with scope:
            try:
                await wait.runner.wait_until(wait.done)
            except Exception as exc:  # a FlexNPUError becomes that record's error reply; a bug, the frame's
                failure = exc
        self._scope = None
        if self.closed:  # the session closed under the wait (its process was killed): nobody to answer
            steps.close()
            return
        self.waiting = False
        self._drive(steps, held, records, failure)
        self._run_backlog()
        self._wake()

    def _run_backlog(self) -> None:
        """Run queued frames in arrival order until one has to wait on the device."""
        while self.backlog and not self.waiting:
            records, held = self.backlog.popleft()
            self._drive(answer(self, records), held, records)

    async def _run_backlog_soon(self) -> None:
        if not self.waiting and not self.closed:
            self._run_backlog()
            self._wake()

    def _wake(self) -> None:
        if self.arrived is not None:
            self.arrived.set()
            self.arrived = None
        if self.on_reply is not None:
            notify, self.on_reply = self.on_reply, None
            with contextlib.suppress(OSError):  # the poller is gone (ENOENT): nobody to tell
                notify()

    def readable(self) -> bool:
        """Whether a read would return at once (a reply is there, or none is coming)."""
        return bool(self.replies) or not self.waiting

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

    def close(self) -> None:
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()
        self.backlog.clear()
        self.frames = FrameBuffer()  # most of a 256 MiB frame, maybe: free it now, not at some later GC
        self.replies.clear()
        self.handler.close()
        self.account.close()
        self._wake()

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes of queued replies, once there are any (or none is coming): the client reads until
        it has a whole frame. A read waits here while this session's frame waits on the device."""
        if not self.waiting:
            self._run_backlog()  # asynchronous frames a write left to run soon
        while not self.replies and self.waiting and not self.closed:
            if self.arrived is not None:
                # Every waiting read holds one of the daemon's FUSE workers: one per session, or a process with
                # many threads reading one file could take them all (a session's replies have one reader anyway).
                self.log.warning("read_refused", reason="another read of this session is waiting")
                raise ReadBusy(
                    f"{self.account.device}: another thread is already waiting for this session's reply; "
                    "read a session from one thread at a time (open the device again for a second session)"
                )
            self.arrived = trio.Event()
            await self.arrived.wait()
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
