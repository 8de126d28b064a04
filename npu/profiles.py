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
    core_bandwidth: float  # bytes/s one AI core (a cube core with its two vector cores) can move to/from HBM
    vector_core_bandwidth: float  # bytes/s one vector core can move when it runs alone (not published)
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
# - core_bandwidth: CANN's platform_config ini gives `ddr_rate = 32` in [AICoreMemoryRates] on 910B2/B3/B4 and
#   910_9391 (CANN 8.1.RC1 data/platform_config/<SoC>.ini); Ascend C's PlatformAscendC::GetCoreMemBw documents
#   it as bytes per cycle, and CANN's matmul tiling (hicann/ops-nn matmul_v3_tiling_helper.cpp, GetHbmBW)
#   multiplies it by the AI core count and the cube clock: per AI core, 32 B x 1.8 GHz = 57.6 GB/s on 910B2,
#   so a memory-bound kernel needs all 24 cores to stream 1.38 TB/s, near the 1.27 TB/s a 256 MiB device copy
#   measures on 910B (third-party spec note), and a quarter of the cores reach only a quarter of it.
# - vector_core_bandwidth: how a core's path splits between its cube core and its two vector cores is not
#   published. Default: half of the AI core's path each (48 vector cores then stream the same 1.38 TB/s);
#   bench fidelity sweeps it from a quarter to all of the path.
# - host link: PCIe 5.0 x16 on Atlas 800T A2 (~64 GB/s raw, ~50 GB/s usable); no public measurement.
# - interconnect: HCCS, 56 GB/s per link between 910B chips of an Atlas 800T A2 (8-way full mesh, 7 links,
#   392 GB/s per chip; widely quoted, secondary sources); 8-card all_gather measures ~130 GB/s bus bandwidth.
# - launch overhead: no public device-side figure (torch_npu profiles mix in host time: a tiny fused attention
#   call takes 65-73 us end to end). 3 us, swept from 1 to 10 us in bench fidelity.
_DDR_RATE = 32  # bytes per cycle per AI core


def _family(name: str, soc: str, cores: int, memory: int, clock: float, hbm: float, link_to_peer: float):
    core_bw = _DDR_RATE * clock
    return ChipProfile(name, soc, cores, 2 * cores, memory, clock, hbm, core_bw, core_bw / 2, 50e9, link_to_peer, 3e-6)


PROFILES: dict[str, ChipProfile] = {
    p.name: p
    for p in (
        # 910B2: 24 AI cores / 48 vector cores / 64 GiB / cube_freq 1800 MHz from CANN's platform_config
        # Ascend910B2.ini; 1.8 GHz gives 354 TFLOPS, the low end of third-party figures (354-376); HBM ~1.6 TB/s
        # from third-party performance models (measured copies reach 1.27 TB/s: see core_bandwidth).
        _family("910B2", "Ascend910B2", 24, 64 * GiB, 1.8e9, 1.6e12, 56e9),
        # 910B4: 20 / 40 cores, 32 GiB, cube_freq 1500 MHz from Ascend910B4.ini; ~0.8 TB/s HBM from third-party
        # figures (its ini's ddr_rate gives 0.96 TB/s over 20 cores).
        _family("910B4", "Ascend910B4", 20, 32 * GiB, 1.5e9, 0.8e12, 56e9),
        # 910C die: a 910C package is two 910B-class dies, each its own /dev/davinci on A3 servers
        # (CloudMatrix384 paper, arXiv 2506.12708); Ascend910_9391.ini: 24 / 48 cores, 64 GiB, 1850 MHz. HBM:
        # half of ~3.2 TB/s per package. The unified bus gives each NPU > 392 GB/s one way (the paper); per die
        # half of it.
        _family("910C", "Ascend910_9391", 24, 64 * GiB, 1.85e9, 1.6e12, 196e9),
    )
}


def profile(name: str) -> ChipProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown chip {name!r} (have {', '.join(PROFILES)})") from None
