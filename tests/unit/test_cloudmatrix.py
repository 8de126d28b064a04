"""DeepSeek-R1 on a CloudMatrix384-style supernode (sim/cloudmatrix): the network and imbalance models, a step of an
EP group as the tasks its slowest die runs, the published figures it was calibrated to, and whole deployments run
through sim/serving.py's coordinator, batching core and policies. Modeled time only: no wall-clock thresholds."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from sim.cloudmatrix import experiment
from sim.cloudmatrix.costs import Group, GroupCosts, Sizes
from sim.cloudmatrix.deployment import (
    CHIP,
    DECODE_GROUP,
    PREFILL_GROUP,
    SLO,
    Deployment,
    Setup,
    costs,
    decode_point,
    prefill_point,
    splits,
)
from sim.cloudmatrix.imbalance import Imbalance
from sim.cloudmatrix.network import PUBLISHED, PUBLISHED_TOKENS, Network
from sim.run import Workload, simulate
from tools.bench_cloudmatrix import command as bench_command
from tools.simulate import command as simulate_command
from workloads.batching import Role, Scheduled, StepKind, StepPlan
from workloads.deepseek import DEEPSEEK_R1, TINY_DEEPSEEK
from workloads.traffic import Lengths

# -- the network ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "row"), [("dispatch", 7168 + 4), ("combine", 7168 * 2)])
def test_the_all_to_all_model_gives_the_published_latencies_at_both_ep_sizes(op, row):
    for ep, published in PUBLISHED[op].items():
        assert Network().all_to_all(op, ep, PUBLISHED_TOKENS * 8, row) == pytest.approx(published, rel=1e-9)


def test_ub_latency_scales_only_the_fixed_part_and_one_die_needs_no_network():
    slow, fast = Network(latency_scale=2.0), Network()
    rows, row = 1000, 7168
    wire = rows * row / fast.ub_bytes_s
    fixed = fast.all_to_all("combine", 64, rows, row) - wire
    assert slow.all_to_all("combine", 64, rows, row) == pytest.approx(wire + 2 * fixed)
    assert fast.all_to_all("dispatch", 1, rows, row) == 0.0


def test_kv_transfer_runs_at_the_roce_rate_of_the_ports_carrying_it():
    assert Network().kv_transfer(25e9, 1) == pytest.approx(1.0)  # 400 Gb/s per NPU: 25 GB/s per die
    assert Network().kv_transfer(25e9, 10) == pytest.approx(0.1)


# -- expert imbalance -------------------------------------------------------------------------------------------


def test_perfect_eplb_has_no_imbalance_and_the_default_has_some_that_grows_with_the_group():
    assert Imbalance("perfect").next(288, 1000) == 1.0
    default = Imbalance()
    small, large = default.mean(8, 1000), default.mean(288, 1000)
    assert 1.0 < small < large


def test_fewer_rows_per_die_make_the_busiest_die_relatively_busier():
    assert Imbalance(skew=0.0).mean(288, 10) > Imbalance(skew=0.0).mean(288, 10000) > 1.0


def test_the_draws_are_reproducible_from_the_seed_and_differ_across_seeds():
    a, b, c = Imbalance(seed=1), Imbalance(seed=1), Imbalance(seed=2)
    assert a.factors(64, 100) == b.factors(64, 100) != c.factors(64, 100)


def test_an_unknown_eplb_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="eplb 'best'"):
        Imbalance("best")


# -- a step of an EP group ---------------------------------------------------------------------------------------


def decode_plan(requests: int, context: int) -> StepPlan:
    entries = tuple(Scheduled(str(i), context - 1, 1, (), True) for i in range(requests))
    return StepPlan(StepKind.DECODE, 0.0, entries, requests)


def prefill_plan(prompts: int, length: int) -> StepPlan:
    return StepPlan(StepKind.PREFILL, 0.0, tuple(Scheduled(str(i), 0, length, (), True) for i in range(prompts)))


def test_a_decode_step_runs_the_dense_layers_3_times_and_the_moe_layers_58_times_then_the_mtp_layer():
    c = costs(Setup(eplb="perfect"))
    tasks = c.decode(DECODE_GROUP, 48, 4096, 1.0)
    launches = {t.price.launches for t in tasks}
    assert launches == {1, 3, 58}
    moe = [t.name for t in tasks if t.price.launches == 58]
    assert {"MoeDispatch", "GroupedMatMul", "MoeCombine", "MlaDecodeAttention"} <= set(moe)
    assert [t.name for t in tasks].count("MlaDecodeAttention") == 3  # dense, MoE, MTP layer


def test_with_mtp_a_decode_step_costs_per_accepted_token():
    """Verifying 1 + 1 tokens per request and accepting 1.7 on average: the simulated step is the real step / 1.7."""
    with_mtp = costs(Setup(eplb="perfect", mtp_acceptance=0.7))
    real = costs(Setup(eplb="perfect", mtp_acceptance=1.0))  # the same step, accepted at 2 tokens per step
    a = with_mtp.step_time(with_mtp.decode(DECODE_GROUP, 48, 4096, 1.0))
    b = real.step_time(real.decode(DECODE_GROUP, 48, 4096, 1.0))
    assert a * 1.7 == pytest.approx(b * 2.0, rel=0.01)  # launch overheads are not scaled


def test_the_group_steps_at_its_busiest_dies_pace():
    c = costs()
    balanced = c.step_time(c.decode(DECODE_GROUP, 48, 4096, 1.0))
    skewed = c.step_time(c.decode(DECODE_GROUP, 48, 4096, 1.5))
    assert skewed > balanced
    # only the MoE part moves: attention does not care where the experts are
    attention = [
        sum(t.price.flops for t in c.decode(DECODE_GROUP, 48, 4096, load) if t.name == "MlaDecodeAttention")
        for load in (1.0, 1.5)
    ]
    assert attention[0] == attention[1]


def test_a_groups_batch_is_dealt_to_its_dies_the_busiest_holding_the_most():
    c = costs(Setup(eplb="perfect"))
    one_per_die = c.step_time(c.tasks(decode_plan(DECODE_GROUP.dies, 4096)))
    one_more = c.step_time(c.tasks(decode_plan(DECODE_GROUP.dies + 1, 4096)))  # one die holds two
    assert one_more > one_per_die
    assert c.step_time(c.tasks(decode_plan(1, 4096))) == pytest.approx(one_per_die)


def test_two_prefill_micro_batches_hide_the_all_to_all_behind_compute():
    overlapped = costs(Setup(eplb="perfect"))
    serial = costs(Setup(eplb="perfect"), prefill=Group(PREFILL_GROUP.dies, microbatches=1))
    times = [c.step_time(c.tasks(prefill_plan(PREFILL_GROUP.dies, 4096))) for c in (overlapped, serial)]
    assert times[0] < times[1]


def test_a_die_too_small_for_the_weights_is_refused_naming_the_group():
    with pytest.raises(ValueError, match="EP2 group leaves no room for KV"):
        GroupCosts(DEEPSEEK_R1, CHIP, Group(2), Group(2))


def test_decode_batching_spans_the_groups_dies_in_buckets_of_one_request_per_die():
    config = costs(sizes=Sizes(decode_batch=4)).batching(Role.DECODE)
    assert config.max_num_seqs == 4 * DECODE_GROUP.dies
    assert config.decode_buckets == tuple(DECODE_GROUP.dies * k for k in (1, 2, 3, 4))


# -- the published figures ---------------------------------------------------------------------------------------


def test_decode_and_prefill_meet_the_published_cloudmatrix_infer_figures_within_15_percent():
    """arXiv 2506.12708: decode 4K/256 with MTP at 96 and 24 requests per NPU (TPOT 49.4 / 24.6 ms, 1,943 / 974
    tokens/s per NPU), prefill 4K with perfect EPLB (6,688 tokens/s per NPU), per decode layer ~874 us without MTP
    and ~1,260 us with it."""
    busy, light = decode_point(4096, 256, 96), decode_point(4096, 256, 24)
    no_mtp = decode_point(4096, 256, 96, Setup(mtp_acceptance=None))
    prefill = prefill_point(4096, Setup(eplb="perfect"))
    pairs = [
        (busy["tpot_ms"], 49.4),
        (busy["tokens_per_s_per_npu"], 1943),
        (light["tpot_ms"], 24.6),
        (light["tokens_per_s_per_npu"], 974),
        (prefill["tokens_per_s_per_npu"], 6688),
        (no_mtp["layer_us"], 874),
        (busy["layer_us"], 1260),
    ]
    for model, published in pairs:
        assert model == pytest.approx(published, rel=0.15)


def test_default_eplb_prefill_is_slower_than_perfect():
    assert (
        prefill_point(4096)["tokens_per_s_per_npu"] < prefill_point(4096, Setup(eplb="perfect"))["tokens_per_s_per_npu"]
    )


# -- deployments --------------------------------------------------------------------------------------------------


def test_the_static_splits_of_384_npus_are_whole_instances():
    options = splits(384)
    assert 224 in options and 320 in options
    for p in options:
        prefill, decode, n_prefill, n_decode = Deployment("disaggregated", 384, p).groups()
        assert n_prefill * prefill.dies + n_decode * decode.dies == 2 * 384


@pytest.mark.parametrize(
    ("kind", "prefill", "match"),
    [("disaggregated", 20, "multiple of 16"), ("disaggregated", 384, "leaves decode"), ("direct", 0, "'direct'")],
)
def test_a_deployment_that_does_not_fit_is_refused_by_name(kind, prefill, match):
    with pytest.raises(ValueError, match=match):
        Deployment(kind, 384, prefill)


SMALL = {  # 32 NPUs: 16 prefill (EP32) and 16 decode (EP32); co-located: two groups of 16 NPUs
    "disaggregated": Deployment("disaggregated", 32, 16, decode_instance_npus=16, sizes=Sizes(decode_batch=4)),
    "colocated": Deployment("colocated", 32, colocated_group_npus=16, sizes=Sizes(decode_batch=4)),
}


@pytest.mark.parametrize("kind", SMALL)
def test_every_request_completes_and_every_kv_block_ends_free(kind):
    from sim.serving import Simulation

    sim = Simulation(SMALL[kind].spec())
    results = sim.run(Workload(Lengths.fixed(1024, 16), rate=40.0, num_requests=60).requests(16384))
    assert all(r.error is None and r.output_tokens == 16 for r in results)
    assert all(r.ttft_s > 0 and r.tpot_s > 0 for r in results)
    for instance in sim.coordinator.instances:
        pool = instance.batcher.pool
        assert pool.num_free == pool.total


def test_colocated_keeps_kv_local_and_disaggregated_pulls_it_over_roce():
    from sim.serving import Simulation

    for kind, moves in (("colocated", False), ("disaggregated", True)):
        sim = Simulation(SMALL[kind].spec())
        pulled = []
        sim._pull = lambda blocks, _p=sim._pull, _log=pulled: _log.append(blocks) or _p(blocks)
        sim.run([(0.0, 1024, 4)])
        assert bool(pulled) is moves


def test_the_same_seed_gives_the_same_results():
    workload = Workload(Lengths.fixed(1024, 8), rate=40.0, num_requests=20, seed=3)
    runs = [simulate(SMALL["colocated"].spec(), workload).results for _ in range(2)]
    assert [(r.ttft_s, r.tpot_s) for r in runs[0]] == [(r.ttft_s, r.tpot_s) for r in runs[1]]


def test_an_experiment_run_reports_attainment_under_the_slo():
    run = experiment.run_once(SMALL["disaggregated"], Lengths.fixed(1024, 16), 5.0, experiment.Search(seconds=4))
    assert run["attainment"] == 1.0 and run["tokens_per_s"] > 0
    assert run["ttft_p90_s"] <= SLO.ttft_s


def test_fan_out_over_processes_returns_results_in_order():
    assert experiment.fan_out(math.factorial, range(6)) == [1, 1, 2, 6, 24, 120]


def test_the_dask_engine_without_dask_names_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name.startswith("dask"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(RuntimeError, match=r"flexnpu\[cluster\]"):
        experiment.fan_out(math.factorial, [1], engine="dask")


# -- command lines ------------------------------------------------------------------------------------------------


def test_bench_points_print_one_row_and_write_the_asked_json(tmp_path):
    out = tmp_path / "point.json"
    result = CliRunner().invoke(bench_command, ["--decode-point", "4096,256,96", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())) == {"tpot_ms", "tokens_per_s_per_npu"}
    result = CliRunner().invoke(bench_command, ["--prefill-point", "4096", "--eplb", "perfect", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["tokens_per_s_per_npu"] == pytest.approx(6688, rel=0.15)
    result = CliRunner().invoke(bench_command, ["--decode-point", "4096,256", "--out", str(out)])
    assert result.exit_code != 0 and "IN,OUT,B" in result.output


def test_simulate_runs_deepseek_r1_on_910c_npus_and_refuses_another_chip(tmp_path):
    out = tmp_path / "run.json"
    args = ["--model", "deepseek-r1", "--chip", "910C", "--npus", "32", "--deployment", "colocated", "--ep", "32"]
    result = CliRunner().invoke(
        simulate_command, [*args, "--rate", "1", "--duration", "2", "--lengths", "1024,8", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    run = json.loads(out.read_text())
    assert run["completed"] == len(run["requests"]) > 0 and run["settings"]["slo"]["ttft_s"] == SLO.ttft_s
    result = CliRunner().invoke(simulate_command, ["--model", "deepseek-r1", "--chip", "910B2", "--npus", "32"])
    assert result.exit_code != 0 and "910C" in result.output


def test_simulate_reads_a_deepseek_v3_config_json(tmp_path):
    from tests.unit.test_deepseek import R1_JSON

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**R1_JSON, "num_hidden_layers": 31}))
    args = ["--model", str(path), "--chip", "910C", "--npus", "32", "--deployment", "colocated", "--ep", "32"]
    result = CliRunner().invoke(simulate_command, [*args, "--rate", "1", "--duration", "1", "--lengths", "512,4"])
    assert result.exit_code == 0, result.output


def test_the_tiny_model_is_the_same_architecture_as_r1():
    assert TINY_DEEPSEEK.__dataclass_fields__ == DEEPSEEK_R1.__dataclass_fields__
    assert TINY_DEEPSEEK.first_k_dense_replace < TINY_DEEPSEEK.num_hidden_layers
