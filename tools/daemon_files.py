"""The running daemon's files, as a command-line tool reads them: the status file and the control node."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import click


def read_status(mount: Path) -> dict:
    try:
        return json.loads((mount / "status").read_text())
    except FileNotFoundError:
        raise click.ClickException(
            f"no FlexNPU daemon at {mount} (no status file): start one with `vdevfsd mount {mount}`, "
            "or point --mount / FLEXNPU_MOUNT at its mount point"
        ) from None
    except OSError as exc:
        raise click.ClickException(
            f"{mount}: {exc.strerror}; if the daemon was killed, `vdevfsd mount {mount}` recovers the mount"
        ) from None


def send_command(mount: Path, line: str) -> str:
    """Write one command to the daemon's control node; its reply line (`ok: ...` or `error: ...`)."""
    node = mount / "control"
    try:
        fd = os.open(node, os.O_RDWR)
    except FileNotFoundError:
        read_status(mount)  # says how to start a daemon if there is none
        raise click.ClickException(f"{node}: no such file: restart the daemon with this version of FlexNPU") from None
    except PermissionError:
        raise click.ClickException(
            f"{node}: permission denied: only the daemon's user (uid {node.stat().st_uid}) or root may use it"
        ) from None
    try:
        os.write(fd, line.encode())
        return os.read(fd, 4096).decode().removesuffix("\n")
    finally:
        os.close(fd)


class StatusReader:
    """`read_status(mount)` given up after `timeout` seconds, for callers that must go on when the daemon hangs
    (SIGSTOPped, or stuck): a read of a hung FUSE mount blocks for good, so it runs in a daemon thread (never
    joined at exit), and while one such read is pending no other is started (no pile of stuck threads)."""

    def __init__(self, mount: Path, timeout: float) -> None:
        self.mount = mount
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pending: _Read | None = None

    def __call__(self) -> dict:
        with self._lock:
            if self._pending is None or self._pending.done.is_set():
                self._pending = _Read(self.mount)
            pending = self._pending
        if not pending.done.wait(self.timeout):
            raise click.ClickException(
                f"{self.mount}: the FlexNPU daemon does not answer within {self.timeout:g} s (stopped or hung?)"
            )
        if pending.error is not None:
            raise pending.error
        return pending.result


class _Read:
    def __init__(self, mount: Path) -> None:
        self.done = threading.Event()
        self.result: dict = {}
        self.error: Exception | None = None
        threading.Thread(target=self._run, args=(mount,), name="status-read", daemon=True).start()

    def _run(self, mount: Path) -> None:
        try:
            self.result = read_status(mount)
        except Exception as exc:  # handed to the reader, which raises it as its own
            self.error = exc
        finally:
            self.done.set()
