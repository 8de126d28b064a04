"""The engine of one physical NPU (scheduler/engine.py, stream.py, runner.py) over an emulated NPU, in modeled
time: stream order, data dependencies, events, sticky failures, stream removal and the timing model.

Expected durations are worked out here from the chip's published numbers (npu/profiles.py), with the roofline
of npu/emulated/timing.py: launch overhead + the larger of compute, HBM and host-link time.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu import profiles
from npu.emulated.device import EmulatedNPU
from npu.errors import AclError, InvalidParam, OutOfMemory
from npu.memory import ALIGN, DeviceMemory, Region, rounded_size
from npu.tasks import Cost, DeviceToDevice, DeviceToHost, Fill, HostToDevice, Unit
from scheduler.clock import VirtualClock
from scheduler.engine import Engine
from scheduler.policies import make_policy
from scheduler.runner import Stalled, SyncRunner
from scheduler.stream import Event, FailEntry, RecordEntry, Stream, TaskEntry, WaitEntry

GiB = 1 << 30
MiB = 1 << 20

# 910B2, from npu/profiles.py: 3 us launch, 1.38 TB/s HBM (ddr_rate 32 B/cycle x 24 cores x 1.8 GHz), 50 GB/s
# host link, 24 AI cores.
LAUNCH = 3e-6
HBM = 32 * 24 * 1.8e9
LINK = 50e9
CORES = 24
# 910B4: 0.96 TB/s HBM (20 cores at 1.5 GHz), same launch and link.
HBM_910B4 = 32 * 20 * 1.5e9


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-11)  # the engine completes a task within ~1e-12 s


def test_profile_numbers_used_here():
    p = profiles.profile("910B2")
    assert (p.launch_overhead_s, p.hbm_bandwidth, p.host_link_bandwidth, p.ai_cores) == (LAUNCH, HBM, LINK, CORES)
    assert profiles.profile("910B4").hbm_bandwidth == HBM_910B4


# -- a small harness -------------------------------------------------------------------------------------


class Rig:
    """An emulated NPU, its engine, a virtual clock and a SyncRunner, plus helpers to queue work."""

    def __init__(self, mode: str = "numeric", chip: str = "910B2") -> None:
        self.npu = EmulatedNPU("npu0", profiles.profile(chip), mode)
        self.engine = Engine(self.npu, make_policy("fifo"))
        self.clock = VirtualClock()
        self.runner = SyncRunner(self.engine, self.clock)
        self.seqs = itertools.count(1)
        self.delivered: list[tuple[int, bytes]] = []

    def stream(self) -> Stream:
        stream = Stream()
        self.engine.add_stream(stream)
        return stream

    def region(self, size: int) -> Region:
        return Region(self.npu.memory.alloc(size), 0, size)

    def submit(self, entry, now: float | None = None):
        if now is None:
            self.runner.submit(entry)
        else:
            self.engine.submit(entry, now)
        return entry

    def task(self, stream: Stream, task, now: float | None = None) -> TaskEntry:
        return self.submit(TaskEntry(stream, next(self.seqs), task=task), now)

    def h2d(self, stream, dst: Region, data: bytes, now=None) -> TaskEntry:
        return self.task(stream, HostToDevice(dst, data), now)

    def d2h(self, stream, src: Region, now=None) -> TaskEntry:
        seq = next(self.seqs)
        task = DeviceToHost(src, lambda region: self.delivered.append((seq, region.read())))
        return self.submit(TaskEntry(stream, seq, task=task), now)

    def record(self, stream: Stream, event: Event | None = None, now=None) -> Event:
        event = event or Event()
        event.recorded += 1
        self.submit(RecordEntry(stream, next(self.seqs), event=event, generation=event.recorded), now)
        return event

    def wait(self, stream: Stream, event: Event, now=None) -> WaitEntry:
        return self.submit(WaitEntry(stream, next(self.seqs), event=event, generation=event.recorded), now)

    def fail(self, stream: Stream, error, now=None) -> FailEntry:
        return self.submit(FailEntry(stream, next(self.seqs), error=error), now)

    def sync(self, *streams: Stream) -> float:
        self.runner.wait_until(lambda: all(s.idle for s in streams))
        return self.clock.now()


@functools.cache
def pattern(n: int, salt: int = 0) -> bytes:
    return ((np.arange(n, dtype=np.uint64) * 7 + salt) % 251).astype(np.uint8).tobytes()


# -- one stream ------------------------------------------------------------------------------------------


def test_one_stream_runs_in_order_and_gives_the_bytes_back():
    rig = Rig()
    n = 64 * 1024
    data = pattern(n)
    a, b = rig.region(n), rig.region(n)
    s = rig.stream()

    rig.h2d(s, a, data)
    e1 = rig.record(s)
    rig.task(s, DeviceToDevice(b, a))
    e2 = rig.record(s)
    rig.d2h(s, b)
    e3 = rig.record(s)
    end = rig.sync(s)

    assert [d for _, d in rig.delivered] == [data]
    t1 = LAUNCH + n / LINK
    t2 = t1 + LAUNCH + 2 * n / HBM
    t3 = t2 + LAUNCH + n / LINK
    assert (e1.timestamp, e2.timestamp, e3.timestamp) == (approx(t1), approx(t2), approx(t3))
    assert end == approx(t3)
    assert s.completed == 6
    assert s.idle and rig.engine.queued == 0 and rig.engine.running == []


def test_later_entries_wait_for_the_running_one():
    rig = Rig()
    s = rig.stream()
    a, b = rig.region(MiB), rig.region(MiB)
    first = rig.h2d(s, a, pattern(MiB))
    rig.task(s, Fill(b, 9))
    assert rig.engine.running == [first]
    assert len(s.queue) == 2
    assert not b.buffer.data.any()  # the fill has not run
    assert rig.engine.advance(0.0) == approx(LAUNCH + MiB / LINK)  # the next completion


def test_advance_reports_the_next_completion_and_none_when_idle():
    rig = Rig()
    s = rig.stream()
    r = rig.region(1024)
    rig.task(s, Fill(r, 1))
    rig.task(s, Fill(r, 2))
    d = LAUNCH + 1024 / HBM
    assert rig.engine.advance(0.0) == approx(d)
    assert rig.engine.advance(d) == approx(2 * d)
    assert rig.engine.advance(2 * d) is None
    assert r.read() == bytes([2]) * 1024


def test_work_submitted_later_starts_at_its_submission_time():
    rig = Rig()
    s = rig.stream()
    r = rig.region(4096)
    rig.task(s, Fill(r, 3), now=0.25)
    event = rig.record(s, now=0.25)
    rig.engine.advance(1.0)
    assert event.timestamp == approx(0.25 + LAUNCH + 4096 / HBM)


def test_record_on_an_idle_stream_completes_at_once_with_the_current_time():
    rig = Rig()
    s = rig.stream()
    event = rig.record(s, now=0.5)
    assert event.completed == event.recorded == 1
    assert event.timestamp == 0.5


def test_fill_and_device_to_device_numerics():
    rig = Rig()
    s = rig.stream()
    a, b = rig.region(1000), rig.region(1000)
    rig.task(s, Fill(a, 0x5A))
    rig.task(s, DeviceToDevice(Region(b.buffer, 100, 500), Region(a.buffer, 0, 500)))
    rig.sync(s)
    expected = np.zeros(1000, dtype=np.uint8)
    expected[100:600] = 0x5A
    assert b.read() == expected.tobytes()
    assert a.read() == b"\x5a" * 1000


# -- several streams -------------------------------------------------------------------------------------


def test_two_streams_run_concurrently():
    rig = Rig()
    a, b = rig.stream(), rig.stream()
    big, small = rig.region(MiB), rig.region(1024)
    long_task = rig.h2d(a, big, pattern(MiB))
    short_task = rig.task(b, Fill(small, 4))
    ea, eb = rig.record(a), rig.record(b)

    assert set(rig.engine.running) == {long_task, short_task}
    assert long_task.job.started_at == short_task.job.started_at == 0.0
    rig.sync(a, b)
    # the short task did not queue behind the long one on the other stream
    assert eb.timestamp < ea.timestamp
    assert eb.timestamp < LAUNCH + MiB / LINK
    assert small.read() == b"\x04" * 1024
    assert big.read() == pattern(MiB)


def test_concurrent_copies_share_the_chips_hbm_bandwidth():
    """Two 1 GiB device-to-device copies move 4 GiB through HBM: at 1.38 TB/s for the whole chip they cannot
    both be done before 4 GiB / HBM, however the engine shares the chip between them."""
    rig = Rig(mode="timing")
    a, b = rig.stream(), rig.stream()
    ea, eb = [], []
    for stream, events in ((a, ea), (b, eb)):
        src, dst = rig.region(GiB), rig.region(GiB)
        rig.task(stream, DeviceToDevice(dst, src))
        events.append(rig.record(stream))
    end = rig.sync(a, b)
    assert max(ea[0].timestamp, eb[0].timestamp) == end
    assert end >= 4 * GiB / HBM


def test_wait_holds_its_stream_until_the_record_completes():
    rig = Rig()
    producer, consumer = rig.stream(), rig.stream()
    n = 256 * 1024
    data = pattern(n, salt=3)
    buf = rig.region(n)

    rig.h2d(producer, buf, data)
    ready = rig.record(producer)
    rig.wait(consumer, ready)
    rig.d2h(consumer, buf)
    done = rig.record(consumer)

    assert consumer.running is None
    assert isinstance(consumer.queue[0], WaitEntry)
    assert rig.delivered == []
    rig.sync(producer, consumer)

    assert [d for _, d in rig.delivered] == [data]  # read after the write, not zeros
    produced = LAUNCH + n / LINK
    assert ready.timestamp == approx(produced)
    assert done.timestamp == approx(produced + LAUNCH + n / LINK)


def test_wait_is_satisfied_by_the_generation_it_was_queued_after():
    """A wait orders after the record that was the event's latest when the wait was queued, not a later one."""
    rig = Rig()
    producer, consumer = rig.stream(), rig.stream()
    small, big = rig.region(1024), rig.region(8 * MiB)
    event = Event()
    rig.task(producer, Fill(small, 1))
    rig.record(producer, event)
    rig.wait(consumer, event)  # generation 1
    marker = rig.record(consumer)
    rig.task(producer, Fill(big, 2))
    rig.record(producer, event)  # generation 2, after the big fill
    rig.sync(producer, consumer)
    first = LAUNCH + 1024 / HBM
    assert marker.timestamp == approx(first)
    assert event.timestamp == approx(first + LAUNCH + 8 * MiB / HBM)
    assert event.completed == 2


def test_wait_on_a_never_recorded_event_passes_at_once():
    rig = Rig()
    busy, s = rig.stream(), rig.stream()
    rig.h2d(busy, rig.region(MiB), pattern(MiB))
    rig.wait(s, Event())
    after = rig.record(s)
    assert after.timestamp == 0.0
    assert s.idle


def test_wait_that_can_never_finish_is_reported_not_hung():
    rig = Rig()
    s = rig.stream()
    orphan = Event(recorded=1)  # a record that was never queued anywhere
    rig.submit(WaitEntry(s, 1, event=orphan, generation=1))
    with pytest.raises(Stalled, match="can never finish") as info:
        rig.sync(s)
    assert info.value.code == AclError.RT_STREAM_SYNC_TIMEOUT


# -- failures --------------------------------------------------------------------------------------------


def test_fail_entry_sets_a_sticky_failure_and_later_tasks_are_skipped():
    rig = Rig()
    s = rig.stream()
    r = rig.region(1024)
    error = InvalidParam("memcpy dst 0x10: is not a device address")
    rig.fail(s, error)  # seq 1
    rig.h2d(s, r, b"\x01" * 1024)
    rig.task(s, Fill(r, 2))
    rig.d2h(s, r)
    marker = rig.record(s)
    rig.sync(s)

    assert s.failure is not None
    assert (s.failure.seq, s.failure.error) == (1, error)
    assert not r.buffer.data.any()  # neither the copy nor the fill happened
    assert rig.delivered == []
    assert marker.completed == 1  # the stream drained, so a synchronisation can report the failure
    assert s.idle

    taken = s.take_failure()
    assert (taken.seq, taken.error) == (1, error)
    assert s.failure is None
    assert s.take_failure() is None

    rig.task(s, Fill(r, 3))
    rig.sync(s)
    assert r.read() == b"\x03" * 1024
    assert s.failure is None


def test_first_failure_is_kept():
    rig = Rig()
    s = rig.stream()
    first, second = InvalidParam("first"), InvalidParam("second")
    rig.fail(s, first)
    rig.fail(s, second)
    rig.sync(s)
    assert s.take_failure().error is first


def test_failure_is_per_stream():
    rig = Rig()
    bad, good = rig.stream(), rig.stream()
    r = rig.region(512)
    rig.fail(bad, InvalidParam("x"))
    rig.task(good, Fill(r, 8))
    rig.sync(bad, good)
    assert good.failure is None
    assert r.read() == b"\x08" * 512


@dataclass(frozen=True)
class Exploding:
    name: str = "exploding"

    def cost(self) -> Cost:
        return Cost(hbm_bytes=1024)

    def run(self) -> None:
        raise InvalidParam("the kernel hit a bad address")


def test_task_failing_when_it_runs_sets_the_failure():
    rig = Rig()
    s = rig.stream()
    r = rig.region(256)
    boom = rig.task(s, Exploding())
    rig.task(s, Fill(r, 1))
    rig.sync(s)
    assert s.failure is not None
    assert s.failure.seq == boom.seq
    assert s.failure.error.message == "the kernel hit a bad address"
    assert not r.buffer.data.any()


# -- removing a stream -----------------------------------------------------------------------------------


def test_remove_stream_drops_queued_work():
    rig = Rig()
    doomed, other = rig.stream(), rig.stream()
    first, later = rig.region(MiB), rig.region(1024)
    kept = rig.region(1024)
    rig.h2d(doomed, first, pattern(MiB))
    rig.task(doomed, Fill(later, 6))
    never = rig.record(doomed)
    rig.task(other, Fill(kept, 7))
    other_done = rig.record(other)

    rig.engine.remove_stream(doomed)
    assert doomed not in rig.engine.streams
    # The copy already on the chip runs to its end, as on hardware; nothing queued behind it starts.
    assert [e.stream for e in rig.engine.running] == [doomed, other]
    rig.engine.advance(10.0)

    assert not later.buffer.data.any()  # the queued fill never ran
    assert never.completed == 0 and never.timestamp is None
    assert doomed.idle
    assert kept.read() == b"\x07" * 1024
    assert other_done.timestamp == approx(LAUNCH + 1024 / (HBM - LINK))  # HBM shared with the copy's stream
    assert rig.engine.running == [] and rig.engine.queued == 0


def test_removing_a_stream_does_not_disturb_the_others_timing():
    rig = Rig(mode="timing")
    doomed, other = rig.stream(), rig.stream()
    rig.task(doomed, DeviceToDevice(rig.region(GiB), rig.region(GiB)))
    rig.task(other, Fill(rig.region(GiB), 0))
    done = rig.record(other)
    rig.engine.advance(1e-4)
    rig.engine.remove_stream(doomed)
    rig.engine.advance(10.0)
    assert done.timestamp is not None
    assert done.timestamp >= LAUNCH + GiB / HBM


@dataclass(frozen=True)
class CubeKernel:
    """Cube work in `tiles` pieces, cost only (timing mode): a MatMul as the timing model sees it."""

    flops: float
    tiles: int
    name: str = "MatMul"

    def cost(self) -> Cost:
        return Cost(flops=self.flops, unit=Unit.CUBE, tiles=self.tiles)

    def run(self) -> None:
        pass


PREFILL_MM = CubeKernel(2 * 2048 * 3584 * 18944, 1184)  # a block on every AI core, ~0.8 ms
DECODE_MM = CubeKernel(2 * 16 * 3584 * 4096, 16)  # 16 blocks, a few us


def decode_step(rig: Rig, start: float, beside_prefill: bool = True) -> float:
    """Modeled time of 28 decode kernels between two events, queued at `start` beside a prefill kernel."""
    if beside_prefill:
        rig.task(rig.stream(), PREFILL_MM, now=start)
    decode = rig.stream()
    begin = rig.record(decode, now=start)
    for _ in range(28):
        rig.task(decode, DECODE_MM, now=start)
    end = rig.record(decode, now=start)
    rig.engine.advance(start + 1.0)
    return end.timestamp - begin.timestamp


@pytest.mark.parametrize("left", ["idle", "running", "waiting on the chip"])
def test_a_removed_stream_leaves_nothing_that_spares_later_kernels_head_of_line_blocking(left):
    """A short client ran kernels and went (its streams removed, idle or with work still on the chip): a later
    decode step queued beside a prefill kernel under fifo still waits for it, exactly as on a fresh engine."""
    fresh = decode_step(Rig("timing"), 0.01)
    alone = decode_step(Rig("timing"), 0.01, beside_prefill=False)
    assert fresh > 3 * alone

    rig = Rig("timing")
    earlier = rig.stream()
    if left == "waiting on the chip":  # its kernel queued on the chip behind another stream's prefill kernel
        rig.task(rig.stream(), PREFILL_MM, now=0.0)
    for _ in range(5):
        rig.task(earlier, DECODE_MM, now=0.0)
    if left == "idle":
        rig.engine.advance(0.001)
        assert earlier.idle
    rig.engine.remove_stream(earlier)
    rig.engine.advance(0.009)
    assert rig.engine.running == [] and not rig.npu.busy
    assert rig.npu.timing.free == [CORES, 2 * CORES]
    assert decode_step(rig, 0.01) == approx(fresh)


# -- late and early driving ------------------------------------------------------------------------------


def scenario(rig: Rig) -> list[Event]:
    """Work on three streams tied together by events; returns the events whose timestamps matter."""
    a, b, c = rig.stream(), rig.stream(), rig.stream()
    x, y, z = rig.region(MiB), rig.region(MiB), rig.region(4 * MiB)
    events = []
    rig.h2d(a, x, pattern(MiB, 1), now=0.0)
    events.append(rig.record(a, now=0.0))
    rig.task(a, DeviceToDevice(y, x), now=0.0)
    events.append(rig.record(a, now=0.0))
    rig.task(b, Fill(z, 1), now=0.0)
    events.append(rig.record(b, now=0.0))
    rig.wait(b, events[1], now=0.0)
    rig.d2h(b, y, now=0.0)
    events.append(rig.record(b, now=0.0))
    rig.wait(c, events[0], now=0.0)
    rig.task(c, Fill(Region(z.buffer, 0, MiB), 2), now=0.0)
    events.append(rig.record(c, now=0.0))
    return events


def run_scenario(times: list[float]) -> tuple[list[float], list[bytes]]:
    rig = Rig()
    events = scenario(rig)
    for t in times:
        rig.engine.advance(t)
    rig.engine.advance(10.0)
    assert all(e.completed == e.recorded for e in events)
    return [e.timestamp for e in events], [d for _, d in rig.delivered]


@functools.cache
def one_late_call() -> tuple[list[float], list[bytes]]:
    return run_scenario([])


@settings(max_examples=100, deadline=None, database=None)
@given(times=st.lists(st.floats(0.0, 2e-4, allow_nan=False), max_size=40).map(sorted))
def test_advance_gives_the_same_schedule_however_often_it_is_called(times):
    once_stamps, once_data = one_late_call()
    stamps, data = run_scenario(times)
    assert stamps == [approx(t) for t in once_stamps]
    assert data == once_data == [pattern(MiB, 1)]


def test_advance_at_every_completion_matches_one_late_call():
    once, _ = run_scenario([])
    stepped, _ = run_scenario(sorted(once))
    fine, _ = run_scenario([i * 1e-6 for i in range(300)])
    assert stepped == [approx(t) for t in once]
    assert fine == [approx(t) for t in once]


def test_scenario_respects_its_dependencies():
    """Each event comes no earlier than the work it follows allows, whatever the sharing between streams."""
    x_in, y_copied, z_filled, y_out, c_filled = run_scenario([])[0]
    slack = 1e-11
    assert x_in >= LAUNCH + MiB / LINK - slack  # h2d on a
    assert y_copied >= x_in + LAUNCH + 2 * MiB / HBM - slack  # then d2d on a
    assert z_filled >= LAUNCH + 4 * MiB / HBM - slack  # fill on b
    assert y_out >= max(z_filled, y_copied) + LAUNCH + MiB / LINK - slack  # b waits for a's 2nd record, d2h
    assert c_filled >= x_in + LAUNCH + MiB / HBM - slack  # c waits for a's 1st record, then fills
    assert z_filled < x_in  # b did not queue behind a


def test_sync_runner_on_a_virtual_clock_matches_the_engine_alone():
    once, _ = run_scenario([])
    rig = Rig()
    events = scenario(rig)
    rig.runner.wait_until(lambda: all(e.completed == e.recorded for e in events))
    assert [e.timestamp for e in events] == [approx(t) for t in once]
    assert rig.clock.now() == approx(max(once))


# -- the timing model ------------------------------------------------------------------------------------


def test_one_gib_device_to_device_copy_on_910b2():
    rig = Rig(mode="timing")
    s = rig.stream()
    entry = rig.task(s, DeviceToDevice(rig.region(GiB), rig.region(GiB)))
    assert entry.job.cube_limit == CORES  # fifo hands every task the whole chip
    assert entry.job.blocks == 0  # a copy runs on the copy engines, holding no AI core
    assert rig.sync(s) == approx(LAUNCH + 2 * GiB / HBM)


@pytest.mark.parametrize(
    ("chip", "make", "expected"),
    [
        ("910B2", lambda r: DeviceToDevice(r(GiB), r(GiB)), LAUNCH + 2 * GiB / HBM),
        ("910B4", lambda r: DeviceToDevice(r(GiB), r(GiB)), LAUNCH + 2 * GiB / HBM_910B4),
        ("910B2", lambda r: HostToDevice(r(GiB), b""), LAUNCH + GiB / LINK),  # link-bound, not HBM
        ("910B2", lambda r: DeviceToHost(r(GiB), lambda d: None), LAUNCH + GiB / LINK),
        ("910B2", lambda r: Fill(r(GiB), 0), LAUNCH + GiB / HBM),
        ("910B4", lambda r: Fill(r(GiB), 0), LAUNCH + GiB / HBM_910B4),
        ("910B2", lambda r: Fill(r(32), 0), LAUNCH + 32 / HBM),  # tiny: launch overhead dominates
    ],
    ids=["d2d-910B2", "d2d-910B4", "h2d", "d2h", "fill-910B2", "fill-910B4", "fill-tiny"],
)
def test_modeled_durations(chip, make, expected):
    rig = Rig(mode="timing", chip=chip)
    s = rig.stream()
    rig.task(s, make(rig.region))
    event = rig.record(s)
    assert rig.sync(s) == approx(expected)
    assert event.timestamp == approx(expected)


def test_back_to_back_tasks_add_up():
    rig = Rig(mode="timing")
    s = rig.stream()
    for _ in range(5):
        rig.task(s, Fill(rig.region(MiB), 0))
    assert rig.sync(s) == approx(5 * (LAUNCH + MiB / HBM))


def test_timing_mode_has_no_backing_store():
    rig = Rig(mode="timing")
    s = rig.stream()
    r = rig.region(4096)
    assert r.buffer.data is None
    rig.h2d(s, r, pattern(4096))
    rig.d2h(s, r)
    rig.sync(s)
    assert [d for _, d in rig.delivered] == [bytes(4096)]


def test_emulated_npu_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        EmulatedNPU("npu0", profiles.profile("910B2"), "fast")


def test_unknown_policy_and_chip_are_named():
    with pytest.raises(ValueError, match="unknown scheduling policy 'rr'"):
        make_policy("rr")
    with pytest.raises(KeyError, match="unknown chip '910A'"):
        profiles.profile("910A")


# -- device memory ---------------------------------------------------------------------------------------


def test_alloc_rounds_like_acl_and_accounts_capacity():
    memory = DeviceMemory(10 * 1024, backed=True)
    buf = memory.alloc(100)
    assert rounded_size(100) == 128 + ALIGN
    assert buf.size == rounded_size(100)
    assert len(buf.data) == 100
    assert memory.used == buf.size
    memory.free(buf)
    assert memory.used == 0
    memory.free(buf)  # freeing twice does not give the bytes back twice
    assert memory.used == 0


@pytest.mark.parametrize("size", [0, -1])
def test_alloc_of_no_bytes_is_invalid(size):
    with pytest.raises(InvalidParam, match=f"got {size}"):
        DeviceMemory(1024, backed=False).alloc(size)


def test_alloc_past_capacity_is_out_of_memory_and_changes_nothing():
    memory = DeviceMemory(1024, backed=False)
    memory.alloc(500)
    used = memory.used
    with pytest.raises(OutOfMemory, match="out of memory"):
        memory.alloc(600)
    assert memory.used == used


def test_work_queued_against_a_freed_buffer_reads_zeros_and_writes_nothing():
    rig = Rig()
    s = rig.stream()
    busy = rig.region(MiB)
    r = rig.region(4096)
    r.write(pattern(4096))
    rig.h2d(s, busy, pattern(MiB))  # keeps the stream busy
    rig.h2d(s, r, b"\xff" * 4096)
    rig.d2h(s, r)
    rig.npu.memory.free(r.buffer)
    rig.sync(s)
    assert [d for _, d in rig.delivered] == [bytes(4096)]
    assert s.failure is None


def test_numeric_memory_the_host_cannot_back_is_out_of_memory_not_a_crash():
    memory = DeviceMemory(1 << 50, backed=True)
    with pytest.raises(OutOfMemory, match='use mode = "timing"') as info:
        memory.alloc(1 << 48)  # 256 TiB: no host backs that
    assert info.value.code == AclError.RT_MEMORY_ALLOCATION
    assert memory.used == 0


def test_a_kernel_that_crashes_fails_its_stream_with_an_aicore_exception():
    class Broken:
        name = "Broken"

        def cost(self):
            return Cost(hbm_bytes=64)

        def run(self):
            raise ValueError("operands could not be broadcast")

    rig = Rig("numeric", "910B2")
    s = rig.stream()
    rig.task(s, Broken())
    rig.sync(s)
    assert s.failure is not None and s.failure.error.code == AclError.RT_AICORE_EXCEPTION
    assert "Broken failed on the device" in s.failure.error.message
