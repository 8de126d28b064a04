"""Chip profiles of real Ascend NPUs. Public figures disagree; each one cites where it comes from, and a figure
nobody has published says so: `vdevctl bench fidelity` shows how much the results move across its range.

Peak cube FLOP/s follows the Da Vinci core's shape: each AI core multiplies a 16x16x16 FP16 cube per cycle,
so peak = cores x clock x 16**3 x 2 (ascend-reference.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 1 << 30


@dataclass(frozen=True)
class ChipProfile:
    name: str
    soc: str  # what aclrtGetSocName answers on such a chip
    ai_cores: int  # cube cores (AIC); the unit npu-smi and vNPU templates count
    vector_cores: int  # vector cores (AIV), two per AI core on 910B-class chips
    memory_bytes: int
    clock_hz: float
    hbm_bandwidth: float  # bytes/s, whole chip
    core_bandwidth: float  # bytes/s one core's memory path can move (cube or vector core)
    host_link_bandwidth: float  # bytes/s, host <-> device copies
    interconnect_bandwidth: float  # bytes/s, device <-> device copies between chips
    launch_overhead_s: float  # device-side cost of starting one task (scheduling its blocks)

    @property
    def core_flops(self) -> float:
        return self.clock_hz * 16**3 * 2

    @property
    def peak_flops(self) -> float:
        return self.ai_cores * self.core_flops

    def with_(self, **changes) -> ChipProfile:
        """The same chip with some figures changed (benchmarks sweep the unmeasured ones)."""
        return replace(self, **changes)


# Figures shared by the 910B family.
# - core_bandwidth: CANN's platform_config ini gives `ddr_rate = 32` (bytes per cycle) per core in
#   [AICoreMemoryRates]; at 1.8 GHz that is 57.6 GB/s per core, so a memory-bound kernel needs most of the
#   chip's cores to reach HBM bandwidth. The split between cube and vector cores is not published: both use
#   this figure, and bench fidelity sweeps it.
# - host link: PCIe 5.0 x16 on Atlas 800T A2 (~64 GB/s raw, ~50 GB/s usable).
# - interconnect: HCCS, 56 GB/s per link between 910B chips on an Atlas 800T A2 (7 links, full mesh of 8).
# - launch overhead: no public device-side figure; ~3 us from CANN profiling traces of back-to-back small
#   kernels (task scheduling gap), a range of 1-10 us is swept.
_DDR_RATE = 32  # bytes per cycle per core

PROFILES: dict[str, ChipProfile] = {
    p.name: p
    for p in (
        # 910B2: 24 AI cores / 48 vector cores / 64 GiB from CANN's platform_config 910B2 ini; 1.8 GHz gives
        # 354 TFLOPS, the low end of third-party figures (354-376); HBM ~1.6 TB/s from third-party
        # performance models.
        ChipProfile("910B2", "Ascend910B2", 24, 48, 64 * GiB, 1.8e9, 1.6e12, _DDR_RATE * 1.8e9, 50e9, 56e9, 3e-6),
        # 910B4: 20 / 40 cores and 32 GiB from platform_config 910B4 ini; 1.5 GHz clock (ascend-reference.md);
        # ~0.8 TB/s HBM from third-party figures.
        ChipProfile("910B4", "Ascend910B4", 20, 40, 32 * GiB, 1.5e9, 0.8e12, _DDR_RATE * 1.5e9, 50e9, 56e9, 3e-6),
        # 910C die: a 910C package is two 910B-class dies, each its own /dev/davinci on A3 servers
        # (CloudMatrix384 paper, arXiv 2506.12708). Per die: half of ~752-800 TFLOPS -> 24 cores at 1.9 GHz
        # (374 TFLOPS); half of ~3.2 TB/s; 64 GB (reports of 96/128 GB per package disagree). The paper's
        # unified bus gives each die ~196 GB/s (392 GB/s per package, unidirectional) to other dies.
        ChipProfile(
            "910C", "Ascend910_9391", 24, 48, 64 * GiB, 1.9e9, 1.6e12, _DDR_RATE * 1.9e9, 50e9, 196e9, 3e-6
        ),
    )
}


def profile(name: str) -> ChipProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown chip {name!r} (have {', '.join(PROFILES)})") from None
