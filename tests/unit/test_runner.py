"""The daemon's engine driver (TrioRunner) with no wall clock: work submitted from tasks completes in modeled
time, waiters wake, and a wait that can never finish fails instead of hanging."""

from __future__ import annotations

import pytest
import trio

from npu.emulated.device import EmulatedNPU
from npu.errors import AclError
from npu.memory import Buffer, Region
from npu.profiles import profile
from npu.tasks import Fill
from scheduler.clock import VirtualClock
from scheduler.engine import Engine
from scheduler.policies import make_policy
from scheduler.runner import Stalled, TrioRunner
from scheduler.stream import Event, RecordEntry, Stream, TaskEntry, WaitEntry

GiB = 1 << 30


def make_runner() -> tuple[TrioRunner, EmulatedNPU]:
    npu = EmulatedNPU("npu0", profile("910B2"), "timing")
    return TrioRunner(Engine(npu, make_policy("fifo")), VirtualClock()), npu


async def test_waiters_wake_when_their_stream_drains_in_modeled_time():
    runner, npu = make_runner()
    stream, event = Stream(), Event()
    runner.engine.add_stream(stream)
    buffer = npu.memory.alloc(GiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        for seq in range(4):
            runner.submit(TaskEntry(stream, seq, task=Fill(_region(buffer), 0)))
        event.recorded += 1
        runner.submit(RecordEntry(stream, 9, event=event, generation=1))
        with trio.fail_after(5):
            await runner.wait_until(lambda: stream.idle)
        nursery.cancel_scope.cancel()
    # Four 1 GiB fills at the 910B2's 1.38 TB/s plus their launch overheads, with no wall clock involved.
    assert event.timestamp == pytest.approx(4 * (3e-6 + GiB / (32 * 24 * 1.8e9)))


async def test_a_wait_on_an_event_no_work_will_record_fails():
    runner, _ = make_runner()
    stream = Stream()
    runner.engine.add_stream(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        runner.submit(WaitEntry(stream, 1, event=Event(recorded=1), generation=1))  # recorded nowhere
        with pytest.raises(Stalled) as info, trio.fail_after(5):
            await runner.wait_until(lambda: stream.idle)
        nursery.cancel_scope.cancel()
    assert info.value.code == AclError.RT_STREAM_SYNC_TIMEOUT


def _region(buffer: Buffer) -> Region:
    return Region(buffer, 0, GiB)
