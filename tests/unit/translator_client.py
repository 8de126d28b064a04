"""A client that drives a translator sans-IO, the way the shim would: records framed and decoded as on the wire,
answers decoded as the client decodes them; it remembers the handles and pointers it was given."""

from __future__ import annotations

from interposer import session, wire
from interposer.topology import VirtualNPU
from interposer.translate import Translator
from interposer.wire import COMMANDS, FrameBuffer, Op
from npu.errors import AclError


class Client:
    def __init__(self, vdev: VirtualNPU, pid: int = 1, buffers=None) -> None:
        self.translator = Translator(vdev, pid=pid, buffers=buffers)
        self.seq = 0
        self.handles: list[int] = [0]
        self.pointers: list[int] = []
        self.send(Op.HELLO, version=wire.PROTOCOL_VERSION, phase=0, pad=0, pid=pid)

    def send(self, op: Op, data: bytes = b"", **args) -> list[wire.Reply]:
        self.seq += 1
        frame = wire.frame(wire.encode_record(COMMANDS[op], self.seq, data, **args), 1)
        buffer = FrameBuffer()
        (count, body), = [f for part in frame for f in buffer.feed(part)]  # fmt: skip
        reply = session.answer_sync(self.translator, wire.decode_records(count, body))
        if reply is None:
            return []
        out = FrameBuffer()
        (_, reply_body), = [f for part in reply for f in out.feed(part)]  # fmt: skip
        replies = wire.decode_replies(reply_body)
        for r in replies:
            if r.status == AclError.SUCCESS and op in (Op.STREAM_CREATE, Op.EVENT_CREATE, Op.CONTEXT_CREATE):
                self.handles.append(COMMANDS[op].reply.parse(r.payload).handle)
            if r.status == AclError.SUCCESS and op is Op.MALLOC:
                self.pointers.append(COMMANDS[op].reply.parse(r.payload).ptr)
        return replies

    def call(self, op: Op, data: bytes = b"", **args):
        """A synchronous call: its one reply, parsed when it succeeded (status, fields or message)."""
        (reply,) = self.send(op, data, **args)
        if reply.status != AclError.SUCCESS:
            return reply.status, bytes(reply.payload).decode()
        return reply.status, COMMANDS[op].reply.parse(reply.payload)

    def ok(self, op: Op, data: bytes = b"", **args):
        """A synchronous call that must succeed: its reply's fields."""
        status, fields = self.call(op, data, **args)
        assert status == AclError.SUCCESS, fields
        return fields

    def read(self, ptr: int, count: int) -> bytes:
        """A blocking device-to-host copy that must succeed: the bytes."""
        (reply,) = self.send(Op.MEMCPY_D2H, dst=0, src=ptr, count=count)
        assert reply.status == AclError.SUCCESS, bytes(reply.payload)
        return bytes(reply.payload)
