"""The dispatch policies (scheduler/policy.py, static.py, flex.py) driving an engine over an emulated 910B2 in
timing mode, step by step in modeled time: which kernel starts when, on how many cores, and what each policy
promises (fifo's arrival order and head-of-line blocking, static's partitions, flex's decode-first reserve and
its reserve sized per decode step to a TPOT target). Expected times are worked out from the block-level model
(npu/emulated/timing.py) with `timing.alone`, the time of a kernel on an idle chip.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu.emulated import timing
from npu.emulated.device import EmulatedNPU
from npu.profiles import profile
from npu.tasks import Cost, Unit
from scheduler import flex as flex_module
from scheduler.engine import Engine
from scheduler.policies import POLICIES, make_policy, options
from scheduler.policy import Cores
from scheduler.static import PREFILL_SIDE
from scheduler.stream import Event, Phase, PhaseSource, RecordEntry, Stream, TaskEntry

B2 = profile("910B2")
CORES, VECTOR_CORES = 24, 48
DECODE_SIDE = (Phase.DECODE,)

# A long prefill GEMM: 240 tiles of 1 GFLOP / 1 MB (68 us each on one cube core), ten waves on the whole chip.
PREFILL = Cost(flops=240e9, hbm_bytes=240e6, unit=Unit.CUBE, tiles=240)
# A decode attention kernel: memory-bound, one cube and two vector cores per block, 4 blocks of 1 MB.
DECODE = Cost(hbm_bytes=4e6, unit=Unit.MIX, tiles=4)
DECODE_S = timing.alone(B2, DECODE)  # 3 us launch + 1 MB at one AI core's 57.6 GB/s: 20.4 us
COPY = Cost(hbm_bytes=1e6, link_bytes=1e6, unit=Unit.DMA)


def approx(x: float):
    return pytest.approx(x, rel=1e-9, abs=1e-11)


class FakeTask:
    """A kernel with an explicit cost; run() (called when the chip is handed it) logs its start."""

    def __init__(self, cost: Cost, name: str = "kernel", log: list | None = None) -> None:
        self._cost, self.name, self.log = cost, name, log

    def cost(self) -> Cost:
        return self._cost

    def run(self) -> None:
        if self.log is not None:
            self.log.append(self)


class Rig:
    """An engine over an emulated 910B2 in timing mode, with helpers to queue kernels and step through events."""

    def __init__(self, policy: str, **opts) -> None:
        self.npu = EmulatedNPU("npu0", B2, "timing")
        self.engine = Engine(self.npu, make_policy(policy, **opts))
        self.engine.trace = []
        self.seq = 0

    @property
    def policy(self):
        return self.engine.policy

    def stream(self, phase: Phase = Phase.UNKNOWN) -> Stream:
        stream = Stream(phase=phase, phase_from=PhaseSource.NONE if phase is Phase.UNKNOWN else PhaseSource.ROLE)
        self.engine.add_stream(stream)
        return stream

    def submit(self, stream: Stream, cost: Cost, now: float, name: str = "kernel", log=None) -> TaskEntry:
        self.seq += 1
        entry = TaskEntry(stream, self.seq, task=FakeTask(cost, name, log))
        self.engine.submit(entry, now)
        return entry

    def burst(self, stream: Stream, cost: Cost, n: int, now: float, beside: TaskEntry | None = None) -> list[TaskEntry]:
        """`n` kernels queued on `stream` at once (a decode step's launches), with `beside` queued at the same
        moment (dispatched together)."""
        entries = []
        for _ in range(n):
            self.seq += 1
            entries.append(TaskEntry(stream, self.seq, task=FakeTask(cost)))
        self.engine.submit_all(entries + [beside] * (beside is not None), now)
        return entries

    def entry(self, stream: Stream, cost: Cost) -> TaskEntry:
        """A kernel for `stream`, not queued yet."""
        self.seq += 1
        return TaskEntry(stream, self.seq, task=FakeTask(cost))

    def step_to(self, t: float, check: Callable[[], None] = lambda: None) -> None:
        """Advance to `t` one chip event at a time, calling `check` after each (and at `t`)."""
        check()
        for _ in range(100_000):
            nxt = self.npu.next_event()
            if nxt is None or nxt > t:
                break
            self.engine.advance(nxt)
            check()
        else:
            raise AssertionError("the engine did not get past its events")
        if t < math.inf:
            self.engine.advance(t)
            check()

    def drain(self, check: Callable[[], None] = lambda: None) -> None:
        """Run every chip event until nothing is left, calling `check` after each."""
        self.step_to(math.inf, check)
        assert self.engine.queued == 0 and self.engine.running == []

    def waiting(self) -> list[TaskEntry]:
        """Entries handed to the chip whose blocks wait for cores."""
        return [run.job.owner for run in self.npu.timing.waiting]

    def held(self, phases: tuple[Phase, ...]) -> tuple[int, int]:
        """(cube, vector) cores held by the running kernels of `phases`: a side, or both."""
        cores = Cores.of(self.engine.running, B2)
        sides = [cores.decode] * (Phase.DECODE in phases) + [cores.rest] * any(p is not Phase.DECODE for p in phases)
        return sum(s[0] for s in sides), sum(s[1] for s in sides)


def assert_no_block_waits(rig: Rig) -> None:
    assert rig.waiting() == []


def prefill_and_decode(policy: str, **opts) -> tuple[Rig, Stream, Stream]:
    rig = Rig(policy, **opts)
    return rig, rig.stream(Phase.PREFILL), rig.stream(Phase.DECODE)


# -- fifo --------------------------------------------------------------------------------------------------


def test_fifo_decode_waits_behind_a_long_prefill_kernels_blocks():
    """fifo keeps arrival order with the whole chip per kernel: a decode kernel that arrives while a 24-block
    prefill kernel runs is handed to the chip at once, but its blocks get cores only when the prefill kernel's
    blocks free them (head-of-line blocking), never before."""
    rig, prefill, decode = prefill_and_decode("fifo")
    p = rig.submit(prefill, PREFILL, 0.0)
    assert (p.job.cube_limit, p.job.blocks) == (CORES, CORES)
    d = rig.submit(decode, DECODE, 1e-4)
    assert d.job.started_at == 1e-4 and d.job.cube_limit == CORES

    def blocked_until_prefill_ends():
        if d.job.finished_at == 0.0 and p in rig.engine.running:
            assert rig.waiting() == [d]  # no block of the decode kernel holds a core

    rig.step_to(5e-4, blocked_until_prefill_ends)
    assert rig.waiting() == [d] and p in rig.engine.running
    rig.drain(blocked_until_prefill_ends)
    prefill_s = timing.alone(B2, PREFILL)
    assert p.job.finished_at == approx(prefill_s)
    assert d.job.finished_at == approx(prefill_s + DECODE_S)  # all of its time after the prefill kernel's


def test_fifo_dispatches_in_arrival_order_across_streams():
    """fifo hands ready heads to the chip in arrival order, each with the whole chip: three 24-block kernels on
    three streams finish one after another in the order they were queued."""
    rig = Rig("fifo")
    gemm = Cost(flops=24e9, hbm_bytes=24e6, unit=Unit.CUBE, tiles=24)
    entries = [rig.submit(rig.stream(), gemm, 0.0) for _ in range(3)]
    rig.drain()
    assert [e.job.cube_limit for e in entries] == [CORES] * 3
    one = timing.alone(B2, gemm)
    assert [e.job.finished_at for e in entries] == [approx(one), approx(2 * one), approx(3 * one)]


# -- static ------------------------------------------------------------------------------------------------


def partition_check(rig: Rig, prefill_cores: int) -> Callable[[], None]:
    decode_cores = CORES - prefill_cores

    def check():
        cube, vector = rig.held(PREFILL_SIDE)
        assert cube <= prefill_cores and vector <= 2 * prefill_cores
        cube, vector = rig.held(DECODE_SIDE)
        assert cube <= decode_cores and vector <= 2 * decode_cores
        assert rig.waiting() == []

    return check


def trace_peaks(trace: list[tuple]) -> dict[str, tuple[int, int]]:
    """The most (cube, vector) cores each side held at once, from the engine's trace of finished kernels."""
    peaks = {}
    for side, phases in (("prefill", PREFILL_SIDE), ("decode", DECODE_SIDE)):
        spans = [t for t in trace if t[0] in phases]
        cube = vector = 0
        for _, start, *_ in spans:
            live = [t for t in spans if t[1] <= start < t[2]]
            cube = max(cube, sum(t[3] for t in live))
            vector = max(vector, sum(t[4] for t in live))
        peaks[side] = (cube, vector)
    return peaks


def test_static_prefill_stays_in_its_partition_while_decode_is_idle():
    """static with prefill_cores=18: a prefill kernel launches with a cube limit of 18, and a second prefill (or
    unknown-phase) kernel waits for the partition, although the decode partition's 6 cores sit idle."""
    rig = Rig("static", prefill_cores=18)
    first = rig.submit(rig.stream(Phase.PREFILL), PREFILL, 0.0)
    second = rig.submit(rig.stream(Phase.PREFILL), PREFILL, 0.0)
    tenant = rig.submit(rig.stream(), PREFILL, 0.0)  # unknown phase: shares the prefill partition
    assert (first.job.cube_limit, first.job.blocks) == (18, 18)
    assert second.job is None and tenant.job is None  # not handed to the chip: its blocks would wait
    assert rig.held(PREFILL_SIDE) == (18, 0)
    rig.drain(partition_check(rig, 18))
    assert first.job.finished_at <= second.job.started_at and second.job.finished_at <= tenant.job.started_at
    assert {e.job.cube_limit for e in (first, second, tenant)} == {18}
    # 240 tiles over 18 blocks: the busiest block runs 14 of them.
    assert first.job.finished_at == approx(timing.alone(B2, PREFILL, cube_limit=18))
    assert trace_peaks(rig.engine.trace) == {"prefill": (18, 0), "decode": (0, 0)}


def test_static_decode_stays_in_its_partition_while_prefill_is_idle():
    """static with prefill_cores=18: decode kernels never hold more than the decode partition's 6 cube / 12
    vector cores, even with the prefill partition idle."""
    rig = Rig("static", prefill_cores=18)
    wide = Cost(hbm_bytes=48e6, unit=Unit.MIX, tiles=48)
    vec = Cost(hbm_bytes=48e6, unit=Unit.VECTOR, tiles=48)
    a = rig.submit(rig.stream(Phase.DECODE), wide, 0.0)
    b = rig.submit(rig.stream(Phase.DECODE), vec, 0.0)
    assert (a.job.cube_limit, a.job.vector_limit, a.job.blocks) == (6, 12, 6)
    assert b.job is None  # a's 6 blocks hold all 12 of decode's vector cores
    rig.drain(partition_check(rig, 18))
    assert b.job.blocks == 12
    assert trace_peaks(rig.engine.trace) == {"prefill": (0, 0), "decode": (6, 12)}


def test_static_decode_starts_at_once_beside_a_running_prefill_kernel():
    """static: a decode kernel that arrives while a long prefill kernel holds the prefill partition starts at
    once on the decode partition, and takes no longer than on an idle chip."""
    rig, prefill, decode = prefill_and_decode("static", prefill_cores=18)
    p = rig.submit(prefill, PREFILL, 0.0)
    d = rig.submit(decode, DECODE, 1e-4)
    assert d.job.started_at == 1e-4 and (d.job.cube_limit, d.job.vector_limit, d.job.blocks) == (6, 12, 4)
    assert rig.waiting() == []
    rig.drain(partition_check(rig, 18))
    assert d.job.finished_at == approx(1e-4 + DECODE_S)
    assert d.job.finished_at < p.job.finished_at


_KERNEL = st.builds(
    lambda unit, tiles, flops, nbytes: Cost(
        flops=0.0 if unit is Unit.DMA else tiles * flops,
        hbm_bytes=tiles * nbytes,
        link_bytes=tiles * nbytes if unit is Unit.DMA else 0.0,
        unit=unit,
        tiles=tiles,
    ),
    st.sampled_from([Unit.CUBE, Unit.VECTOR, Unit.MIX, Unit.DMA]),
    st.integers(1, 64),
    st.sampled_from([0.0, 1e8, 1e9]),
    st.sampled_from([1e4, 1e6]),
)
_MIX = st.tuples(
    st.lists(st.sampled_from(list(Phase)), min_size=1, max_size=5),  # the streams' phases
    st.lists(st.tuples(st.integers(0, 4), st.floats(0.0, 1e-3), _KERNEL), min_size=1, max_size=25),
)


def run_mix(rig: Rig, mix, check: Callable[[], None]) -> list[TaskEntry]:
    """Queue a random kernel mix at its arrival times, checking after every chip event; run it to the end."""
    phases, arrivals = mix
    streams = [rig.stream(phase) for phase in phases]
    entries = []
    for i, t, cost in sorted(arrivals, key=lambda a: a[1]):
        rig.step_to(t, check)
        entries.append(rig.submit(streams[i % len(streams)], cost, t))
        check()
    rig.drain(check)
    assert all(e.job is not None and e.job.finished_at >= e.job.started_at for e in entries)
    return entries


@settings(max_examples=60, deadline=None, database=None)
@given(mix=_MIX, prefill_cores=st.integers(1, CORES - 1))
def test_static_partitions_hold_for_any_kernel_mix(mix, prefill_cores):
    """static, any mix of cube / vector / mix kernels and copies on streams of any phase, arriving at any time:
    after every chip event the prefill side (prefill and unknown phases) holds at most its partition and decode at
    most the rest, and no kernel's blocks wait on the chip; every kernel completes."""
    rig = Rig("static", prefill_cores=prefill_cores)
    run_mix(rig, mix, partition_check(rig, prefill_cores))
    peaks = trace_peaks(rig.engine.trace)  # the same from the kernels' start and finish times
    assert peaks["prefill"][0] <= prefill_cores and peaks["prefill"][1] <= 2 * prefill_cores
    assert peaks["decode"][0] <= CORES - prefill_cores and peaks["decode"][1] <= 2 * (CORES - prefill_cores)


# -- flex --------------------------------------------------------------------------------------------------

# A wide decode kernel (a bigger batch's attention or MLP): 24 memory-bound blocks of 1 MB, so on r cores it takes
# 3 us + ceil(24 / r) x 17.4 us (1 MB at one AI core's 57.6 GB/s): 72.4 us on 6 cores, 37.7 us on 12 to 23.
WIDE = Cost(hbm_bytes=24e6, unit=Unit.MIX, tiles=24)
# A long prefill GEMM that holds 24 - reserve cube cores for over 70 ms: beside every step of a test.
LONG_PREFILL = Cost(flops=240e11, hbm_bytes=240e6, unit=Unit.CUBE, tiles=240)
# A prefill kernel of two blocks of 12 GFLOP (0.8 ms): beside a whole step, yet on 2 cores whatever the reserve,
# so a decode step beside it always has its reserve.
PAIR_PREFILL = Cost(flops=24e9, hbm_bytes=2e6, unit=Unit.CUBE, tiles=2)
TARGET = 300e-6  # a step's device-time goal that puts 4 WIDE kernels on 6 cores


def predict(costs: list[Cost], cores: int) -> float:
    """A step's predicted time on `cores` AI cores (and twice the vector cores): its kernels one after another,
    each as on an idle chip."""
    return sum(timing.alone(B2, cost, cores, 2 * cores) for cost in costs)


def fewest_cores(costs: list[Cost], goal: float, slowdown: float = 1.0) -> int:
    """What flex's docstring says a step's reserve is: the fewest cores in [MIN_DECODE, 24 - MIN_PREFILL] whose
    prediction, times the slowdown, meets the goal, or the most when none does. Tried one by one (flex bisects)."""
    top = CORES - flex_module.MIN_PREFILL
    return next((r for r in range(flex_module.MIN_DECODE, top + 1) if predict(costs, r) * slowdown <= goal), top)


class Sizer:
    """flex's docstring as a model: a step is sized as it begins; a step that ran beside prefill then moves the
    slowdown by SMOOTHING toward its measured / predicted time (the prediction on the reserve it was given)."""

    def __init__(self, target_s: float) -> None:
        self.target, self.slowdown, self.predicted = target_s, 1.0, 0.0

    def begin(self, costs: list[Cost]) -> int:
        reserve = fewest_cores(costs, self.target, self.slowdown)
        self.predicted = predict(costs, reserve)
        return reserve

    def end(self, step_s: float, contended: bool) -> None:
        if contended:
            self.slowdown += flex_module.SMOOTHING * (step_s / self.predicted - self.slowdown)


def decode_step(
    rig: Rig,
    decode: Stream,
    start: float,
    bursts: tuple[int, ...],
    beside: Cost | None = None,
    gap_s: float = 50e-6,
    check: Callable[[], None] = lambda: None,
) -> tuple[int, float]:
    """One decode step from `start`: bursts of WIDE kernels queued at once, each burst `gap_s` after the one
    before drained (a host gap under gap_ms: the same step), with a `beside` prefill kernel queued just after
    the first. Returns the reserve the step was given as it began and when it drained."""
    prefill = next(s for s in rig.engine.streams if s.phase is Phase.PREFILL)
    t, reserve = start, None
    for n in bursts:
        rig.step_to(t, check)
        assert not decode.queue  # the step drained before this burst (and the one before it)
        first = reserve is None and beside is not None
        entries = rig.burst(decode, WIDE, n, t, rig.entry(prefill, beside) if first else None)
        reserve = rig.policy.reserve if reserve is None else reserve
        while decode.queue:
            rig.step_to(rig.npu.next_event(), check)
        t = entries[-1].job.finished_at + gap_s
    return reserve, entries[-1].job.finished_at


def test_flex_decode_starts_at_once_on_the_reserve_beside_a_long_prefill_kernel():
    """flex: while decode is active, a prefill kernel launches with a core limit of 24 - reserve; a decode kernel
    arriving while that long prefill kernel runs starts at once (its start is its arrival, no block waits) on the
    reserved cores, and takes no longer than on an idle chip. With a 30 us target a 4-block decode kernel is
    given 4 cores (20.4 us; on 2 or 3 it takes 37.7 us)."""
    rig, prefill, decode = prefill_and_decode("flex", tpot_target_ms=0.03)
    d0 = rig.submit(decode, DECODE, 0.0)  # decode is active: its step is sized as it begins
    assert rig.policy.reserve == 4 == fewest_cores([DECODE], 30e-6)
    p = rig.submit(prefill, PREFILL, 0.0)
    assert (p.job.cube_limit, p.job.blocks) == (CORES - 4, CORES - 4)
    rig.step_to(5e-4)
    assert d0.job.finished_at == approx(DECODE_S)

    d1 = rig.submit(decode, DECODE, 5e-4)  # a new step; the prefill kernel holds 20 cube cores until 0.82 ms
    assert rig.policy.reserve == 4
    assert d1.job.started_at == 5e-4
    assert d1.job.cube_limit <= 4 and d1.job.blocks == 4
    assert rig.waiting() == []
    rig.step_to(7e-4, lambda: assert_no_block_waits(rig))
    assert d1.job.finished_at == approx(5e-4 + DECODE_S)
    assert p in rig.engine.running  # the decode kernel did not wait for it
    rig.drain()
    assert p.job.finished_at == approx(timing.alone(B2, PREFILL, cube_limit=CORES - 4))


def test_flex_prefill_gets_the_whole_chip_once_decode_has_lingered_out():
    """flex: within linger_ms of the last decode work a prefill kernel still leaves the reserve free (one core:
    a 20 us step is far under the default 40 ms target); once no decode work has been seen for longer than
    linger_ms (10 ms), a prefill kernel launches on all 24 cores."""
    rig, prefill, decode = prefill_and_decode("flex", linger_ms=10.0)
    rig.submit(decode, DECODE, 0.0)
    rig.step_to(1e-3)
    within = rig.submit(prefill, PREFILL, 5e-3)
    assert within.job.cube_limit == CORES - rig.policy.reserve == CORES - flex_module.MIN_DECODE
    rig.step_to(15e-3)
    assert within.job.finished_at < 15e-3
    after = rig.submit(prefill, PREFILL, 15e-3)
    assert (after.job.cube_limit, after.job.blocks) == (CORES, CORES)
    rig.drain()
    assert after.job.finished_at == approx(15e-3 + timing.alone(B2, PREFILL))


def test_flex_linger_counts_from_the_end_of_decode_work():
    """flex's docstring: decode is active while a decode stream 'has work queued or running, or had within
    linger_ms'. A decode kernel that runs from 0 to 2 ms was running 9 ms before a prefill kernel that arrives at
    11 ms, so with linger_ms=10 that prefill kernel must still leave the reserve free."""
    rig, prefill, decode = prefill_and_decode("flex", linger_ms=10.0)
    long_decode = Cost(hbm_bytes=460e6, unit=Unit.MIX, tiles=4)  # 2.0 ms on 4 cores
    d = rig.submit(decode, long_decode, 0.0)
    rig.step_to(11e-3)
    assert d.job.finished_at == approx(timing.alone(B2, long_decode))
    assert 11e-3 - d.job.finished_at < 10e-3
    p = rig.submit(prefill, PREFILL, 11e-3)
    assert p.job.cube_limit == CORES - rig.policy.reserve


def test_flex_decode_takes_its_tiles_when_no_prefill_waits():
    """flex: with no prefill work, a decode kernel may use every free core (up to its tiles), not just the
    reserve; with prefill waiting, a decode kernel is capped at the reserve (6 cores: a WIDE kernel within an
    80 us target needs ceil(24 / r) <= 4)."""
    rig, prefill, decode = prefill_and_decode("flex", tpot_target_ms=0.08)
    alone_ = rig.submit(decode, WIDE, 0.0)
    assert rig.policy.reserve == 6
    assert (alone_.job.cube_limit, alone_.job.blocks) == (CORES, CORES)
    rig.drain()
    p, capped = TaskEntry(prefill, 2, task=FakeTask(PREFILL)), TaskEntry(decode, 3, task=FakeTask(WIDE))
    rig.engine.submit_all([p, capped], 1e-3)  # both ready at once: decode first, on its reserve
    assert p.job.cube_limit == CORES - rig.policy.reserve
    assert capped.job.started_at == 1e-3 and capped.job.blocks == rig.policy.reserve == 6
    assert rig.waiting() == []


WIDER = Cost(hbm_bytes=36e6, unit=Unit.MIX, tiles=24)  # 1.5 MB blocks: 3 us + ceil(24 / r) x 26 us


@pytest.mark.parametrize(
    ("cost", "n", "expected"),
    [(WIDE, 4, 6), (WIDE, 6, 12), (WIDER, 4, 12), (WIDE, 10, 22)],
    ids=["4-wide-6", "6-wide-12", "4-wider-12", "10-wide-none-meets-22"],
)
def test_flex_sizes_a_step_to_the_fewest_cores_whose_predicted_time_meets_the_target(cost, n, expected):
    """flex, 0.3 ms target: when a decode step begins, before any of its kernels ran, the reserve is the fewest
    cores on which its queued kernels' predicted times (timing.alone, one after another) add up to at most the
    target. 4 WIDE kernels need ceil(24 / r) <= 4 (6 cores: 290 us); 6 need <= 2 (12 cores: 226 us), as do 4 of
    1.5 MB blocks (12 cores: 220 us); 10 miss it even on 22 cores (377 us), which is then what they get: prefill
    keeps 2. A prefill kernel queued beside the step gets the rest."""
    rig, prefill, decode = prefill_and_decode("flex", tpot_target_ms=TARGET * 1e3)
    p = rig.entry(prefill, LONG_PREFILL)
    entries = rig.burst(decode, cost, n, 0.0, beside=p)
    assert rig.policy.reserve == expected == fewest_cores([cost] * n, TARGET)
    if expected < 22:
        assert predict([cost] * n, expected) <= TARGET < predict([cost] * n, expected - 1)
    else:
        assert predict([cost] * n, 22) > TARGET
    assert rig.policy.steps[decode][2] == approx(predict([cost] * n, expected))
    assert p.job.cube_limit == CORES - expected
    assert entries[0].job.blocks == expected and rig.waiting() == []
    rig.step_to(5e-3, lambda: assert_no_block_waits(rig))
    assert entries[-1].job.finished_at == approx(predict([cost] * n, expected))  # as predicted, beside prefill


@pytest.mark.parametrize(
    ("target_ms", "cost", "expected"),
    [(40.0, WIDE, 1), (40.0, DECODE, 1), (1e-3, WIDE, 22), (1e-3, DECODE, 22)],
    ids=["loose-wide", "loose-decode", "tight-wide", "tight-decode"],
)
def test_flex_a_loose_target_gives_decode_one_core_and_one_nothing_meets_gives_it_22(target_ms, cost, expected):
    """flex: a step of 4 kernels that meets the default 40 ms target on one core (1.7 ms of WIDE kernels) is
    given MIN_DECODE = 1 core; one that no reserve can bring under a 1 us target gets 24 - MIN_PREFILL = 22."""
    rig, _, decode = prefill_and_decode("flex", tpot_target_ms=target_ms)
    rig.burst(decode, cost, 4, 0.0)
    assert rig.policy.reserve == expected == fewest_cores([cost] * 4, target_ms / 1e3)


@pytest.mark.parametrize(
    ("target_ms", "pct", "cost", "expected"),
    [
        (40.0, 100.0, WIDE, 12),
        (40.0, 5.0, WIDE, 22),
        (40.0, 5.0, DECODE, 4),
        (TARGET * 1e3, 300.0, WIDE, 6),
        (TARGET * 1e3, 100.0, WIDE, 12),
    ],
    ids=["twice-alone-12", "5pct-22", "5pct-4-blocks-4", "target-smaller-6", "isolated-smaller-12"],
)
def test_flex_tpot_isolated_pct_keeps_a_step_within_that_much_of_the_whole_chip(target_ms, pct, cost, expected):
    """flex with tpot_isolated_pct: a step's goal is at most (1 + pct / 100) times its predicted time alone on the
    whole chip, and the smaller of that and the target. 4 WIDE kernels take 81 us on 24 cores: within 100 % over
    it (163 us) they need 12 cores, within 5 % no reserve will do (22); 4-block kernels are as fast on 4 cores
    as on 24. With a 0.3 ms target, 300 % (326 us) leaves the target the goal (6 cores), 100 % does not (12)."""
    rig, _, decode = prefill_and_decode("flex", tpot_target_ms=target_ms, tpot_isolated_pct=pct)
    rig.burst(decode, cost, 4, 0.0)
    goal = min(target_ms / 1e3, predict([cost] * 4, CORES) * (1 + pct / 100))
    assert rig.policy.reserve == expected == fewest_cores([cost] * 4, goal)
    state = rig.policy.status()
    assert (state["decode_reserve"], state["tpot_isolated_pct"]) == (expected, pct)
    assert "tpot_isolated_pct" not in make_policy("flex").status()


def test_flex_a_slow_step_beside_prefill_raises_the_next_steps_reserve():
    """flex: a step that ran beside a prefill kernel and took longer than predicted (here a second burst of
    kernels after a 50 us host gap, under gap_ms: 630 us against 290 us predicted on 6 cores) moves the slowdown
    by SMOOTHING toward measured / predicted (1.23), and the next step is sized with it: 4 WIDE kernels need
    ceil(24 / r) <= 3 within 0.3 ms, 8 cores."""
    rig, _, decode = prefill_and_decode("flex", tpot_target_ms=TARGET * 1e3)
    reserve, end = decode_step(rig, decode, 0.0, (4, 4), beside=LONG_PREFILL)
    predicted = predict([WIDE] * 4, 6)
    assert reserve == 6 and rig.policy.steps[decode][2] == approx(predicted)
    assert end == approx(2 * predicted + 50e-6)  # ran on its reserve, beside prefill, as the model has it
    assert rig.policy.slowdown == 1.0  # measured when the next step begins
    next_reserve, _ = decode_step(rig, decode, 2e-3, (4,))
    slowdown = 1.0 + flex_module.SMOOTHING * (end / predicted - 1.0)
    assert rig.policy.slowdown == approx(slowdown) and slowdown == pytest.approx(1.2345, abs=1e-4)
    assert next_reserve == rig.policy.reserve == 8 == fewest_cores([WIDE] * 4, TARGET, slowdown)


def slow_then_on_time(n_slow: int, n_on_time: int) -> tuple[list[int], list[int]]:
    """Decode steps 2 ms apart, each beside a PAIR_PREFILL kernel (0.8 ms on 2 cores): `n_slow` of two bursts of
    4 WIDE kernels 50 us apart, then `n_on_time` of one burst. Returns the reserves they were given, checked
    against the model step by step."""
    rig, _, decode = prefill_and_decode("flex", tpot_target_ms=TARGET * 1e3)
    model = Sizer(TARGET)
    reserves = []
    for i, bursts in enumerate([(4, 4)] * n_slow + [(4,)] * n_on_time):
        start = i * 2e-3
        reserve, end = decode_step(rig, decode, start, bursts, PAIR_PREFILL, check=lambda: assert_no_block_waits(rig))
        assert reserve == model.begin([WIDE] * 4)
        assert end - start == approx(len(bursts) * model.predicted + (len(bursts) - 1) * 50e-6)
        model.end(end - start, contended=True)
        reserves.append(reserve)
    rig.drain(lambda: assert_no_block_waits(rig))
    return reserves[:n_slow], reserves[n_slow:]


def test_flex_slow_decode_steps_beside_prefill_grow_the_reserve_up_to_22():
    """flex: steps beside prefill that keep taking over twice their prediction raise the slowdown step after step,
    and with it the reserve (6, 8, 12, ...), up to 22 cores once no reserve meets the target (prefill keeps 2)."""
    slow, _ = slow_then_on_time(10, 0)
    assert slow[:3] == [6, 8, 12] and slow[-1] == 22
    assert all(a <= b for a, b in zip(slow, slow[1:], strict=False))


def test_flex_decode_steps_on_time_beside_prefill_bring_the_reserve_back():
    """flex: once the steps beside prefill take what was predicted, the slowdown falls back toward 1 and the
    reserve with it, down to what a step needs on its own (6 cores for 4 WIDE kernels within 0.3 ms)."""
    slow, on_time = slow_then_on_time(10, 20)
    assert slow[-1] == 22 and on_time[-1] == 6
    assert all(a >= b for a, b in zip(on_time, on_time[1:], strict=False))


def test_flex_decode_steps_without_prefill_leave_the_slowdown_at_1():
    """flex: only steps that ran beside prefill say how much slower than predicted decode runs: steps with no
    prefill work (twice their prediction here, with a host gap inside) leave the slowdown at 1.0 and the reserve
    at what each step needs."""
    rig, _, decode = prefill_and_decode("flex", tpot_target_ms=TARGET * 1e3)
    reserves = [decode_step(rig, decode, i * 2e-3, (4, 4))[0] for i in range(6)]
    assert reserves == [6] * 6 and rig.policy.slowdown == 1.0


@pytest.mark.parametrize(("gap_s", "one_step"), [(50e-6, True), (150e-6, False)], ids=["50us", "150us"])
def test_flex_host_gaps_shorter_than_gap_ms_keep_one_step_sized_once(gap_s, one_step):
    """flex, gap_ms 0.1: a burst of 10 WIDE kernels 50 us after a burst of 4 drained is the same step: the reserve
    stays as the step was sized (6), and the step is measured over both bursts when the next one begins. 150 us
    after, it is a new step, sized for its 10 kernels (22)."""
    rig, prefill, decode = prefill_and_decode("flex", tpot_target_ms=TARGET * 1e3)
    reserve, _ = decode_step(rig, decode, 0.0, (4,), beside=PAIR_PREFILL)
    assert reserve == 6
    start = rig.engine.t + gap_s
    second, end = decode_step(rig, decode, start, (10,))
    assert second == rig.policy.reserve == (6 if one_step else 22)
    decode_step(rig, decode, 5e-3, (4,))
    assert end < 2e-3  # the prefill kernel (0 to 0.8 ms) ran beside it; it is measured as the step at 5 ms begins
    if one_step:  # one step of 14 kernels, predicted as its first 4, from 0
        span, predicted = end, predict([WIDE] * 4, 6)
    else:  # the first step ran as predicted (slowdown 1); the second, from its own start, against its own
        span, predicted = end - start, predict([WIDE] * 10, 22)
    assert rig.policy.slowdown == approx(1 + flex_module.SMOOTHING * (span / predicted - 1))


def test_flex_prefill_between_steps_does_not_count_as_running_beside_the_step():
    """flex's docstring: the slowdown is measured 'on earlier steps that ran beside prefill'. A 630 us step at
    0 ms with no prefill (twice its prediction), a short prefill kernel at 1-1.14 ms (in the host gap, within
    linger_ms), then the next step at 2 ms: the first step was not contended, the slowdown stays 1.0 and the
    reserve 6."""
    rig, prefill, decode = prefill_and_decode("flex", tpot_target_ms=TARGET * 1e3)
    _, end = decode_step(rig, decode, 0.0, (4, 4))
    assert end < 1e-3
    rig.step_to(1e-3)
    gemm = rig.submit(prefill, Cost(flops=24e9, hbm_bytes=24e6, unit=Unit.CUBE, tiles=24), 1e-3)
    rig.step_to(2e-3)
    assert 1e-3 < gemm.job.finished_at < 2e-3  # nothing of the prefill kernel overlapped the first step
    rig.burst(decode, WIDE, 4, 2e-3)
    assert (rig.policy.reserve, rig.policy.slowdown) == (6, 1.0)


@settings(max_examples=40, deadline=None, database=None)
@given(
    target_us=st.sampled_from([30.0, 90.0, 200.0, 1000.0]),
    isolated_pct=st.sampled_from([0.0, 5.0, 100.0]),
    plan=st.lists(
        st.tuples(st.integers(1, 12), st.sampled_from([DECODE, WIDE]), st.booleans()), min_size=2, max_size=12
    ),
)
def test_flex_reserve_stays_within_1_and_22(target_us, isolated_pct, plan):
    """flex: whatever the decode steps (1-12 kernels each, of 4 or 24 blocks, slow or fast against the goal) and
    whether prefill runs beside them, the reserve stays within [MIN_DECODE, 24 - MIN_PREFILL] = [1, 22]."""
    rig, prefill, decode = prefill_and_decode("flex", tpot_target_ms=target_us / 1e3, tpot_isolated_pct=isolated_pct)
    short_prefill = Cost(flops=24e9, hbm_bytes=24e6, unit=Unit.CUBE, tiles=24)
    assert flex_module.MIN_DECODE == 1 and CORES - flex_module.MIN_PREFILL == 22

    def within_bounds():
        assert rig.policy.reserve is None or 1 <= rig.policy.reserve <= 22

    for i, (n, cost, with_prefill) in enumerate(plan):
        start = i * 2e-3
        rig.step_to(start, within_bounds)
        rig.burst(decode, cost, n, start)
        if with_prefill:
            rig.submit(prefill, short_prefill, start)
        assert 1 <= rig.policy.reserve <= 22
        assert rig.waiting() == []
    rig.drain()


# -- what every policy must keep ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(mix=_MIX)
def test_flex_never_hands_the_chip_a_kernel_whose_blocks_must_wait(mix):
    """flex, any kernel mix: every kernel it dispatches has all of its blocks on cores at once (nothing sits in
    the chip's waiting queue after any event), so a later decode kernel is never queued behind one on the chip."""
    rig = Rig("flex")
    run_mix(rig, mix, lambda: assert_no_block_waits(rig))


@pytest.mark.parametrize("policy", ["static", "flex"])
def test_partitioning_policies_start_kernels_when_they_dispatch_them(policy):
    """static and flex: in a mix of prefill, decode and unknown-phase kernels, every kernel's blocks take cores
    the moment it is dispatched: the chip never holds one back (unlike fifo, which is the contrast case here)."""
    rigs = {name: Rig(name) for name in (policy, "fifo")}
    for name, rig in rigs.items():
        streams = [rig.stream(p) for p in (Phase.PREFILL, Phase.PREFILL, Phase.DECODE, Phase.DECODE, Phase.UNKNOWN)]
        waited = []
        check = lambda rig=rig, waited=waited: waited.extend(rig.waiting())  # noqa: E731
        for k in range(6):
            t = k * 2e-4
            rig.step_to(t, check)
            for s in streams:
                rig.submit(s, DECODE if s.phase is Phase.DECODE else PREFILL, t)
                check()
        rig.drain(check)
        assert bool(waited) == (name == "fifo")


@pytest.mark.parametrize("policy", ["fifo", "static", "flex"])
def test_copies_start_at_once_whatever_the_cores(policy):
    """Every policy: a copy (Unit.DMA) holds no AI core, so it is dispatched the moment it heads its stream,
    while kernels of its own phase hold every core that phase may use."""
    rig = Rig(policy)
    wide = Cost(flops=48e9, hbm_bytes=48e6, unit=Unit.MIX, tiles=48)
    busy = [TaskEntry(rig.stream(p), i, task=FakeTask(wide)) for i, p in enumerate((Phase.DECODE, Phase.PREFILL))]
    rig.engine.submit_all(busy, 0.0)
    held = rig.held(tuple(Phase))  # fifo counts blocks that wait on the chip too
    assert held[0] >= CORES and held[1] >= VECTOR_CORES  # every core of the chip is held
    assert rig.waiting() == [] or policy == "fifo"
    t = 1e-5
    copies = [rig.submit(rig.stream(phase), COPY, t) for phase in (Phase.PREFILL, Phase.DECODE, Phase.UNKNOWN)]
    for c in copies:
        assert c.job is not None and c.job.started_at == t and c.job.blocks == 0
    rig.drain()
    assert all(c.job.finished_at > t for c in copies)


def _copy_behind_waiting_static():
    rig = Rig("static", prefill_cores=18)
    held = rig.submit(rig.stream(Phase.PREFILL), PREFILL, 0.0)
    waits = rig.submit(rig.stream(Phase.PREFILL), PREFILL, 0.0)
    assert held.job.blocks == 18 and waits.job is None  # the first holds the 18 prefill cores, the second waits
    return rig, Phase.PREFILL


def _copy_beside_whole_chip_prefill_flex():
    rig = Rig("flex")
    held = rig.submit(rig.stream(Phase.PREFILL), PREFILL, 0.0)
    waits = rig.submit(rig.stream(Phase.DECODE), DECODE, 0.0)
    # Decode was idle: the prefill kernel holds all 24 cores, over the 12 it may hold now that decode is active.
    assert held.job.blocks == 24 and waits.job is None
    return rig, Phase.PREFILL


def _decode_copy_while_decode_holds_the_chip_flex():
    rig = Rig("flex")
    held = rig.submit(rig.stream(Phase.DECODE), Cost(hbm_bytes=4e9, unit=Unit.MIX, tiles=24), 0.0)
    waits = rig.submit(rig.stream(Phase.PREFILL), PREFILL, 0.0)
    # No prefill was waiting: the decode kernel holds all 24 cores, over the reserve of 12 it may hold now.
    assert held.job.blocks == 24 and waits.job is None
    return rig, Phase.DECODE


@pytest.mark.parametrize(
    "setup",
    [_copy_behind_waiting_static, _copy_beside_whole_chip_prefill_flex, _decode_copy_while_decode_holds_the_chip_flex],
    ids=["static-behind-a-waiting-kernel", "flex-prefill-over-its-cap", "flex-decode-over-its-reserve"],
)
def test_copies_start_at_once_while_kernels_of_their_side_wait(setup):
    """A copy holds no AI core: no policy should hold it back because kernels of its phase wait for cores."""
    rig, phase = setup()
    copy = rig.submit(rig.stream(phase), COPY, 1e-5)
    assert copy.job is not None and copy.job.started_at == 1e-5


# -- switching policies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "switches",
    [
        [("static", {"prefill_cores": 18}), ("flex", {}), ("fifo", {})],
        [("flex", {"tpot_target_ms": 0.05}), ("static", {}), ("flex", {})],
        [("fifo", {}), ("static", {"prefill_cores": 4}), ("static", {"prefill_cores": 20})],
    ],
    ids=["fifo-static-flex-fifo", "fifo-flex-static-flex", "fifo-static4-static20"],
)
def test_switching_policies_loses_and_reorders_nothing(switches):
    """engine.set_policy while work is queued on several streams (prefill, decode, unknown phase; kernels,
    copies and event records): every entry completes, each stream's completed counter equals what was queued on
    it, and each stream's tasks start and finish in the order they were queued."""
    rig = Rig("fifo")
    streams = [rig.stream(p) for p in (Phase.PREFILL, Phase.PREFILL, Phase.DECODE, Phase.DECODE, Phase.UNKNOWN)]
    started: dict[Stream, list] = {s: [] for s in streams}
    queued: dict[Stream, list[TaskEntry]] = {s: [] for s in streams}
    records = []
    kinds = [PREFILL, DECODE, COPY, Cost(hbm_bytes=8e6, unit=Unit.VECTOR, tiles=16)]
    for k in range(8):
        for j, s in enumerate(streams):
            cost = DECODE if s.phase is Phase.DECODE and k % 2 else kinds[(k + j) % len(kinds)]
            queued[s].append(rig.submit(s, cost, 0.0, log=started[s]))
        event = Event(recorded=1)
        records.append(event)
        rig.engine.submit(RecordEntry(streams[k % len(streams)], 1000 + k, event=event, generation=1), 0.0)
    for i, (name, opts) in enumerate(switches):
        rig.step_to((i + 1) * 5e-4)
        assert rig.engine.queued > 0  # the switch happens with work still queued
        rig.engine.set_policy(make_policy(name, **opts))
    rig.drain()
    for s in streams:
        entries = queued[s]
        assert started[s] == [e.task for e in entries]
        records_here = sum(1 for k in range(8) if streams[k % len(streams)] is s)
        assert s.completed == len(entries) + records_here
        for before, after in zip(entries, entries[1:], strict=False):
            assert before.job.finished_at <= after.job.started_at
    assert all(e.completed == 1 for e in records)
    assert rig.engine.queued == 0 and rig.engine.running == [] and not rig.npu.busy


# -- the registry ------------------------------------------------------------------------------------------


def test_make_policy_names_the_valid_policies_for_an_unknown_one():
    """make_policy with an unknown name raises ValueError naming the name and every valid policy."""
    with pytest.raises(ValueError, match="unknown scheduling policy 'rr'") as info:
        make_policy("rr")
    for name in ("fifo", "static", "flex"):
        assert name in str(info.value)
    assert set(POLICIES) == {"fifo", "static", "flex"}


@pytest.mark.parametrize(
    ("name", "bad", "valid"),
    [
        ("static", "prefil_cores", ["prefill_cores"]),
        ("flex", "tpot_ms", ["tpot_target_ms", "tpot_isolated_pct", "linger_ms", "gap_ms"]),
        ("fifo", "reserve", []),
    ],
)
def test_make_policy_names_the_valid_options_for_an_unknown_one(name, bad, valid):
    """make_policy with an option the policy does not take raises ValueError naming it and the valid options."""
    assert options(name) == valid
    with pytest.raises(ValueError, match=f"policy '{name}' has no option {bad}") as info:
        make_policy(name, **{bad: 1})
    message = str(info.value)
    for option in valid:
        assert option in message
    if not valid:
        assert "(its options: none)" in message


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("static", {"prefill_cores": 0}, "prefill_cores must be at least 1, got 0"),
        ("flex", {"tpot_target_ms": 0}, "tpot_target_ms must be > 0, got 0"),
        ("flex", {"tpot_isolated_pct": -1}, "tpot_isolated_pct must be >= 0"),
    ],
)
def test_make_policy_refuses_option_values_that_mean_nothing(name, opts, match):
    """Option values no chip could use are refused when the policy is made, with the value in the message."""
    with pytest.raises(ValueError, match=match):
        make_policy(name, **opts)


def test_make_policy_gives_fresh_policies_with_their_options():
    """Each call makes a new policy with the options given; none share state."""
    a, b = make_policy("flex", tpot_target_ms=20), make_policy("flex")
    assert a is not b and (a.target, b.target, b.isolated_pct) == (0.02, 0.04, 0.0)
    assert make_policy("static", prefill_cores=18).prefill_cores == 18
    assert make_policy("fifo").name == "fifo"


def test_flex_a_step_of_copies_on_another_decode_stream_leaves_the_reserve():
    """A serving engine reads its sampled tokens back with a blocking copy on its default stream, another decode
    stream: that step needs no core and must not size the reserve down to 1 (found live: prefill then took 23
    cores between decode steps)."""
    rig, prefill, decode = prefill_and_decode("flex", tpot_target_ms=TARGET * 1e3)
    tokens = rig.stream(Phase.DECODE)
    p = rig.entry(prefill, LONG_PREFILL)
    rig.burst(decode, WIDE, 4, 0.0, beside=p)
    assert rig.policy.reserve == 6
    rig.step_to(1e-3)
    rig.burst(tokens, Cost(hbm_bytes=4e3, link_bytes=4e3, unit=Unit.DMA), 1, 1e-3)
    assert rig.policy.reserve == 6
