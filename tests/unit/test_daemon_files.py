"""tools/daemon_files.py's StatusReader: a status read that a hung daemon cannot hang (the device plugin's, found in
review: a SIGSTOPped daemon left every device Healthy and the plugin deaf, even to SIGTERM)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import click
import pytest

from tools import daemon_files


def test_a_hung_read_is_given_up_and_no_second_one_piles_up(monkeypatch):
    release, started = threading.Event(), []

    def hung(mount: Path) -> dict:
        started.append(mount)
        release.wait()
        return {"daemon": {"pid": 1}}

    monkeypatch.setattr(daemon_files, "read_status", hung)
    reader = daemon_files.StatusReader(Path("/dev/flexnpu"), timeout=0.05)
    for _ in range(3):
        with pytest.raises(click.ClickException, match="does not answer within 0.05 s"):
            reader()
    assert len(started) == 1  # the stuck read is waited on again, not joined by more
    release.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            assert reader() == {"daemon": {"pid": 1}}
            break
        except click.ClickException:
            pass
    assert len(started) == 1


def test_a_failed_read_raises_its_own_error(monkeypatch):
    def gone(mount: Path) -> dict:
        raise click.ClickException(f"no FlexNPU daemon at {mount}")

    monkeypatch.setattr(daemon_files, "read_status", gone)
    with pytest.raises(click.ClickException, match="no FlexNPU daemon at /nowhere"):
        daemon_files.StatusReader(Path("/nowhere"), timeout=5)()
