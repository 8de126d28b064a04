"""The running daemon's files, as a command-line tool reads them: the status file and the control node."""

from __future__ import annotations

import json
import os
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
