"""The timing model against hand-computed completion times, and a Qwen2.5-7B decoder layer against the
roofline. Everything runs in modeled time (no clock), so the figures are exact."""

from __future__ import annotations

import pytest

from npu.emulated import timing
from npu.profiles import profile
from npu.tasks import Cost

B2 = profile("910B2")
CORES = B2.ai_cores  # 24
PEAK = CORES * 1.8e9 * 16**3 * 2  # 353.9 TFLOPS: cores x clock x a 16^3 FP16 cube x 2
HBM = 1.6e12
OVERHEAD = 3e-6

# A compute-bound kernel: a 4096^3 FP16 GEMM, 137 GFLOP over 96 MiB. A memory-bound one: streaming 1.6 GB.
GEMM = Cost(flops=2 * 4096**3, hbm_bytes=3 * 4096 * 4096 * 2)
STREAM = Cost(flops=0.0, hbm_bytes=1.6e9)


def times(*tasks: Cost) -> list[float]:
    return [1 / r for r in timing.rates(B2, [(t, CORES) for t in tasks])]


def test_profile_peak_is_cores_times_clock_times_cube():
    assert B2.peak_flops == pytest.approx(PEAK)
    assert B2.hbm_bandwidth == HBM


def test_compute_bound_kernel_alone():
    (t,) = times(GEMM)
    assert t == pytest.approx(OVERHEAD + 2 * 4096**3 / PEAK)  # 0.391 ms; its bytes would take 0.063 ms


def test_memory_bound_kernel_alone():
    (t,) = times(STREAM)
    assert t == pytest.approx(OVERHEAD + 1.6e9 / HBM)  # 1.003 ms


def test_compute_and_memory_bound_together_overlap_nearly_fully():
    gemm, stream = times(GEMM, STREAM)
    # The streaming kernel needs only the quarter of the cores that saturates HBM: 6 cores. The GEMM keeps
    # the other 18: 24/18 = 1.33x its time alone, not 2x.
    gemm_compute = 2 * 4096**3 / (PEAK * 18 / 24)
    assert gemm == pytest.approx(OVERHEAD + gemm_compute)
    # The GEMM streams its 96 MiB over that time; the streaming kernel gets the rest of the bandwidth.
    gemm_bandwidth = 3 * 4096 * 4096 * 2 / gemm_compute  # 0.19 TB/s
    assert stream == pytest.approx(OVERHEAD + 1.6e9 / (HBM - gemm_bandwidth))  # 1.14 ms instead of 1.00
    # So together each runs at most a third slower than alone, where sharing everything evenly would halve both.
    assert gemm / times(GEMM)[0] < 1.34 and stream / times(STREAM)[0] < 1.14


def test_two_compute_bound_kernels_each_take_about_twice_as_long():
    a, b = times(GEMM, GEMM)
    assert a == b == pytest.approx(OVERHEAD + 2 * 4096**3 / (PEAK / 2))


def test_two_memory_bound_kernels_share_the_bandwidth():
    a, b = times(STREAM, STREAM)
    assert a == b == pytest.approx(OVERHEAD + 1.6e9 / (HBM / 2))


def test_a_policy_core_cap_slows_a_compute_bound_kernel():
    (t,) = [1 / r for r in timing.rates(B2, [(GEMM, 6)])]
    assert t == pytest.approx(OVERHEAD + 2 * 4096**3 / (PEAK * 6 / 24))


def test_water_fill_gives_nobody_more_than_it_asks():
    assert timing.water_fill([2, 30, 30], 24) == [2, 11, 11]
    assert timing.water_fill([5, 5], 24) == [5, 5]
