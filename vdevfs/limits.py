"""Limits on the bytes the daemon holds for its clients outside device memory.

No device-memory quota sees these bytes: replies a client has not read yet (a device-to-host copy stays here
until read, even after the device memory is freed) and frames still arriving (a header may announce 256 MiB
and the rest trickle in). Without limits any user who may open a device node could fill the host, so every
session's bytes count against its own limit and, with every other session's, against the daemon's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
from dataclasses import dataclass

import structlog

from npu.errors import AclError, FlexNPUError

log = structlog.get_logger()

MiB = 1 << 20
# A session holding less than this is never refused for the daemon's sake: small calls go on, whatever other
# sessions hold (the daemon-wide limit can be overshot by this much per session, no more).
ALLOWANCE = 64 << 10


class BufferFull(FlexNPUError):
    """Refused like a malformed frame (EINVAL on the write), with the explanation in a reply for the client."""

    code = AclError.RT_OVER_LIMIT
    errno = errno.EINVAL


@dataclass(eq=False)
class BufferLimits:
    session: int  # bytes one session may have held at once ([daemon] session_buffer)
    total: int  # bytes all sessions together may have held ([daemon] daemon_buffer)
    held: int = 0

    def status(self) -> dict:
        return {"held": self.held, "session_limit": self.session, "daemon_limit": self.total}


@dataclass(eq=False)
class BufferAccount:
    """One session's held bytes: the channel adds to the figure as it changes and asks before taking more."""

    limits: BufferLimits
    device: str
    held: int = 0
    delivering: int = 0  # results of asynchronous copies admitted, not yet in a reply

    def check(self, extra: int, what: str) -> None:
        limits = self.limits
        if self.held + extra > limits.session:
            raise BufferFull(
                f"{self.device}: {what} ({_mib(extra)}) would take this session past its buffer limit of "
                f"{_mib(limits.session)} ({_mib(self.held)} already held in unread replies, unfinished frames, queued "
                "copies and captured graphs; [daemon] session_buffer): read the replies you asked for, synchronize, "
                "destroy graphs you no longer launch, or copy in smaller pieces"
            )
        if self.held + extra > ALLOWANCE and limits.held + extra > limits.total:
            raise BufferFull(
                f"{self.device}: {what} ({_mib(extra)}) does not fit in the daemon's buffers for all sessions "
                f"({_mib(limits.held)} of {_mib(limits.total)} held; [daemon] daemon_buffer): try again once "
                "other sessions have read their replies, or copy in smaller pieces"
            )

    def admit_delivery(self, seq: int, size: int) -> None:
        """The translator asks before it keeps an asynchronous copy's result; a refusal fails that copy.
        (The account, not the channel, answers: a translator holding its channel would make a cycle, and a
        closed channel's buffers would then wait for the garbage collector.)"""
        self.check(size, f"the result of asynchronous memcpy seq {seq}")
        self.delivering += size
        self.add(size)

    def add(self, n: int) -> None:
        """n more bytes held (fewer, if negative)."""
        self.held += n
        self.limits.held += n

    def close(self) -> None:
        self.add(-self.held)
        self.delivering = 0


# Sessions (open device files). No CANN figure: a real device has no session table to fill, but every session
# here costs the daemon memory and its status a line, so a user may hold SESSIONS_PER_USER at once and all users
# together SESSIONS (below the 65,535 session tags of the handle format, interposer/handles.py). What one session
# may hold is bounded in interposer/limits.py, so a user's worst case is SESSIONS_PER_USER times that.
SESSIONS_PER_USER = 64
SESSIONS = 4096


class SessionRefused(FlexNPUError):
    """open() of a device node refused: EUSERS (this user's limit) or ENFILE (the daemon's); the client maps both
    to ACL_ERROR_RT_OVER_LIMIT."""

    code = AclError.RT_OVER_LIMIT
    errno = errno.EUSERS


@dataclass(eq=False)
class Tenants:
    """Who holds the daemon's sessions: open device files per uid, each bounded."""

    per_user: int = SESSIONS_PER_USER
    total: int = SESSIONS

    def __post_init__(self) -> None:
        self.by_uid: dict[int, int] = {}
        self.owners: dict[object, int] = {}  # each open session (its channel) -> uid

    def admit(self, uid: int, device: str) -> None:
        """May `uid` open one more session? Raises SessionRefused (logged here) if not."""
        held = self.by_uid.get(uid, 0)
        if held >= self.per_user or len(self.owners) >= self.total:
            mine = held >= self.per_user
            exc = SessionRefused(
                f"{device}: uid {uid} has {held} sessions open, as many as one user may ({self.per_user})"
                if mine
                else f"{device}: the daemon serves {len(self.owners)} sessions, as many as it may ({self.total})"
            )
            if not mine:
                exc.errno = errno.ENFILE
            log.warning("session_refused", uid=uid, device=device, error=exc.message)
            raise exc

    def hold(self, session: object, uid: int) -> None:
        self.owners[session] = uid
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1

    def release(self, session: object) -> None:
        uid = self.owners.pop(session, None)
        if uid is not None:
            left = self.by_uid[uid] - 1
            if left:
                self.by_uid[uid] = left
            else:
                del self.by_uid[uid]

    def status(self) -> dict:
        return {"sessions": len(self.owners), "session_limit": self.total, "sessions_per_user_limit": self.per_user}


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system. glibc serves big blocks from the heap once it has freed a
    few (its mmap threshold rises up to 32 MiB), and free pages inside the heap stay resident: without this,
    the RSS a closed session's copies and frames took would never come back down."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        _LIBC.malloc_trim(0)


def keep_pieces_in_the_heap() -> None:
    """Serve FUSE's ~1 MiB write pieces from the heap, not one mmap each: glibc maps blocks above its mmap
    threshold (128 KiB until it has freed one) afresh, so every piece of a big copy cost new pages and their
    faults, and host-to-device copies ran at half speed. Above 4 MiB (device memory in numeric mode) blocks are
    still mapped and go back at once; the heap's free pages go back when a session closes (above). The trim
    threshold keeps glibc from giving back, between two pieces, the pages the next one will need."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        _LIBC.mallopt(M_MMAP_THRESHOLD, 4 * MiB)
        _LIBC.mallopt(M_TRIM_THRESHOLD, 256 * MiB)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_LIBC = ctypes.CDLL(None)
