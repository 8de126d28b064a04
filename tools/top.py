"""`vdevctl top`: a live terminal view of a running daemon, redrawn from its status file every interval.

`StatusWindow` holds the samples of the last minute and makes every row as text (no terminal: unit-tested);
`TopApp` (textual) reads the status file and shows those rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import click
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from tools.daemon_files import StatusReader

WINDOW_S = 60.0  # the averages of the physical NPUs' cores are over this much wall time of samples
SPARK_POINTS = 12  # intervals drawn in a sparkline: the physical table fits 120 columns
PHASES = ("prefill", "decode")
SPARKS = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉"

PHYSICAL_COLUMNS = ("NPU", "Chip", "Policy", "Prefill 1 min", "now", "", "Decode 1 min", "now", "", "Memory", "Queued")
VIRTUAL_COLUMNS = ("vNPU", "Physical", "Role", "Cores", "Memory used / quota", "", "Kernels/s", "Util", "Sessions")


def bar(fraction: float, width: int = 10) -> str:
    """`fraction` (clamped to 0..1) of `width` cells filled, to an eighth of a cell."""
    eighths = round(min(max(fraction, 0.0), 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS[part] if part else "")).ljust(width, "░")


def sparkline(values: list[float], top: float) -> str:
    """One character per value, its height a share of `top`."""
    return "".join(SPARKS[min(len(SPARKS) - 1, max(0, round(v / top * (len(SPARKS) - 1))))] for v in values)


def duration(seconds: float) -> str:
    """`42s`, `5m07s`, `2h03m`, `3d04h`: the two largest units, as top and ps show an uptime."""
    s = int(seconds)
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{s % size // small_size:02d}{small}"
    return f"{s}s"


def used_of(used: int, total: int) -> str:
    """`12.5 / 64.0 MiB`: both in the unit that suits the total, so a column of them reads at a glance."""
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        used, total = used / 1024, total / 1024
        if total < 1024 or unit == "TiB":
            return f"{used:.1f} / {total:.1f} {unit}"
    raise AssertionError


def increase(old: float, new: float) -> float:
    """How much a cumulative counter grew; a counter that went down started again from 0 (a vNPU destroyed and
    made again under its name) and grew by its new value."""
    return new - old if new >= old else new


def _busy(physical: dict, phase: str) -> float:
    return physical.get("busy_core_seconds", {}).get(phase, 0.0)


@dataclass(frozen=True)
class Sample:
    at: float  # the view's clock when the status was read
    physical: dict[str, dict]
    virtual: dict[str, dict]
    daemon: dict

    @classmethod
    def of(cls, status: dict, at: float) -> Sample:
        return cls(
            at,
            {p["name"]: p for p in status["physical"]},
            {v["name"]: v for v in status["virtual"]},
            status["daemon"],
        )


class StatusWindow:
    """The daemon's status samples over the last minute, and the rows of the view made from them."""

    def __init__(self, mount: Path, window_s: float = WINDOW_S) -> None:
        self.mount = mount
        self.window_s = window_s
        self.samples: deque[Sample] = deque()
        self.error: str | None = None  # why the last read failed; None when it worked
        self.failed_at = 0.0

    def add(self, status: dict, at: float) -> None:
        sample = Sample.of(status, at)
        if self.samples and self.samples[-1].daemon["pid"] != sample.daemon["pid"]:
            self.samples.clear()  # another daemon: its counters started again
        self.samples.append(sample)
        # The oldest sample kept is the newest at least a window old: the averages span a whole minute once
        # there is one, and what there is before.
        while len(self.samples) > 1 and self.samples[1].at <= at - self.window_s:
            self.samples.popleft()
        self.error = None

    def fail(self, message: str, at: float) -> None:
        self.error, self.failed_at = message, at

    @property
    def banner(self) -> str | None:
        return None if self.error is None else f"no daemon at {self.mount}: {self.error}"

    @property
    def header(self) -> str:
        if not self.samples:
            return "no status read yet"
        last = self.samples[-1]
        seen = f"daemon pid {last.daemon['pid']}"
        if self.error is not None:
            return f"{seen}, last seen {duration(self.failed_at - last.at)} ago"
        return f"{seen}, up {duration(last.daemon['uptime_s'])}"

    def _pairs(self, kind: str, name: str) -> list[tuple[dict, dict]]:
        """Each two successive samples' entries of physical or virtual NPU `name`, where both have it."""
        entries = [getattr(s, kind).get(name) for s in self.samples]
        return [(a, b) for a, b in pairwise(entries) if a is not None and b is not None]

    def cores_held(self, name: str, phase: str) -> list[float]:
        """Physical NPU `name`'s AI cores held by `phase`, averaged over each interval between samples."""
        out = []
        for a, b in self._pairs("physical", name):
            modeled = increase(a.get("modeled_time_s", 0.0), b.get("modeled_time_s", 0.0))
            out.append(increase(_busy(a, phase), _busy(b, phase)) / modeled if modeled > 0 else 0.0)
        return out

    def average_cores(self, name: str, phase: str) -> float | None:
        """Cores held by `phase` over the whole window (None: not two samples of `name` yet)."""
        base = next(s for s in self.samples if name in s.physical)
        if base is self.samples[-1]:
            return None
        first, last = base.physical[name], self.samples[-1].physical[name]
        modeled = increase(first.get("modeled_time_s", 0.0), last.get("modeled_time_s", 0.0))
        return increase(_busy(first, phase), _busy(last, phase)) / modeled if modeled > 0 else 0.0

    def physical_rows(self) -> dict[str, tuple[str, ...]]:
        if not self.samples:
            return {}
        rows = {}
        for name, p in self.samples[-1].physical.items():
            total = p["cores"]["total"]
            cells = [name if p.get("up", True) else f"{name} (down)", p["chip"], p["policy"]]
            for phase in PHASES:
                average = self.average_cores(name, phase)
                cells += [
                    "-" if average is None else f"{average:.1f}",
                    str(p["cores"][phase]),
                    sparkline(self.cores_held(name, phase)[-SPARK_POINTS:], total),
                ]
            cells += [used_of(p["memory_used"], p["memory_total"]), str(p["queued"])]
            rows[name] = tuple(cells)
        return rows

    def virtual_rows(self) -> dict[str, tuple[str, ...]]:
        if not self.samples:
            return {}
        latest = self.samples[-1]
        rows = {}
        for name, v in latest.virtual.items():
            physical = latest.physical[v["physical"]]
            cap = v.get("cores")
            rate = utilisation = "-"
            previous = self.samples[-2] if len(self.samples) > 1 else None
            if previous is not None and name in previous.virtual and latest.at > previous.at:
                before, before_physical = previous.virtual[name], previous.physical[v["physical"]]
                kernels = increase(before.get("kernels", 0), v.get("kernels", 0))
                rate = f"{kernels / (latest.at - previous.at):.1f}"
                modeled = increase(before_physical.get("modeled_time_s", 0.0), physical.get("modeled_time_s", 0.0))
                busy = increase(before.get("busy_core_seconds", 0.0), v.get("busy_core_seconds", 0.0))
                share = busy / modeled / (cap or physical["cores"]["total"]) if modeled > 0 else 0.0
                utilisation = f"{share:.0%}"
            rows[name] = (
                name,
                v["physical"],
                v["role"],
                "all" if cap is None else str(cap),
                used_of(v["memory_used"], v["memory_quota"]),
                bar(v["memory_used"] / v["memory_quota"] if v["memory_quota"] else 0.0),
                rate,
                utilisation,
                str(len(v["sessions"])),
            )
        return rows


def _sync(table: DataTable, rows: dict[str, tuple[str, ...]]) -> None:
    """Make `table` show `rows` (by key), keeping the rows that stay where they are, and the scroll position."""
    for key in [k.value for k in table.rows if k.value not in rows]:
        table.remove_row(key)
    for key, cells in rows.items():
        if key in table.rows:
            for column, cell in zip(table.columns, cells, strict=True):
                table.update_cell(key, column, cell, update_width=True)
        else:
            table.add_row(*cells, key=key)


class TopApp(App):
    """The live view. `source()` returns the daemon's status or raises click.ClickException, within a bounded
    time (a daemon_files.StatusReader: a read of a hung daemon's mount would block for good); `clock()` is the
    time the samples are taken at, in seconds."""

    TITLE = "vdevctl top"
    CSS = """
    #banner { background: $error; color: $text; padding: 0 1; display: none; }
    .caption { padding: 1 1 0 1; text-style: bold; }
    DataTable { height: auto; }
    """
    BINDINGS = [Binding("q", "quit", "Quit"), Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]

    def __init__(
        self,
        mount: Path,
        source: Callable[[], dict],
        clock: Callable[[], float] = time.monotonic,
        interval: float = 1.0,
    ) -> None:
        super().__init__()
        self.source, self.clock, self.interval = source, clock, interval
        self.window = StatusWindow(mount)
        self.reading_since: float | None = None
        self.sub_title = str(mount)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="banner")
        yield Static("Physical NPUs (AI cores held: average, now, history)", classes="caption")
        yield DataTable(id="physical", cursor_type="none", zebra_stripes=True)
        yield Static("Virtual NPUs", classes="caption")
        yield DataTable(id="virtual", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        for table, columns in (("#physical", PHYSICAL_COLUMNS), ("#virtual", VIRTUAL_COLUMNS)):
            widget = self.query_one(table, DataTable)
            for i, label in enumerate(columns):
                widget.add_column(label, key=str(i))
        self.tick()
        self.set_interval(self.interval, self.tick)

    def tick(self) -> None:
        """Read the status again, unless the last read has not come back (then say so)."""
        if self.reading_since is None:
            self.reading_since = self.clock()
            self.run_worker(self.read(), group="read")
        else:
            waited = self.clock() - self.reading_since
            self.window.fail(f"no answer for {duration(waited)}: is the daemon stopped or hung?", self.clock())
            self.show()

    async def read(self) -> None:
        try:
            status = await asyncio.to_thread(self.source)
        except click.ClickException as exc:
            self.window.fail(exc.format_message(), self.clock())
        else:
            self.window.add(status, self.clock())
        finally:
            self.reading_since = None
        self.show()

    def show(self) -> None:
        banner = self.query_one("#banner", Static)
        banner.display = self.window.banner is not None
        banner.update(self.window.banner or "")
        self.sub_title = f"{self.window.mount} · {self.window.header}"
        _sync(self.query_one("#physical", DataTable), self.window.physical_rows())
        _sync(self.query_one("#virtual", DataTable), self.window.virtual_rows())


@click.command()
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between reads."
)
@click.pass_obj
def command(mount: Path, interval: float) -> None:
    """A live view of the daemon's NPUs: AI cores held by prefill and decode, memory, queues, kernels/s.

    q (or Ctrl-C) quits. The view keeps reading while the daemon is away and carries on when it is back.
    """
    TopApp(mount, StatusReader(mount, timeout=max(interval, 1.0)), interval=interval).run()
