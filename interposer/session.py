"""The transport-independent half of a session: frames in, reply frames out.

`answer(handler, records)` is a generator that yields each Wait the translator asks for and returns the
reply frame (or None when the frame held only asynchronous records). Direct mode drives it with the calling
thread (`answer_sync`); the FUSE transport with trio (vdevfs/channel.py: inside write() as far as it goes
without waiting, the rest in a task that read() waits for), so both run exactly the same protocol logic.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

from interposer import wire
from interposer.translate import Answer, Wait, error_answer
from interposer.wire import Record
from npu.errors import FlexNPUError


class Handler(Protocol):
    def execute(self, record: Record) -> Answer | Wait | None: ...

    def take_deliveries(self) -> list[tuple[int, bytes]]: ...

    def close(self) -> None: ...


def answer(handler: Handler, records: list[Record]) -> Generator[Wait, None, wire.Parts | None]:
    parts: wire.Parts = []
    replies = 0
    for record in records:
        result = handler.execute(record)
        if isinstance(result, Wait):
            try:
                yield result
            except FlexNPUError as exc:  # the wait itself failed (it can never finish): answer with that
                result = error_answer(exc.code, exc.message)
            else:
                result = result.then()
        if result is None:
            continue
        for seq, data in handler.take_deliveries():
            parts += wire.encode_reply(seq, 0, data)
            replies += 1
        parts += wire.encode_reply(record.seq, result.status, result.payload)
        replies += 1
    if not replies:
        return None
    reply = wire.frame(parts, replies)
    return [b"".join(reply)] if sum(len(p) for p in reply) <= SMALL_REPLY else reply


SMALL_REPLY = 4096  # a reply frame this small is joined: one buffer to hand over beats several


def answer_sync(handler: Handler, records: list[Record]) -> wire.Parts | None:
    steps = answer(handler, records)
    try:
        wait = next(steps)
        while True:
            try:
                wait.runner.wait_until(wait.done)
            except FlexNPUError as exc:
                wait = steps.throw(exc)
            else:
                wait = steps.send(None)
    except StopIteration as stop:
        return stop.value
