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
# - Memory: CANN's platform_config ini gives `ddr_rate = 32` in [AICoreMemoryRates] on 910B2/B3/B4 and 910_9391
#   (CANN 8.1.RC1 data/platform_config/<SoC>.ini). Ascend C's PlatformAscendC::GetCoreMemBw documents it as
#   bytes per cycle, per core; CANN's own matmul tiling (hicann/ops-nn matmul_v3_tiling_helper.cpp, GetHbmBW)
#   takes the chip's HBM bandwidth as ddr_rate x AI cores x cube clock. So core_bandwidth = 32 B x clock
#   (57.6 GB/s per AI core on 910B2) and hbm_bandwidth = that x the cores (1.38 TB/s): a memory-bound kernel
#   needs every core to stream at the chip's rate, and a quarter of the cores reach a quarter of it. Measured:
#   a 256 MiB device copy moves 1.27 TB/s on 910B (third-party spec note), torch.exp 1.28 TB/s read+write
#   (gameofdimension/limulidae) — within 10 %. Third-party spec sheets quote ~1.6 TB/s peak.
# - vector_core_bandwidth: how an AI core's path splits between its cube core and its two vector cores is not
#   published. Default: half each (48 vector cores then stream the same 1.38 TB/s); bench fidelity sweeps it.
# - host link: PCIe 5.0 x16 on Atlas 800T A2 (~64 GB/s raw, ~50 GB/s usable); no public measurement.
# - interconnect: HCCS, 56 GB/s per link between 910B chips of an Atlas 800T A2 (8-way full mesh, 7 links,
#   392 GB/s per chip; widely quoted, secondary sources); 8-card all_gather measures ~130 GB/s bus bandwidth.
# - launch overhead: no public device-side figure (torch_npu profiles mix in host time: a tiny fused attention
#   call takes 65-73 us end to end). 3 us, swept from 1 to 10 us in bench fidelity.
_DDR_RATE = 32  # bytes per cycle per AI core


def _family(name: str, soc: str, cores: int, memory: int, clock: float, link_to_peer: float) -> ChipProfile:
    core_bw = _DDR_RATE * clock
    return ChipProfile(
        name, soc, cores, 2 * cores, memory, clock, core_bw * cores, core_bw, core_bw / 2, 50e9, link_to_peer, 3e-6
    )


PROFILES: dict[str, ChipProfile] = {
    p.name: p
    for p in (
        # 910B2: 24 AI cores / 48 vector cores / 64 GiB / cube_freq 1800 MHz from CANN's platform_config
        # Ascend910B2.ini; 1.8 GHz gives 354 TFLOPS, the low end of third-party figures (354-376).
        _family("910B2", "Ascend910B2", 24, 64 * GiB, 1.8e9, 56e9),
        # 910B4: 20 / 40 cores, 32 GiB, cube_freq 1500 MHz from Ascend910B4.ini: 0.96 TB/s by CANN's rule
        # (third-party figures say ~0.8 TB/s).
        _family("910B4", "Ascend910B4", 20, 32 * GiB, 1.5e9, 56e9),
        # 910C die: a 910C package is two 910B-class dies, each its own /dev/davinci on A3 servers
        # (CloudMatrix384 paper, arXiv 2506.12708); Ascend910_9391.ini: 24 / 48 cores, 64 GiB, 1850 MHz (1.42 TB/s
        # by CANN's rule; reports of ~3.2 TB/s per package). The unified bus gives each NPU > 392 GB/s one way
        # (the paper); per die half of it.
        _family("910C", "Ascend910_9391", 24, 64 * GiB, 1.85e9, 196e9),
    )
}


def profile(name: str) -> ChipProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown chip {name!r} (have {', '.join(PROFILES)})") from None
