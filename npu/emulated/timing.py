"""The block-level timing model of one emulated Ascend chip: which blocks hold which cores, and how fast each runs.

As the hardware works:
- A kernel launches with a block dimension: at most its cost's tile count, the cores of its kind on the chip
  (persistent kernels launch one block per core), and the core limit its stream was given
  (`aclrtSetStreamResLimit`, or a policy's decision). Each block runs ceil(tiles / blocks) tiles.
- A block holds one core (a MIX block: one cube core and two vector cores) from start to finish; cores are
  not shared. Blocks of jobs already on the chip take cores as they free up, in the order the jobs were
  started: a kernel that started on fewer cores than its blocks grows as others finish, and a later job of
  the same core kind waits until earlier ones have placed every block (head-of-line blocking — the reason a
  phase-aware policy reserves cores with limits instead of dispatching everything at once).
- A block's time is  launch overhead + max(compute, HBM bytes / its bandwidth, link bytes / its bandwidth),
  for the host link (host <-> device copies) and the chip interconnect (copies between chips, HCCS) alike,
  compute = its FLOPs / (one core's peak x the kernel's efficiency). Its bandwidth is what it asks (the byte
  rate at which its other limits bind, at most the per-core memory path), unless the asks of all running
  blocks add up to more than the chip's HBM bandwidth: then that is water-filled over them (max-min fair).
  Copies (Unit.DMA) hold no AI core: they use the copy engines, the links and HBM.

Blocks of one job that started together finish together: they are one cohort, and the model's events are
cohort completions — one per job unless it had to grow onto cores freed later — never one per block. Rates are
recomputed once per change of the running set, lazily.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

from npu.executor import Job
from npu.profiles import ChipProfile
from npu.tasks import Cost, Unit

_EPS = 1e-12


def _path(profile: ChipProfile, unit: Unit) -> float:
    """Bytes/s one block can move: a cube or mix block has its AI core's whole memory path, a vector block its
    vector core's part, a copy the copy engines (bounded by the chip)."""
    if unit is Unit.VECTOR:
        return profile.vector_core_bandwidth
    return profile.hbm_bandwidth if unit is Unit.DMA else profile.core_bandwidth


@functools.lru_cache(maxsize=4096)
def _block(profile: ChipProfile, cost: Cost, cube_limit: int, vector_limit: int) -> tuple:
    """(blocks, compute seconds, HBM bytes, (host-link bytes, interconnect bytes)) of the busiest block; launches
    repeat the same few."""
    blocks = cost.block_dim(min(profile.ai_cores, cube_limit), min(profile.vector_cores, vector_limit))
    share = -(-cost.tiles // blocks) / cost.tiles if blocks else 1.0
    compute = cost.flops * share / (profile.core_flops * cost.efficiency) if cost.flops else 0.0
    return blocks, compute, cost.hbm_bytes * share, (cost.link_bytes * share, cost.peer_bytes * share)


@dataclass(eq=False, slots=True)
class _Run:
    """A job on the chip, with what one of its blocks must do."""

    job: Job
    needs: tuple[int, int]
    pending: int  # blocks not yet on a core
    cohorts: int  # groups of its blocks on cores now
    compute_s: float  # per block, at the core's peak times the kernel's efficiency (overhead excluded)
    hbm: float  # bytes per block
    links: tuple[float, float]  # bytes per block over the host link and over the chip interconnect
    hbm_cap: float  # bytes/s one block's memory path can move
    overhead_s: float  # launch overhead of each block (once per launch it stands for)


@dataclass(eq=False, slots=True)
class _Cohort:
    run: _Run
    n: int  # blocks (one per core held)
    placed: float  # modeled time its blocks took their cores
    remaining: float = 1.0  # fraction of one block's work still to do
    rate: float = 0.0  # fraction per modeled second at the current sharing
    due: float = 0.0


class BlockTiming:
    def __init__(self, profile: ChipProfile) -> None:
        self.profile = profile
        self.t = 0.0
        self.free = [profile.ai_cores, profile.vector_cores]
        self.waiting: deque[_Run] = deque()  # runs with blocks not yet placed, in start order
        self.cohorts: list[_Cohort] = []
        self.done: list[Job] = []  # jobs completed at self.t, not yet reported
        self._stale = False
        self._due = 0.0

    @property
    def busy(self) -> bool:
        return bool(self.cohorts or self.waiting or self.done)

    def start(self, job: Job, cost: Cost) -> None:
        blocks, compute, hbm, links = _block(self.profile, cost, job.cube_limit, job.vector_limit)
        job.blocks, job.started_at = blocks, self.t
        overhead = self.profile.launch_overhead_s * cost.launches
        run = _Run(job, cost.needs, max(blocks, 1), 0, compute, hbm, links, _path(self.profile, cost.unit), overhead)
        self.waiting.append(run)
        self._place()

    def fail(self, job: Job) -> None:
        """A job that failed before it ran completes at once."""
        job.started_at = job.finished_at = self.t
        self.done.append(job)

    def next_event(self) -> float | None:
        if self.done:
            return self.t
        if not self.cohorts:
            return None
        if self._stale:
            self._rerate()
        return self._due

    def advance(self, t: float) -> list[Job]:
        if self._stale and self.cohorts:
            self._rerate()
        dt, self.t = max(0.0, t - self.t), max(self.t, t)
        finished = []
        for c in self.cohorts:
            c.remaining -= c.rate * dt
            if c.due <= self.t or c.remaining <= _EPS:
                finished.append(c)
        for c in finished:
            self._finish(c)
        if finished:
            self._place()
        done, self.done = self.done, []
        return done

    def _finish(self, cohort: _Cohort) -> None:
        self.cohorts.remove(cohort)
        run = cohort.run
        self.free[0] += run.needs[0] * cohort.n
        self.free[1] += run.needs[1] * cohort.n
        run.cohorts -= 1
        cube, vector = run.needs
        cores = cube * cohort.n if cube else vector * cohort.n * self.profile.ai_cores / self.profile.vector_cores
        run.job.core_s += cores * (self.t - cohort.placed)
        if not run.pending and not run.cohorts:
            run.job.finished_at = self.t
            self.done.append(run.job)
        self._stale = True

    def _place(self) -> None:
        """Put waiting blocks on free cores, in start order; a run that cannot place all of its blocks holds
        back later runs that need the same kind of core."""
        if not self.waiting:
            return
        blocked = [False, False]
        for run in list(self.waiting):
            c, v = run.needs
            if (c and blocked[0]) or (v and blocked[1]):
                continue
            n = run.pending
            if c:
                n = min(n, self.free[0] // c)
            if v:
                n = min(n, self.free[1] // v)
            if n:
                self.free[0] -= c * n
                self.free[1] -= v * n
                run.pending -= n
                run.cohorts += 1
                self.cohorts.append(_Cohort(run, n, self.t))
                self._stale = True
            if run.pending:
                blocked[0] |= bool(c)
                blocked[1] |= bool(v)
            else:
                self.waiting.remove(run)

    def _rerate(self) -> None:
        p = self.profile
        self._stale = False
        cohorts = self.cohorts
        links = (p.host_link_bandwidth, p.interconnect_bandwidth)
        if len(cohorts) == 1:  # the common case: no sharing to work out
            c = cohorts[0]
            run = c.run
            moved = max(v / bw for v, bw in zip(run.links, links, strict=True))
            hbm = run.hbm / min(run.hbm_cap, p.hbm_bandwidth / c.n)
            self._set_rate(c, run.overhead_s + max(run.compute_s, moved, hbm))
            self._due = c.due
            return
        # The links first (each asks what its compute allows), then HBM (what compute and links allow).
        compute = [c.run.compute_s for c in cohorts]
        floors = list(compute)
        for i, capacity in enumerate(links):
            volumes = [c.run.links[i] for c in cohorts]
            granted = _bandwidths(cohorts, volumes, [capacity] * len(cohorts), compute, capacity)
            floors = [max(f, v / bw if v else 0.0) for f, v, bw in zip(floors, volumes, granted, strict=True)]
        hbm_bw = _bandwidths(
            cohorts, [c.run.hbm for c in cohorts], [c.run.hbm_cap for c in cohorts], floors, p.hbm_bandwidth
        )
        for c, floor, bw in zip(cohorts, floors, hbm_bw, strict=True):
            self._set_rate(c, c.run.overhead_s + max(floor, c.run.hbm / bw if c.run.hbm else 0.0))
        self._due = min(c.due for c in cohorts)

    def _set_rate(self, cohort: _Cohort, block_s: float) -> None:
        cohort.rate = 1.0 / block_s if block_s > 0 else 0.0  # 0 s: an empty kernel on a chip with no overhead
        cohort.due = self.t + cohort.remaining * block_s  # unchanged by progress until the next rerate


def _bandwidths(
    cohorts: list[_Cohort], volumes: list[float], caps: list[float], floors: list[float], capacity: float
) -> list[float]:
    """Bandwidth per block of each cohort: each block asks for its volume over the time its other limits take
    (at most its cap); if the asks of all blocks exceed `capacity`, it is water-filled over them."""
    asks = [
        (min(cap, volume / floor) if floor > 0 else cap) if volume else 0.0
        for volume, cap, floor in zip(volumes, caps, floors, strict=True)
    ]
    weights = [c.n for c in cohorts]
    if sum(a * w for a, w in zip(asks, weights, strict=True)) > capacity:
        asks = water_fill(asks, weights, capacity)
    return [a if a else cap for a, cap in zip(asks, caps, strict=True)]


def water_fill(demands: list[float], weights: list[int], capacity: float) -> list[float]:
    """Max-min fair share per unit of `capacity` among groups of `weights` units, each unit asking its group's
    demand: nobody gets more than it asks, the rest is split evenly."""
    shares = [0.0] * len(demands)
    left, units = capacity, sum(weights)
    for i in sorted(range(len(demands)), key=demands.__getitem__):
        shares[i] = min(demands[i], left / units)
        left -= shares[i] * weights[i]
        units -= weights[i]
    return shares


@functools.lru_cache(maxsize=8192)
def alone(profile: ChipProfile, cost: Cost, cube_limit: int | None = None, vector_limit: int | None = None) -> float:
    """Modeled seconds of one task on an idle chip (what calibration compares with measurements, and what a
    policy predicts a step with): every block starts at once, one cohort, the model above in closed form."""
    cube, vector = cube_limit or profile.ai_cores, vector_limit or profile.vector_cores
    blocks, compute, hbm, links = _block(profile, cost, cube, vector)
    moved = max(
        v / bw for v, bw in zip(links, (profile.host_link_bandwidth, profile.interconnect_bandwidth), strict=True)
    )
    hbm_s = hbm / min(_path(profile, cost.unit), profile.hbm_bandwidth / max(blocks, 1))
    return profile.launch_overhead_s * cost.launches + max(compute, moved, hbm_s)
