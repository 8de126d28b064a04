"""A virtual NPU's core cap (scheduler/stream.py Tenant, applied by scheduler/engine.py) and the core-seconds the
engine counts per tenant and per phase, in modeled time on an emulated 910B2 (24 AI cores): a cap holds whatever
the policy decides, and two capped tenants of a saturated chip get its cores in the ratio of their caps."""

from __future__ import annotations

import pytest

from scheduler.policies import make_policy
from scheduler.stream import Phase, Tenant
from tests.unit.test_engine import PREFILL_MM, Rig, approx
from tests.unit.test_policies import PREFILL, TARGET, WIDE
from tests.unit.test_policies import Rig as PolicyRig


def run_alone(cores: int | None) -> tuple[float, Tenant]:
    rig = Rig("timing")
    stream = rig.stream()
    stream.tenant = Tenant(cores=cores)
    entry = rig.task(stream, PREFILL_MM, now=0.0)
    rig.engine.advance(10.0)
    assert entry.job.blocks == (cores or 24)
    return entry.job.finished_at - entry.job.started_at, stream.tenant


@pytest.mark.parametrize("policy", ["fifo", "static", "flex"])
def test_a_capped_kernel_runs_on_at_most_its_cores_under_every_policy(policy):
    rig = Rig("timing")
    rig.engine.set_policy(make_policy(policy))
    stream = rig.stream()
    stream.tenant = Tenant(cores=6)
    entry = rig.task(stream, PREFILL_MM, now=0.0)
    rig.engine.advance(10.0)
    assert entry.job.blocks == 6 and entry.job.cube_limit == 6 and entry.job.vector_limit == 12


def test_six_cores_run_a_large_gemm_at_least_3_5_times_slower_than_the_whole_chip():
    whole, _ = run_alone(None)
    six, tenant = run_alone(6)
    assert six / whole >= 3.5
    assert (tenant.kernels, tenant.core_s) == (1, approx(6 * six))


def test_two_tenants_of_a_saturated_chip_get_its_cores_in_the_ratio_of_their_caps():
    rig = Rig("timing")
    tenants = [Tenant(cores=6), Tenant(cores=18)]
    for tenant in tenants:
        stream = rig.stream()
        stream.tenant = tenant
        for _ in range(200):  # more than either finishes in the window
            rig.task(stream, PREFILL_MM, now=0.0)
    rig.engine.advance(0.2)  # ~63 kernels of the small tenant, ~190 of the large
    small, large = tenants
    assert small.kernels > 50 and large.kernels < 200
    assert large.core_s / small.core_s == pytest.approx(3, rel=0.05)
    assert large.kernels / small.kernels == pytest.approx(3, rel=0.05)
    assert rig.engine.core_s[Phase.UNKNOWN] == approx(small.core_s + large.core_s)


def test_a_new_cap_applies_from_the_next_kernel():
    rig = Rig("timing")
    stream = rig.stream()
    first = rig.task(stream, PREFILL_MM, now=0.0)
    stream.tenant.cores = 4
    rig.engine.advance(1e-6)  # the first kernel started on the whole chip before the cap
    second = rig.task(stream, PREFILL_MM, now=1e-6)
    rig.engine.advance(10.0)
    assert (first.job.blocks, second.job.blocks) == (24, 4)


def test_flex_reserves_no_more_for_a_capped_decode_tenant_than_its_cap():
    """flex sizes decode's reserve from the step's predicted time: a decode tenant capped at 4 cores runs its step
    on 4 however many are reserved, so reserving more only idles cores prefill could use (found in review: the
    reserve climbed to 22 and prefill finished 5x less)."""
    done = {}
    for cap in (None, 4):
        rig = PolicyRig("flex", tpot_target_ms=TARGET * 1e3)
        prefill, decode = rig.stream(Phase.PREFILL), rig.stream(Phase.DECODE)
        decode.tenant = Tenant(cores=cap)
        t = 0.0
        for _ in range(40):
            for _ in range(3):
                rig.engine.submit(rig.entry(prefill, PREFILL), t)
            rig.burst(decode, WIDE, 6, t)
            rig.step_to(t + 2e-3)
            t += 2e-3
        done[cap] = prefill.completed
        if cap is not None:
            assert rig.policy.reserve <= cap
    assert done[4] > done[None]  # the cores decode cannot use go to prefill
