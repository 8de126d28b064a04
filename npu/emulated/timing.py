"""The timing model: how fast each running task progresses when tasks share the chip like a fluid.

A task alone on k AI cores takes  launch overhead + max(compute, HBM, host link)  where
  compute = FLOPs / (peak x k / cores),
  HBM     = bytes / (bandwidth x min(1, k / (cores x BANDWIDTH_SATURATION))),
  link    = host-link bytes / link bandwidth.
Tasks running together share it:
  1. Cores are water-filled (max-min fair) over each task's demand: the cores its policy allows, but no more
     than help it. A memory-bound task stops gaining once its HBM time is no longer the longer one, so a
     decode kernel next to a prefill GEMM takes only the few cores that saturate bandwidth and leaves the
     rest to the GEMM.
  2. HBM and the host link are shared the same way: each task asks for the byte rate its cores allow; if
     the asks add up to more than the chip has, the bandwidth is water-filled over them.
Every rate is recomputed whenever a task starts or finishes, so completion times follow in modeled time.
"""

from __future__ import annotations

import functools

from npu.profiles import ChipProfile
from npu.tasks import Cost

# Fraction of the AI cores at which one task saturates HBM bandwidth. A memory-bound kernel on a quarter of
# a 910B's cores already streams at the chip's bandwidth (decode attention scales no further).
BANDWIDTH_SATURATION = 0.25


def rates(profile: ChipProfile, tasks: list[tuple[Cost, int]]) -> list[float]:
    """Progress per modeled second (1.0 = the whole task) of each of `tasks`, (cost, core cap), run together."""
    if len(tasks) == 1:  # the common case, and launches repeat the same few costs: remember them
        return [_alone(profile, *tasks[0])]
    return _shared(profile, tasks)


@functools.lru_cache(maxsize=4096)
def _alone(profile: ChipProfile, cost: Cost, cores: int) -> float:
    return _shared(profile, [(cost, cores)])[0]


def _shared(profile: ChipProfile, tasks: list[tuple[Cost, int]]) -> list[float]:
    total = profile.ai_cores
    cores = water_fill([_useful_cores(profile, cost, cap) for cost, cap in tasks], total)
    compute = [c.flops / (profile.peak_flops * k / total) for (c, _), k in zip(tasks, cores, strict=True)]
    hbm_caps = [profile.hbm_bandwidth * min(1.0, k / (total * BANDWIDTH_SATURATION)) for k in cores]
    link_caps = [profile.host_link_bandwidth] * len(tasks)
    hbm_bytes = [c.hbm_bytes for c, _ in tasks]
    link_bytes = [c.link_bytes for c, _ in tasks]
    # A resource is worth no more to a task than what its other limits (alone, at its cores) leave it.
    link_floor = [max(t, v / cap) for t, v, cap in zip(compute, link_bytes, link_caps, strict=True)]
    hbm_floor = [max(t, v / cap) for t, v, cap in zip(compute, hbm_bytes, hbm_caps, strict=True)]
    hbm = _share(hbm_bytes, hbm_caps, link_floor, profile.hbm_bandwidth)
    link = _share(link_bytes, link_caps, hbm_floor, profile.host_link_bandwidth)
    return [
        1.0 / (profile.launch_overhead_s + max(t, (v / bw if v else 0.0), (lv / lbw if lv else 0.0)))
        for t, v, bw, lv, lbw in zip(compute, hbm_bytes, hbm, link_bytes, link, strict=True)
    ]


def water_fill(demands: list[float], capacity: float) -> list[float]:
    """Max-min fair shares of `capacity`: nobody gets more than it asks, the rest is split evenly."""
    shares = [0.0] * len(demands)
    left, remaining = capacity, sorted(range(len(demands)), key=lambda i: demands[i])
    while remaining:
        even = left / len(remaining)
        i = remaining.pop(0)
        shares[i] = min(demands[i], even)
        left -= shares[i]
    return shares


def _useful_cores(profile: ChipProfile, cost: Cost, cap: int) -> float:
    """Cores beyond which the task runs no faster (at least one)."""
    total = profile.ai_cores
    cap = max(1, min(cap, total))
    if cost.flops and not cost.hbm_bytes:
        return cap
    if not cost.hbm_bytes:
        return 1  # host-link copies and empty launches: cores do not matter
    # Memory-bound past the saturation point; compute keeps gaining until it is as long as the HBM time.
    balance = cost.flops * total * profile.hbm_bandwidth / (profile.peak_flops * cost.hbm_bytes)
    return min(cap, max(1.0, total * BANDWIDTH_SATURATION, balance))


def _share(volumes: list[float], caps: list[float], floors: list[float], capacity: float) -> list[float]:
    """Bandwidth per task: each asks for its volume over the time its other limits take (at most its cap);
    when the asks exceed `capacity` it is water-filled over them. A task that moves nothing keeps its cap."""
    asks = [
        (min(cap, volume / floor) if floor > 0 else cap) if volume else 0.0
        for volume, cap, floor in zip(volumes, caps, floors, strict=True)
    ]
    granted = asks if sum(asks) <= capacity else water_fill(asks, capacity)
    return [g if g else cap for g, cap in zip(granted, caps, strict=True)]
