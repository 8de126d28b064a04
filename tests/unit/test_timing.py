"""The block-level timing model (npu/emulated/timing.py), step by step in modeled time, against completion times
worked out by hand from the 910B2 profile: blocks hold cores until they finish, later kernels take cores as
blocks free them, stream core limits let kernels run side by side, HBM is shared per core and per chip."""

from __future__ import annotations

import pytest

from npu.emulated import timing
from npu.emulated.device import EmulatedNPU
from npu.executor import Job
from npu.profiles import profile
from npu.tasks import Cost, Unit
from scheduler.engine import Engine
from scheduler.policies import make_policy
from scheduler.stream import Event as StreamEvent
from scheduler.stream import RecordEntry, Stream, TaskEntry

B2 = profile("910B2")
CORES, VECTOR_CORES = 24, 48
CORE_PEAK = 1.8e9 * 16**3 * 2  # one cube core: a 16^3 FP16 cube per cycle at 1.8 GHz
CORE_BW = 32 * 1.8e9  # ddr_rate 32 bytes/cycle per AI core
HBM = 24 * CORE_BW  # CANN's rule: ddr_rate x cores x clock, 1.38 TB/s
OVERHEAD = 3e-6

# One tile of GEMM work: 1 GFLOP, 1 MB. 24 tiles: one per core. A stream of 1.2 GB over 48 vector tiles.
TILE_FLOPS, TILE_BYTES = 1e9, 1e6
GEMM = Cost(flops=24 * TILE_FLOPS, hbm_bytes=24 * TILE_BYTES, unit=Unit.CUBE, tiles=24)
GEMM_S = OVERHEAD + TILE_FLOPS / CORE_PEAK  # 70.8 us: compute-bound (its megabyte takes 17 us)


class FakeTask:
    def __init__(self, cost: Cost, name: str = "kernel") -> None:
        self._cost, self.name = cost, name

    def cost(self) -> Cost:
        return self._cost

    def run(self) -> None:
        pass


def test_profile_figures_used_here():
    assert (B2.ai_cores, B2.vector_cores, B2.core_flops, B2.core_bandwidth) == (CORES, VECTOR_CORES, CORE_PEAK, CORE_BW)
    assert B2.peak_flops == pytest.approx(353.9e12, rel=1e-3)
    assert (B2.hbm_bandwidth, B2.launch_overhead_s, B2.vector_core_bandwidth) == (HBM, OVERHEAD, CORE_BW / 2)


def test_compute_bound_kernel_alone_takes_one_block_time():
    assert timing.alone(B2, GEMM) == pytest.approx(GEMM_S)


def test_a_partial_last_wave_costs_a_whole_block():
    """25 tiles on 24 cores: one core runs two tiles, and the kernel waits for it."""
    uneven = Cost(flops=25 * TILE_FLOPS, unit=Unit.CUBE, tiles=25)
    assert timing.alone(B2, uneven) == pytest.approx(OVERHEAD + 2 * TILE_FLOPS / CORE_PEAK)


def test_efficiency_stretches_compute():
    half = Cost(flops=24 * TILE_FLOPS, unit=Unit.CUBE, tiles=24, efficiency=0.5)
    assert timing.alone(B2, half) == pytest.approx(OVERHEAD + 2 * TILE_FLOPS / CORE_PEAK)


def test_memory_bound_kernel_is_limited_by_each_cores_path():
    """1.2 GB over all 48 vector cores, 28.8 GB/s each: the chip's 1.38 TB/s."""
    stream = Cost(hbm_bytes=1.2e9, unit=Unit.VECTOR, tiles=4800)
    assert timing.alone(B2, stream) == pytest.approx(OVERHEAD + 1.2e9 / (48 * CORE_BW / 2))
    # A stream limit of 12 vector cores: a quarter of the cores move a quarter of the bytes per second.
    assert timing.alone(B2, stream, vector_limit=12) == pytest.approx(OVERHEAD + 1.2e9 / (12 * CORE_BW / 2))


def test_a_copy_holds_no_core_and_runs_at_the_chips_bandwidth():
    copy = Cost(hbm_bytes=1.6e9, unit=Unit.DMA)
    assert timing.alone(B2, copy) == pytest.approx(OVERHEAD + 1.6e9 / HBM)


# -- several jobs, step by step --------------------------------------------------------------------------


def job(cost: Cost, cube: int = CORES, vector: int = VECTOR_CORES) -> Job:
    return Job(FakeTask(cost), cube, vector)


def started(*jobs: Job) -> timing.BlockTiming:
    """A 910B2 with `jobs` handed to it in this order."""
    chip = timing.BlockTiming(B2)
    for j in jobs:
        chip.start(j, j.task.cost())
    return chip


def run_all(chip: timing.BlockTiming) -> list[float]:
    """Advance event by event; return the event times (to count them)."""
    events = []
    while chip.busy:
        t = chip.next_event()
        chip.advance(t)
        events.append(t)
    return events


def test_a_24_block_kernel_holds_every_core_and_the_next_waits_for_them():
    first, second = job(GEMM), job(GEMM)
    chip = started(first, second)
    assert chip.free == [0, VECTOR_CORES]  # the first kernel's 24 blocks hold all 24 cube cores
    assert [c.run.job for c in chip.cohorts] == [first]  # the second has no core yet

    events = run_all(chip)
    assert first.finished_at == pytest.approx(GEMM_S)
    assert second.finished_at == pytest.approx(2 * GEMM_S)  # started as the first one's blocks freed cores
    assert len(events) == 2  # one event per kernel, not per block


def test_with_stream_limits_two_kernels_run_side_by_side():
    prefill, decode = job(GEMM, cube=18), job(GEMM, cube=6)
    chip = started(prefill, decode)
    assert chip.free[0] == 0 and len(chip.cohorts) == 2  # both on cores at once
    run_all(chip)
    # 24 tiles over 18 blocks: 2 tiles on the busiest block; over 6 blocks: 4 tiles.
    assert prefill.finished_at == pytest.approx(OVERHEAD + 2 * TILE_FLOPS / CORE_PEAK)
    assert decode.finished_at == pytest.approx(OVERHEAD + 4 * TILE_FLOPS / CORE_PEAK)
    assert (prefill.blocks, decode.blocks) == (18, 6)


def test_a_kernel_started_on_fewer_cores_grows_as_others_free_theirs():
    small = Cost(flops=12 * TILE_FLOPS, unit=Unit.CUBE, tiles=12)
    holder, grower = job(small), job(GEMM)
    chip = started(holder, grower)  # 12 of the grower's 24 blocks start now, 12 when the holder finishes
    assert chip.free[0] == 0
    events = run_all(chip)
    assert holder.finished_at == pytest.approx(GEMM_S)
    assert grower.finished_at == pytest.approx(2 * GEMM_S)
    assert len(events) == 2  # the holder and the grower's first half finish together, then its second half


def test_vector_kernels_run_beside_a_cube_kernel():
    norm = Cost(hbm_bytes=48 * 1e6, unit=Unit.VECTOR, tiles=48)
    gemm, vec = job(GEMM), job(norm)
    run_all(started(gemm, vec))
    assert vec.finished_at < gemm.finished_at == pytest.approx(GEMM_S)


def test_a_later_kernel_does_not_overtake_one_waiting_for_the_same_cores():
    small = Cost(flops=12 * TILE_FLOPS, unit=Unit.CUBE, tiles=12)
    a, b, c = job(GEMM), job(GEMM), job(small)
    run_all(started(a, b, c))
    assert a.finished_at < b.finished_at < c.finished_at  # c would fit beside nobody: it waits its turn


def test_memory_bound_kernels_share_the_chips_bandwidth():
    """Two copies each asking the chip's whole bandwidth get half each: both end at twice the time alone."""
    copy = Cost(hbm_bytes=1.6e9, unit=Unit.DMA)
    a, b = job(copy), job(copy)
    run_all(started(a, b))
    assert a.finished_at == b.finished_at == pytest.approx(OVERHEAD + 3.2e9 / HBM)


def test_a_compute_bound_kernel_asks_only_the_bandwidth_it_can_use():
    """A GEMM streams 1 MB per 68 us block (15 GB/s per core); a copy beside it keeps the rest of HBM."""
    copy = Cost(hbm_bytes=1.6e9, unit=Unit.DMA)
    g, c = job(GEMM), job(copy)
    run_all(started(g, c))
    assert g.finished_at == pytest.approx(GEMM_S)
    gemm_rate = 24 * TILE_BYTES / (TILE_FLOPS / CORE_PEAK)  # what the GEMM's blocks stream while it runs
    beside = OVERHEAD + 1.6e9 / (HBM - gemm_rate)  # the copy's time at the bandwidth the GEMM leaves it
    left = 1 - GEMM_S / beside  # the fraction still to copy when the GEMM ends
    assert c.finished_at == pytest.approx(GEMM_S + left * (OVERHEAD + 1.6e9 / HBM))


def test_water_fill_gives_nobody_more_than_it_asks():
    # 3 units asking 1 each, 1 unit asking 10: capacity 8 -> the small ones get 1, the big one the 5 left.
    assert timing.water_fill([1.0, 10.0], [3, 1], 8.0) == [1.0, 5.0]
    assert timing.water_fill([4.0, 4.0], [1, 1], 4.0) == [2.0, 2.0]


# -- through the engine ----------------------------------------------------------------------------------


def engine_with(*streams: Stream) -> Engine:
    engine = Engine(EmulatedNPU("npu0", B2, "timing"), make_policy("fifo"))
    for s in streams:
        engine.add_stream(s)
    return engine


def test_engine_dispatches_a_second_streams_kernel_when_the_chips_blocks_free():
    long_stream, short_stream = Stream(), Stream()
    engine = engine_with(long_stream, short_stream)
    done = {}
    for s, name in ((long_stream, "prefill"), (short_stream, "decode")):
        engine.submit(TaskEntry(s, 1, task=FakeTask(GEMM, name)), 0.0)
        done[name] = StreamEvent()
        engine.submit(RecordEntry(s, 2, event=done[name], generation=1), 0.0)
        done[name].recorded = 1
    assert len(engine.running) == 2  # both handed to the chip: fifo holds nothing back

    engine.advance(GEMM_S / 2)
    assert done["prefill"].timestamp is None and done["decode"].timestamp is None
    engine.advance(1.0)
    assert done["prefill"].timestamp == pytest.approx(GEMM_S)
    assert done["decode"].timestamp == pytest.approx(2 * GEMM_S)  # head-of-line blocked behind the prefill


def test_engine_honours_a_streams_own_core_limit():
    limited = Stream(cube_limit=6)
    engine = engine_with(limited)
    entry = TaskEntry(limited, 1, task=FakeTask(GEMM))
    engine.submit(entry, 0.0)
    assert entry.job.cube_limit == 6 and entry.job.blocks == 6
    engine.advance(1.0)
    assert entry.job.finished_at == pytest.approx(OVERHEAD + 4 * TILE_FLOPS / CORE_PEAK)


def test_an_empty_kernel_on_a_chip_without_launch_overhead_completes_at_once():
    free = B2.with_(launch_overhead_s=0.0)
    assert timing.alone(free, Cost(unit=Unit.VECTOR)) == 0.0


def test_a_finished_task_is_freed_at_once_not_by_the_cycle_collector():
    """A blocking copy's task holds its bytes (64 MiB for a big memcpy): the engine must not keep them alive in a
    reference cycle until Python's cycle collector happens to run (the daemon's RSS grew by 256 MiB so)."""
    import gc
    import weakref

    engine = engine_with(stream := Stream())
    task = FakeTask(GEMM)
    gone = weakref.ref(task)
    engine.submit(TaskEntry(stream, 1, task=task), 0.0)
    del task
    gc.disable()
    try:
        engine.advance(1.0)
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("cost", "limits"),
    [
        (Cost(flops=3e12, hbm_bytes=4e8, unit=Unit.CUBE, tiles=1184, efficiency=0.8), (24, 48)),
        (Cost(flops=1e10, hbm_bytes=2e8, unit=Unit.CUBE, tiles=16, efficiency=0.6, launches=28), (5, 10)),
        (Cost(hbm_bytes=1.2e9, unit=Unit.VECTOR, tiles=4096), (24, 7)),
        (Cost(flops=2e11, hbm_bytes=3e8, unit=Unit.MIX, tiles=96, efficiency=0.4), (9, 48)),
        (Cost(hbm_bytes=1e8, link_bytes=1e8, unit=Unit.DMA), (24, 48)),
    ],
)
def test_alone_in_closed_form_is_a_lone_job_on_the_block_timing(cost, limits):
    """What flex predicts steps with is what the block timing model makes of the same kernel on an idle chip."""
    job = Job(task=None, cube_limit=limits[0], vector_limit=limits[1])
    chip = timing.BlockTiming(B2)
    chip.start(job, cost)
    while chip.busy:
        chip.advance(chip.next_event())
    assert timing.alone(B2, cost, *limits) == pytest.approx(job.finished_at, rel=1e-9)
