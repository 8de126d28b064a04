"""`vdevctl top`: the rows it makes from status samples (rates, the 60-s window, vNPUs and the daemon coming and
going), and the textual App driven by textual's test harness with a fake status source and clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
import pytest
from textual.widgets import DataTable, Static

from tools.top import StatusWindow, TopApp, bar, duration, increase, sparkline, used_of

MOUNT = Path("/mnt/npu")
GIB = 1 << 30
# Column positions in the rows
P_PREFILL_AVG, P_PREFILL_NOW, P_PREFILL_SPARK, P_DECODE_AVG = 3, 4, 5, 6
V_CORES, V_MEMORY, V_BAR, V_RATE, V_UTIL, V_SESSIONS = 3, 4, 5, 6, 7, 8


def physical(name="npu0", modeled=0.0, prefill=0.0, decode=0.0, cores_now=(0, 0), **extra) -> dict:
    return {
        "name": name,
        "chip": "910B2",
        "mode": "timing",
        "policy": "fifo",
        "policy_state": {},
        "memory_used": 0,
        "memory_total": 64 * GIB,
        "queued": 0,
        "running": 0,
        "cores": {"prefill": cores_now[0], "decode": cores_now[1], "total": 24},
        "busy_core_seconds": {"prefill": prefill, "decode": decode, "unknown": 0.0},
        "modeled_time_s": modeled,
        **extra,
    }


def virtual(name="davinci0", kernels=0, busy=0.0, cores=None, sessions=0, used=0, on="npu0") -> dict:
    return {
        "name": name,
        "physical": on,
        "chip": "910B2",
        "role": "any",
        "memory_used": used,
        "memory_quota": 4 * GIB,
        "cores": cores,
        "kernels": kernels,
        "busy_core_seconds": busy,
        "sessions": [{"session": i} for i in range(sessions)],
    }


def status(physicals=None, virtuals=None, pid=100, uptime=5.0) -> dict:
    return {
        "daemon": {"pid": pid, "mountpoint": str(MOUNT), "uptime_s": uptime},
        "physical": physicals if physicals is not None else [physical()],
        "virtual": virtuals if virtuals is not None else [virtual()],
    }


def test_formatters():
    assert bar(0.0) == "░" * 10 and bar(1.0) == "█" * 10 and bar(2.0) == "█" * 10
    assert bar(0.25) == "██▌░░░░░░░"
    assert sparkline([0, 12, 24], 24) == "▁▅█"
    assert [duration(s) for s in (42, 427, 7380, 273600)] == ["42s", "7m07s", "2h03m", "3d04h"]
    assert used_of(GIB // 2, 64 * GIB) == "0.5 / 64.0 GiB"
    assert used_of(3 << 20, 64 << 20) == "3.0 / 64.0 MiB"
    assert increase(10, 15) == 5 and increase(10, 3) == 3  # a counter that went down started again from 0


def test_virtual_rates_between_the_last_two_samples():
    w = StatusWindow(MOUNT)
    w.add(status([physical(modeled=10.0)], [virtual(kernels=100, busy=5.0, cores=8)]), at=0.0)
    assert w.virtual_rows()["davinci0"][V_RATE] == "-"  # one sample: no rate yet
    w.add(status([physical(modeled=12.0)], [virtual(kernels=140, busy=13.0, cores=8, sessions=2)]), at=2.0)
    row = w.virtual_rows()["davinci0"]
    assert row[V_RATE] == "20.0"  # 40 kernels in 2 s
    assert row[V_UTIL] == "50%"  # 8 core-s in 2 modeled s: 4 of its 8 cores
    assert row[V_CORES] == "8" and row[V_SESSIONS] == "2"


def test_virtual_without_a_cap_is_measured_against_the_whole_chip():
    w = StatusWindow(MOUNT)
    w.add(status([physical(modeled=0.0)], [virtual(busy=0.0, used=GIB)]), at=0.0)
    w.add(status([physical(modeled=1.0)], [virtual(busy=6.0, used=GIB)]), at=1.0)
    row = w.virtual_rows()["davinci0"]
    assert row[V_CORES] == "all" and row[V_UTIL] == "25%"  # 6 of 24 cores
    assert row[V_MEMORY] == "1.0 / 4.0 GiB" and row[V_BAR] == bar(0.25)


def test_physical_average_over_the_last_minute_and_before_it():
    """Prefill held 12 cores for the first minute, then 3: the average follows the last minute only; before a
    minute has passed it is over what there is."""
    w = StatusWindow(MOUNT)
    busy = 0.0
    for t in range(0, 121, 10):
        busy += (12 if t <= 60 else 3) * 10 if t else 0
        w.add(status([physical(modeled=float(t), prefill=busy, decode=t / 10, cores_now=(3, 1))]), at=float(t))
        if t == 30:
            assert w.physical_rows()["npu0"][P_PREFILL_AVG] == "12.0"
    row = w.physical_rows()["npu0"]
    assert row[P_PREFILL_AVG] == "3.0" and row[P_DECODE_AVG] == "0.1"
    assert row[P_PREFILL_NOW] == "3"
    assert w.samples[0].at == 60.0  # the newest sample a window old is the base; older ones are gone
    assert row[P_PREFILL_SPARK] == sparkline([3.0] * 6, 24)


def test_idle_modeled_time_is_zero_cores_and_missing_fields_are_defaults():
    """A status from before the counters existed (no busy_core_seconds, kernels, cores, up) still makes rows."""
    old_p = {k: v for k, v in physical().items() if k != "busy_core_seconds"}
    old_v = {k: v for k, v in virtual().items() if k not in ("kernels", "busy_core_seconds", "cores")}
    w = StatusWindow(MOUNT)
    w.add(status([old_p], [old_v]), at=0.0)
    w.add(status([old_p], [old_v]), at=1.0)
    assert w.physical_rows()["npu0"][P_PREFILL_AVG] == "0.0"
    assert w.virtual_rows()["davinci0"][V_CORES : V_CORES + 1] == ("all",)
    assert w.virtual_rows()["davinci0"][V_RATE : V_UTIL + 1] == ("0.0", "0%")


def test_rows_follow_npus_that_come_and_go():
    w = StatusWindow(MOUNT)
    w.add(status(virtuals=[virtual("davinci0"), virtual("davinci1")]), at=0.0)
    w.add(status(virtuals=[virtual("davinci1"), virtual("davinci5")]), at=1.0)
    rows = w.virtual_rows()
    assert list(rows) == ["davinci1", "davinci5"]
    assert rows["davinci1"][V_RATE] == "0.0" and rows["davinci5"][V_RATE] == "-"  # new: nothing to compare
    w.add(status([physical("npu0"), physical("npu1")], [virtual("davinci5", on="npu1")]), at=2.0)
    assert list(w.physical_rows()) == ["npu0", "npu1"]
    assert w.physical_rows()["npu1"][P_PREFILL_AVG] == "-"
    w.add(status([physical("npu0"), physical("npu1", up=False)], []), at=3.0)
    assert w.physical_rows()["npu1"][0] == "npu1 (down)" and w.virtual_rows() == {}


def test_daemon_gone_and_back():
    w = StatusWindow(MOUNT)
    assert w.header == "no status read yet" and w.banner is None
    w.add(status([physical(modeled=0.0)], pid=100, uptime=3725.0), at=0.0)
    w.add(status([physical(modeled=1.0, prefill=5.0)], pid=100, uptime=3726.0), at=1.0)
    assert w.header == "daemon pid 100, up 1h02m"
    w.fail("no FlexNPU daemon at /mnt/npu (no status file)", at=8.0)
    assert w.banner == "no daemon at /mnt/npu: no FlexNPU daemon at /mnt/npu (no status file)"
    assert w.header == "daemon pid 100, last seen 7s ago"
    assert w.physical_rows()["npu0"][P_PREFILL_AVG] == "5.0"  # the last rows stay, under the banner
    w.add(status([physical(modeled=0.5)], pid=200, uptime=1.0), at=9.0)
    assert w.banner is None and w.header == "daemon pid 200, up 1s"
    assert len(w.samples) == 1 and w.physical_rows()["npu0"][P_PREFILL_AVG] == "-"  # a new daemon, new counters


class Fake:
    """A status source (what it returns, or raises) and a clock the test moves."""

    def __init__(self, answer) -> None:
        self.answer, self.now = answer, 0.0

    def source(self) -> dict:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def clock(self) -> float:
        return self.now


def run_app(fake: Fake, scenario) -> None:
    """Run `scenario(app, pilot, tick)` in textual's harness; tick() moves the clock 1 s and reads again.
    The App's own timer never fires (an hour's interval)."""

    async def main() -> None:
        app = TopApp(MOUNT, fake.source, fake.clock, interval=3600)
        async with app.run_test(size=(170, 30)) as pilot:

            async def tick() -> None:
                await app.workers.wait_for_complete()
                fake.now += 1.0
                app.tick()
                await app.workers.wait_for_complete()
                await pilot.pause()

            await scenario(app, pilot, tick)

    asyncio.run(main())


def test_app_shows_rows_after_a_tick_and_drops_a_vanished_vnpu():
    fake = Fake(status([physical(modeled=0.0)], [virtual("davinci0"), virtual("davinci1", cores=8)]))

    async def scenario(app, pilot, tick):
        await tick()
        fake.answer = status(
            [physical(modeled=1.0, prefill=12.0)], [virtual("davinci0", kernels=30), virtual("davinci1", cores=8)]
        )
        await tick()
        physical_table, virtual_table = app.query_one("#physical", DataTable), app.query_one("#virtual", DataTable)
        assert physical_table.get_row("npu0")[P_PREFILL_AVG] == "12.0"
        assert virtual_table.get_row("davinci0")[V_RATE] == "30.0"
        assert virtual_table.get_row("davinci1")[V_CORES] == "8"
        assert "daemon pid 100, up 5s" in app.sub_title
        fake.answer = status([physical(modeled=2.0)], [virtual("davinci1", cores=8)])
        await tick()
        assert [k.value for k in virtual_table.rows] == ["davinci1"]

    run_app(fake, scenario)


def test_app_banner_while_the_source_fails_then_carries_on():
    fake = Fake(status())

    async def scenario(app, pilot, tick):
        banner = app.query_one("#banner", Static)
        assert not banner.display
        fake.answer = click.ClickException("no FlexNPU daemon at /mnt/npu (no status file)")
        await tick()
        assert banner.display
        assert str(banner.content) == "no daemon at /mnt/npu: no FlexNPU daemon at /mnt/npu (no status file)"
        assert app.query_one("#virtual", DataTable).row_count == 1  # the last rows stay
        fake.answer = status(pid=200)
        await tick()
        assert not banner.display and "daemon pid 200" in app.sub_title

    run_app(fake, scenario)


@pytest.mark.parametrize("key", ["q", "ctrl+c"])
def test_app_quits_on_q_and_ctrl_c(key):
    fake = Fake(status())

    async def scenario(app, pilot, tick):
        await tick()
        await pilot.press(key)
        await pilot.pause()
        assert not app.is_running

    run_app(fake, scenario)
