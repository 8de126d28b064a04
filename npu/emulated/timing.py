"""Modeled execution time of one task on a chip profile (a roofline with a fixed launch cost).

Copies over the host link are bound by the link; everything else by the larger of compute and HBM time.
Compute scales with the cores a task holds; HBM bandwidth saturates well before all cores are used, so a task
on a fraction of the chip still gets most of the bandwidth.
"""

from __future__ import annotations

from npu.profiles import ChipProfile
from npu.tasks import Cost

# Fraction of the AI cores at which one task saturates HBM bandwidth (decode kernels stop scaling there).
BANDWIDTH_SATURATION = 0.25


def duration(profile: ChipProfile, cost: Cost, cores: int) -> float:
    cores = max(1, min(cores, profile.ai_cores))
    compute = cost.flops / (profile.peak_flops * cores / profile.ai_cores)
    bandwidth_share = min(1.0, cores / (profile.ai_cores * BANDWIDTH_SATURATION))
    memory = cost.hbm_bytes / (profile.hbm_bandwidth * bandwidth_share)
    link = cost.link_bytes / profile.host_link_bandwidth
    return profile.launch_overhead_s + max(compute, memory, link)
