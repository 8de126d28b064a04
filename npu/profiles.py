"""Chip profiles of real Ascend NPUs. Public figures disagree; each one cites where it comes from.

Peak cube FLOP/s follows the Da Vinci core's shape: each AI core multiplies a 16x16x16 FP16 cube per cycle,
so peak = cores x clock x 16**3 x 2 (ascend-reference.md).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class ChipProfile:
    name: str
    ai_cores: int  # cube cores; the unit the schedulers hand out
    vector_cores: int
    memory_bytes: int
    clock_hz: float
    hbm_bandwidth: float  # bytes/s, whole chip
    host_link_bandwidth: float  # bytes/s, host <-> device copies
    launch_overhead_s: float  # fixed device-side cost of one task

    @property
    def peak_flops(self) -> float:
        return self.ai_cores * self.clock_hz * 16**3 * 2


PROFILES: dict[str, ChipProfile] = {
    p.name: p
    for p in (
        # 910B2: 24 AI cores / 48 vector cores / 64 GiB from CANN's platform_config 910B2 ini; 1.8 GHz gives
        # 354 TFLOPS, the low end of third-party figures (354-376); HBM ~1.6 TB/s from third-party
        # performance models; PCIe 5.0 x16 host link (Atlas 800T A2), ~50 GB/s usable.
        ChipProfile("910B2", 24, 48, 64 * GiB, 1.8e9, 1.6e12, 50e9, 3e-6),
        # 910B4: 20 / 40 cores and 32 GiB from platform_config 910B4 ini; 1.5 GHz clock (ascend-reference.md);
        # ~0.8 TB/s HBM from third-party figures.
        ChipProfile("910B4", 20, 40, 32 * GiB, 1.5e9, 0.8e12, 50e9, 3e-6),
        # 910C die: a 910C package is two 910B-class dies, each its own /dev/davinci on A3 servers
        # (CloudMatrix384 paper, arXiv 2506.12708). Per die: half of ~752-800 TFLOPS -> 24 cores at 1.9 GHz
        # (374 TFLOPS); half of ~3.2 TB/s; 64 GB (reports of 96/128 GB per package disagree).
        ChipProfile("910C", 24, 48, 64 * GiB, 1.9e9, 1.6e12, 50e9, 3e-6),
    )
}


def profile(name: str) -> ChipProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown chip {name!r} (have {', '.join(PROFILES)})") from None
