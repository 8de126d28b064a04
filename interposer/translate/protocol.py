"""What every record meets: answers and waits, HELLO (the session's phase, declared on each of its streams) and
VERSION, contexts, the room for a session's objects, and the ancillary nodes that answer VERSION only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import structlog

from interposer import limits, wire
from interposer.handles import Kind
from interposer.limits import TooMany
from interposer.wire import Op, Record
from npu.errors import AclError, InvalidParam, NotSupported
from scheduler import phase
from scheduler.runner import Runner
from scheduler.stream import Phase, PhaseSource, Stream

if TYPE_CHECKING:
    from interposer.translate import Translator

log = structlog.get_logger()

DAEMON_VERSION = "flexnpu 0.1.0"
PHASES = {0: Phase.UNKNOWN, 1: Phase.PREFILL, 2: Phase.DECODE}


class Answer(NamedTuple):  # one per synchronous call: a NamedTuple builds at a third of a frozen dataclass's cost
    status: int = AclError.SUCCESS
    payload: bytes | memoryview = b""


@dataclass(frozen=True, slots=True)
class Wait:
    runner: Runner
    done: Callable[[], bool]
    then: Callable[[], Answer]


OK = Answer()


def ok(command: wire.Command, **fields) -> Answer:
    return Answer(AclError.SUCCESS, command.reply.build(fields))


def error_answer(code: int, message: str) -> Answer:
    return Answer(code, message.encode())


def version_answer() -> Answer:
    return ok(wire.COMMANDS[Op.VERSION], version=wire.PROTOCOL_VERSION, daemon=DAEMON_VERSION)


def session_phase(session: Translator) -> Phase:
    return session.vdev.role if session.vdev.role is not Phase.UNKNOWN else session.phase


def declare(session: Translator, stream: Stream) -> None:
    if session.vdev.role is not Phase.UNKNOWN:
        phase.declare(stream, session.vdev.role, PhaseSource.ROLE)
    else:
        phase.declare(stream, session.phase, PhaseSource.CLIENT)


def room(session: Translator, kind: Kind, limit: int, code: AclError, what: str, more: int = 0) -> None:
    """Refuse a new object of `kind` once the session holds `limit` (with `more` on the way)."""
    held = session.handles.count(kind) + more
    if held >= limit:
        raise TooMany(
            f"{what}: this process holds {held} {kind.name.lower().replace('_', ' ')}s on {session.vdev.name}, as "
            f"many as one process may (as on a real device); destroy some first",
            code,
        )


def hello(session: Translator, seq, args, data):
    if args.version != wire.PROTOCOL_VERSION:
        raise InvalidParam(f"protocol version mismatch: client speaks {args.version}, daemon {wire.PROTOCOL_VERSION}")
    declared = PHASES.get(args.phase)
    if declared is None:
        raise InvalidParam(f"HELLO phase {args.phase} is not 0 (unknown), 1 (prefill) or 2 (decode)")
    session.phase, session.greeted = declared, True
    session.pid = session.pid or args.pid
    declare(session, session.default_stream)
    session.log = log.bind(session=session.id, pid=session.pid, device=session.vdev.name)
    session.log.info("session_opened", phase=session_phase(session).value)
    return ok(
        wire.COMMANDS[Op.HELLO],
        version=wire.PROTOCOL_VERSION,
        total_memory=session.vdev.quota,
        name=session.vdev.name,
        chip=session.vdev.physical.npu.profile.name,
    )


def version(session: Translator, seq, args, data):
    return version_answer()


def context_create(session: Translator, seq, args, data):
    room(session, Kind.CONTEXT, limits.CONTEXTS, AclError.RT_NO_STREAM_RESOURCE, "create_context")
    return ok(wire.COMMANDS[Op.CONTEXT_CREATE], handle=session.handles.add(Kind.CONTEXT, object()))


def context_destroy(session: Translator, seq, args, data):
    session.handles.remove(args.handle, Kind.CONTEXT)
    return OK


class VersionOnly:
    """The ancillary nodes (davinci_manager, devmm_svm, hisi_hdc): present for containers, answer VERSION only."""

    def __init__(self, name: str) -> None:
        self.name = name

    def execute(self, record: Record) -> Answer:
        if record.command.op is Op.VERSION:
            return version_answer()
        exc = NotSupported(f"{self.name} answers only VERSION; open a davinciN node for {record.command.op.name}")
        return error_answer(exc.code, exc.message) if record.command.sync else None

    def take_deliveries(self) -> list[tuple[int, bytes]]:
        return []

    def close(self) -> None:
        pass
