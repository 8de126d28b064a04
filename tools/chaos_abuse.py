"""What `vdevctl bench chaos` throws at the daemon besides killing things: bad frames, sessions that fill
their buffers (unfinished frames, copies never read), and one tenant's attempts to hurt the others (graphs
that replay graphs, as many objects and sessions as it may hold, copies queued behind kernels) while another
process's client is timed (tools/chaos_bystander.py). Each helper says what the daemon must answer.

Pieces of a big frame are written from page-aligned buffers, so FUSE passes each on whole, as it passes the
1 MiB pieces of one big write.
"""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import interposer.shim
from interposer import limits, wire
from interposer.config import Config
from interposer.shim.flexnpu_client.client import FileTransport
from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import COMMANDS, Op
from npu.errors import AclError

DEVICES = ("davinci0", "davinci1")
MiB = 1 << 20
COPY = 16 * MiB  # each unread copy


def frame(op: Op, seq: int, **args) -> bytes:
    return b"".join(wire.frame(wire.encode_record(COMMANDS[op], seq, **args), 1))


def hello() -> bytes:
    return frame(Op.HELLO, 1, version=wire.PROTOCOL_VERSION, phase=0, pad=0, pid=0)


def header(length: int) -> bytes:
    return wire.FrameHeader.codec.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 0, 1, length)


def refused_then_served(node: Path, bad: bytes) -> str | None:
    """The bad write must fail with INVALID_PARAM and the next frame on the same file be answered."""
    transport = FileTransport(str(node))
    try:
        try:
            transport.send(bad)
            return "a bad frame was accepted"
        except AclCallError as exc:
            if exc.code != AclError.INVALID_PARAM:
                return f"bad frame: {int(exc.code)} {exc.message[:80]}"
        reply = wire.decode_replies(transport.call(hello()))[0]
        return None if reply.status == AclError.SUCCESS else f"next frame: status {reply.status}"
    finally:
        transport.close()


def unfinished_frame(node: Path, announced: int) -> tuple[int, bool]:
    """A session sending a frame that announces `announced` bytes, in 1 MiB pieces, all but the last. Returns
    its fd and whether a piece was refused with EINVAL."""
    fd = os.open(node, os.O_RDWR)
    piece = mmap.mmap(-1, MiB)
    piece[:16] = header(announced - wire.FRAME_HEADER_SIZE)
    try:
        for _ in range(announced // MiB - 1):
            os.write(fd, piece)
            piece[:16] = bytes(16)  # the body goes on
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return fd, True
    return fd, False


def unread_copies(transport: FileTransport, copies: int) -> int:
    """Ask for `copies` asynchronous 16 MiB device-to-host copies and a sync, and read nothing: only the buffer
    limits hold the copies back. Returns the device address copied from."""
    transport.call(hello())
    reply = wire.decode_replies(transport.call(frame(Op.MALLOC, 2, size=COPY, policy=0)))[0]
    ptr = COMMANDS[Op.MALLOC].reply.parse(reply.payload).ptr
    transport.call(frame(Op.MEMSET, 3, ptr=ptr, value=7, count=COPY))  # so its pages are real
    d2h = COMMANDS[Op.MEMCPY_D2H_ASYNC]
    parts = [p for i in range(copies) for p in wire.encode_record(d2h, 4 + i, stream=0, dst=0, src=ptr, count=COPY)]
    parts += wire.encode_record(COMMANDS[Op.DEVICE_SYNC], 4 + copies)
    os.write(transport.fd, b"".join(wire.frame(parts, copies + 1)))
    return ptr


def free(transport: FileTransport, ptr: int) -> None:
    os.write(transport.fd, frame(Op.FREE, 1000, ptr=ptr))


def read_frame(fd: int) -> list[wire.Reply]:
    _, length = wire.check_header(os.read(fd, wire.FRAME_HEADER_SIZE))
    body = bytearray()
    while len(body) < length:
        body += os.read(fd, length - len(body))
    return wire.decode_replies(memoryview(body))


class Vandal:
    """The abuse of one second: a bad frame, or a session's buffer filled until refused. Counts what went
    otherwise than it must."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.done: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.acts = itertools.cycle(["garbage", "wrong_length", "oversized", "unfinished_frame", "unread_copies"])

    def act(self) -> None:
        kind = next(self.acts)
        node = self.mount / random.choice(DEVICES)
        try:
            problem = getattr(self, kind)(node)
        except (OSError, AclCallError) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:100]
        self.done[kind] += 1
        if problem is not None:
            self.unexpected[f"{kind}: {problem}"] += 1

    def garbage(self, node: Path) -> str | None:
        return refused_then_served(node, random.randbytes(200))

    def wrong_length(self, node: Path) -> str | None:
        return refused_then_served(node, header(len(hello())) + hello()[16:])

    def oversized(self, node: Path) -> str | None:
        return refused_then_served(node, header(2 << 30))

    def unfinished_frame(self, node: Path) -> str | None:
        fd, refused = unfinished_frame(node, Config.session_buffer + MiB)
        os.close(fd)
        return None if refused else "a frame past the session's buffer limit was taken"

    def unread_copies(self, node: Path) -> str | None:
        transport = FileTransport(str(node))
        try:
            ptr = unread_copies(transport, Config.session_buffer // COPY + 2)
            sync = read_frame(transport.fd)[-1]
            free(transport, ptr)
            if sync.status != AclError.RT_OVER_LIMIT:
                return f"copies past the session's buffer limit: sync answered {sync.status}"
            return None
        finally:
            transport.close()


# -- one tenant against the others (issue 15) ------------------------------------------------------------------

SHIM = str(Path(interposer.shim.__file__).parent)
BYSTANDER = Path(__file__).with_name("chaos_bystander.py")
FP16, ND = 1, 2


class Bystander:
    """Another process's client on `node`, timing memset + synchronize from start() until stop()."""

    def __init__(self, node: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BYSTANDER), SHIM, str(node), "3600"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the bystander did not start: {self.proc.stderr.read()[-500:]}")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out, err = self.proc.communicate(timeout=60)
        if self.proc.returncode:
            raise RuntimeError(f"the bystander failed: {err[-500:]}")
        return json.loads(out.strip().splitlines()[-1])


def _runtime(node: Path) -> Runtime:
    rt = Runtime(devices=[str(node)])
    rt.set_device(0)
    return rt


def graph_amplification(node: Path) -> dict:
    """Capture a graph of two Adds, then graphs that each replay the one before twice, until refused; then
    launch the largest 4 times and synchronize. The daemon must refuse the level past GRAPH_TASKS tasks with
    ACL_ERROR_RT_STREAM_TASK_FULL, and a queue past QUEUED_TASKS the same way."""
    rt = _runtime(node)
    client = rt.client()
    try:
        x = (FP16, ND, (16,), rt.malloc(32, 0))
        stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)

        def capture(body) -> tuple[int, int]:
            client.call(Op.GRAPH_CAPTURE_BEGIN, stream=stream, mode=0)
            body()
            reply = client.call(Op.GRAPH_CAPTURE_END, stream=stream)
            if reply.status != AclError.SUCCESS:
                return 0, reply.status
            return COMMANDS[Op.GRAPH_CAPTURE_END].reply.parse(reply.payload).handle, 0

        levels = [capture(lambda: [rt.launch("Add", [x, x], [x], {}, stream) for _ in range(2)])[0]]
        t = time.perf_counter()
        for _ in range(30):  # 2**31 tasks, were nothing refused
            below = levels[-1]
            graph, refused = capture(
                lambda b=below: [client.submit(Op.GRAPH_LAUNCH, graph=b, stream=stream) for _ in range(2)]
            )
            if not graph:
                break
            levels.append(graph)
        captured_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(4):
            client.submit(Op.GRAPH_LAUNCH, graph=levels[-1], stream=stream)
        synced = client.call(Op.STREAM_SYNC, handle=stream).status
        return {
            "levels": len(levels),
            "largest_tasks": 2 ** len(levels),
            "refused": int(refused),
            "capture_s": captured_s,
            "launches_then_sync_s": time.perf_counter() - t,
            "sync": int(synced),
        }
    finally:
        rt.reset_device(0, force=True)


def objects(node: Path, events: int) -> dict:
    """Streams until refused, then up to `events` events (all of them: until refused)."""
    rt = _runtime(node)
    client = rt.client()
    try:
        streams = 1  # the default stream
        while (reply := client.call(Op.STREAM_CREATE, priority=0, flag=0)).status == AclError.SUCCESS:
            streams += 1
        stream_refusal = reply.status
        made, event_refusal = 0, 0
        while made < events:
            reply = client.call(Op.EVENT_CREATE)
            if reply.status != AclError.SUCCESS:
                event_refusal = reply.status
                break
            made += 1
        t = time.perf_counter()
        (node.parent / "status").read_bytes()
        return {
            "streams": streams,
            "stream_refused": int(stream_refusal),
            "events": made,
            "event_refused": int(event_refusal),
            "status_s": time.perf_counter() - t,
        }
    finally:
        rt.reset_device(0, force=True)


def sessions(node: Path) -> dict:
    """Open the node until the daemon refuses this user another session."""
    fds: list[int] = []
    refused = 0
    try:
        while len(fds) < 100_000:
            try:
                fds.append(os.open(node, os.O_RDWR))
            except OSError as exc:
                refused = exc.errno
                break
        return {"sessions": len(fds), "refused": errno.errorcode.get(refused, str(refused))}
    finally:
        for fd in fds:
            os.close(fd)


def queued_copies(node: Path, copy: int = 16 * MiB) -> dict:
    """Asynchronous host-to-device copies queued behind kernels (40 MatMuls of 16384^3, ~1 s modeled on a 910B2
    in timing mode) until refused: their bytes count against the session's buffers (Config.session_buffer)."""
    rt = _runtime(node)
    client = rt.client()
    try:
        big = 16384
        a = (FP16, ND, (big, big), rt.malloc(big * big * 2, 0))
        dst = rt.malloc(copy, 0)
        stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)
        for _ in range(40):
            rt.launch("MatMulV2", [a, a], [a], {}, stream)
        data = bytes(copy)
        accepted, refused = 0, 0
        for _ in range(2 * Config.session_buffer // copy):
            try:
                client.submit(Op.MEMCPY_H2D_ASYNC, data, dst=dst, src=0, count=copy, stream=stream)
                client.flush()
            except AclCallError as exc:
                refused = exc.code
                break
            accepted += 1
        held = json.loads((node.parent / "status").read_text())["daemon"]["buffers"]["held"]
        synced = client.call(Op.STREAM_SYNC, handle=stream).status
        return {"copies": accepted, "refused": int(refused), "held_MiB": held / MiB, "sync": int(synced)}
    finally:
        rt.reset_device(0, force=True)


TENANT_LIMITS = {"graph_tasks": limits.GRAPH_TASKS, "queued_tasks": limits.QUEUED_TASKS}
