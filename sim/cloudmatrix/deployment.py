"""DeepSeek-R1 deployments on a CloudMatrix384-scale supernode, as CloudMatrix-Infer runs them (arXiv 2506.12708)
and as FlexNPU co-locates them, built as sim/serving.py specs; and the steady-state points the published
figures are compared with.

- Static PD disaggregation: prefill instances of 16 NPUs (32 dies, EP32, the shared expert on every die, two
  micro-batches), decode instances of up to 160 NPUs (320 dies, EP320: 256 routed experts, 32 dies of shared-expert
  replicas, redundant routed copies filling the rest, DP attention), KV over RoCE from prefill to decode. The P:D
  split is the deployment's choice (the comparison sweeps it).
- Flex co-location: every die serves both phases — a prefill engine and a decode engine per group of
  `colocated_group_npus` NPUs (default 192) sharing its dies, weights and KV pool (KV stays local: no transfer),
  the `flex` policy (scheduler/flex.py) deciding per dispatch which phase gets the cores. Decode is one EP group
  over all of the group's dies (EP384, shared-expert dies in CloudMatrix-Infer's proportion), prefill runs EP32
  groups side by side under it (a die's weights are the EP32 layout's eight experts, which hold its decode expert).
Each EP group is one chip of the simulation (costs.py: lockstep, slowest die); requests are routed to groups by the
coordinator (workloads/coordinator.py) as to chips.

Three constants were fitted, one per published figure class, everything else comes from cited figures or the
existing device model: GRAPH_LAUNCH_S here (decode at 24 requests per NPU), npu/emulated/ops/mla.MLA_DECODE_EFF
(decode at 96 per NPU), npu/emulated/ops/quant.INT8_EFF (prefill). The per-layer times, the tokens/s at other
batches and lengths, and the comparison are predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from npu.emulated.timing import alone
from npu.profiles import profile
from sim.cloudmatrix.costs import Group, GroupCosts, Sizes
from sim.cloudmatrix.imbalance import DEFAULT_SKEW, Imbalance
from sim.cloudmatrix.network import Network
from sim.serving import SimSpec
from workloads.deepseek import DEEPSEEK_R1, DeepSeekConfig
from workloads.spec import ServeSpec
from workloads.traffic import Slo

# Device-side cost of one kernel launch inside a captured decode graph (CloudMatrix-Infer runs decode as a graph
# of fused operators; the 910C profile's 3 us is an eager launch and is itself unmeasured). Fitted to the decode
# figure at 24 requests per NPU (TPOT 24.6 ms), where the step's fixed costs dominate.
GRAPH_LAUNCH_S = 0.1e-6
CHIP = profile("910C").with_(launch_overhead_s=GRAPH_LAUNCH_S)
PREFILL_INSTANCE_NPUS = 16
DECODE_INSTANCE_NPUS = 160
DECODE_SHARED_DIES = 32  # per 320 dies (CloudMatrix-Infer's decode: 32 shared-expert dies of EP320)
# The SLO of the comparison. TPOT 50 ms is CloudMatrix-Infer's; it publishes no TTFT objective: 5 s is this
# project's choice for 4K-token prompts on EP groups whose prefill steps take ~1.5 s.
SLO = Slo(ttft_s=5.0, tpot_s=0.050)
DEPLOYMENTS = ("disaggregated", "colocated")


@dataclass(frozen=True)
class Setup:
    """The constants nobody published (swept by the sensitivity bench) and the serving options."""

    mtp_acceptance: float | None = 0.7  # None: no MTP (CloudMatrix-Infer reports ~70 % of drafts accepted)
    eplb: str = "default"
    skew: float = DEFAULT_SKEW
    ub_latency_scale: float = 1.0
    seed: int = 0

    def imbalance(self, config: DeepSeekConfig) -> Imbalance:
        return Imbalance(self.eplb, self.skew, config.moe_layers, self.seed)

    def network(self) -> Network:
        return Network(latency_scale=self.ub_latency_scale)


PREFILL_GROUP = Group(2 * PREFILL_INSTANCE_NPUS, 0, microbatches=2)
DECODE_GROUP = Group(2 * DECODE_INSTANCE_NPUS, DECODE_SHARED_DIES)


def decode_group(dies: int) -> Group:
    """A decode EP group of `dies` dies, its shared-expert dies in CloudMatrix-Infer's proportion (32 of 320)."""
    return Group(dies, max(1, round(DECODE_SHARED_DIES * dies / DECODE_GROUP.dies)))


def costs(
    setup: Setup = Setup(),
    prefill: Group = PREFILL_GROUP,
    decode: Group = DECODE_GROUP,
    sizes: Sizes | None = None,
    config: DeepSeekConfig = DEEPSEEK_R1,
    colocated: bool = False,
) -> GroupCosts:
    network, imbalance = setup.network(), setup.imbalance(config)
    return GroupCosts(
        config, CHIP, prefill, decode, sizes or Sizes(), network, imbalance, setup.mtp_acceptance, colocated
    )


# -- steady-state points (what the published figures measure) ------------------------------------------------------


def decode_point(prompt: int, output: int, per_npu: int, setup: Setup = Setup(), group: Group = DECODE_GROUP) -> dict:
    """Decode in steady state: `per_npu` requests per NPU (half per die), their contexts spread evenly over
    [prompt, prompt + output), the busiest die's mean expert load. TPOT, tokens/s per NPU, and one MoE layer's
    time per step (what the paper's per-layer figures are)."""
    batch = math.ceil(per_npu / 2)
    c = costs(setup, decode=group, sizes=Sizes(decode_batch=batch, max_model_len=max(16384, prompt + output)))
    q = 2 if setup.mtp_acceptance is not None else 1
    routed = group.dies - group.shared_dies
    load = c.imbalance.mean(routed, batch * q * DEEPSEEK_R1.num_experts_per_tok * group.dies / routed)
    tasks = c.decode(group, batch, prompt + output / 2, load)
    accepted = 1.0 + (setup.mtp_acceptance or 0.0)
    tpot = c.step_time(tasks)  # already per accepted token
    layer = sum(alone(CHIP, t.price) for t in tasks if t.price.launches == DEEPSEEK_R1.moe_layers)
    return {
        "tpot_ms": tpot * 1e3,
        "tokens_per_s_per_npu": per_npu / tpot,
        "layer_us": layer / DEEPSEEK_R1.moe_layers * accepted * 1e6,
        "load": load,
    }


def prefill_point(prompt: int, setup: Setup = Setup(), group: Group = PREFILL_GROUP, tokens: int = 4096) -> dict:
    """Prefill in steady state: each die takes as many `prompt`-token prompts as fit `tokens` (at least one)."""
    per_die = max(1, tokens // prompt)
    c = costs(setup, prefill=group, sizes=Sizes(prefill_tokens=tokens, max_model_len=max(16384, prompt + 1)))
    routed = group.dies - group.shared_dies
    load = c.imbalance.mean(routed, per_die * prompt * DEEPSEEK_R1.num_experts_per_tok * group.dies / routed)
    step = c.step_time(c.prefill(group, per_die, prompt, load))
    return {"tokens_per_s_per_npu": 2 * per_die * prompt / step, "step_s": step, "load": load}


# -- deployments for the event simulation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """A deployment of `npus` NPUs; called with the SimSpec, it is the spec's step model (picklable, so sweeps
    can run it in other processes)."""

    kind: str = "disaggregated"
    npus: int = 384
    prefill_npus: int = 224  # disaggregated: NPUs of prefill instances (a multiple of 16); the rest decode
    colocated_group_npus: int = 192
    decode_instance_npus: int = DECODE_INSTANCE_NPUS  # disaggregated: the largest decode instance
    policy: str = "flex"  # colocated: the dies' scheduling policy (disaggregated engines run alone: fifo)
    sizes: Sizes = Sizes()
    setup: Setup = Setup()
    # flex: the decode step's device-time goal per accepted token: flex's default (45 left p90 TPOT at the 50 ms SLO)
    tpot_target_ms: float = 40.0
    config: DeepSeekConfig = field(default=DEEPSEEK_R1)

    def __post_init__(self) -> None:
        if self.kind not in DEPLOYMENTS:
            raise ValueError(f"deployment {self.kind!r}: have {', '.join(DEPLOYMENTS)}")
        if self.kind == "colocated" and (self.npus % self.colocated_group_npus or self.colocated_group_npus % 16):
            raise ValueError(
                f"colocated: {self.npus} NPUs are not whole EP groups of {self.colocated_group_npus} NPUs (a multiple "
                f"of the {PREFILL_INSTANCE_NPUS}-NPU prefill groups under each)"
            )
        if self.kind == "disaggregated":
            decode = self.npus - self.prefill_npus
            if self.prefill_npus % PREFILL_INSTANCE_NPUS or self.prefill_npus <= 0 or decode <= 0:
                raise ValueError(
                    f"disaggregated: {self.prefill_npus} prefill NPUs of {self.npus} must be a positive multiple of "
                    f"{PREFILL_INSTANCE_NPUS} that leaves decode NPUs"
                )
            if decode % self.decode_instances:
                raise ValueError(
                    f"disaggregated: {decode} decode NPUs do not split into {self.decode_instances} equal instances "
                    f"of at most {self.decode_instance_npus}"
                )

    @property
    def decode_instances(self) -> int:
        return math.ceil((self.npus - self.prefill_npus) / self.decode_instance_npus)

    def groups(self) -> tuple[Group, Group, int, int]:
        """(prefill group, decode group, prefill groups, decode groups)."""
        if self.kind == "colocated":  # each group's dies: its decode EP group, and prefill EP32 groups under it
            dies = 2 * self.colocated_group_npus
            prefill = replace(PREFILL_GROUP, replicas=dies // PREFILL_GROUP.dies)
            return prefill, decode_group(dies), self.npus // self.colocated_group_npus, 0
        dies = 2 * (self.npus - self.prefill_npus) // self.decode_instances
        return PREFILL_GROUP, decode_group(dies), self.prefill_npus // PREFILL_INSTANCE_NPUS, self.decode_instances

    def __call__(self, spec: SimSpec) -> GroupCosts:
        prefill, decode, _, _ = self.groups()
        return costs(self.setup, prefill, decode, self.sizes, self.config, self.kind == "colocated")

    def spec(self) -> SimSpec:
        prefill_groups, decode_groups = self.groups()[2:]
        colocated = self.kind == "colocated"
        policy = self.policy if colocated else "fifo"
        options = {"tpot_target_ms": self.tpot_target_ms} if colocated and policy == "flex" else {}
        serve = ServeSpec(
            model=self.config.name,
            block_size=self.sizes.block_size,
            max_model_len=self.sizes.max_model_len,
            timing=True,
            policy=policy,
            policy_options=options,
        )
        return SimSpec(
            model=self.config,
            chip=CHIP,
            deployment=self.kind,
            npus=prefill_groups + decode_groups,
            prefill_npus=0 if colocated else prefill_groups,
            serve=serve,
            host_ms=0.0,
            keep_itl=False,
            steps=self,
        )


def split(npus: int, prefill_npus: int, **changes) -> Deployment:
    return Deployment("disaggregated", npus, prefill_npus, **changes)


def splits(npus: int) -> list[int]:
    """The prefill NPU counts a static disaggregation of `npus` can take: multiples of 16 whose remainder splits
    into equal decode instances of at most 160 NPUs (whole NPUs, even dies)."""
    out = []
    for p in range(PREFILL_INSTANCE_NPUS, npus, PREFILL_INSTANCE_NPUS):
        try:
            Deployment("disaggregated", npus, p)
        except ValueError:
            continue
        out.append(p)
    return out


def with_setup(deployment: Deployment, **changes) -> Deployment:
    return replace(deployment, setup=replace(deployment.setup, **changes))
