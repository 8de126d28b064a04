"""A step of an EP group as the tasks one of its dies runs: the DeepSeek description (workloads/deepseek.py) for one
die's share of the group's batch, costed by the emulated op library, with the MoE all-to-alls taken from the
supernode's network model and the busiest die's expert load.

Lockstep: the dies of an EP group meet at every MoE layer's dispatch and combine, so the group steps at the pace
of its slowest die. The group is simulated as one die (sim/serving.py's chip) running that slowest die's step:
the most requests or prompts any die holds (the group's batch dealt evenly), the mean context, and the expert
load of the busiest die drawn per step (imbalance.py). What this leaves out: dies whose attention work differs
(DP attention with uneven contexts: the slowest die is taken as average), and, co-located, dies whose prefill
interference differs (every die is taken to see the same).

The step's tasks: the ops before the layers, one dense layer's ops each run `first_k_dense_replace` times in a row
(Cost.repeated, as sim/steps.py folds layers), one MoE layer's likewise for the MoE layers, the head; with MTP the
MTP layer and its head. Decode with MTP verifies 1 + 1 tokens per request per step and yields 1 + acceptance of
them on average: the simulated engine samples one token per step, so a decode step's costs are scaled by
1 / (1 + acceptance) — TPOT and throughput in expectation, not the step-to-step spread of accepted drafts.
Prefill with two micro-batches overlaps each MoE layer's all-to-all with the other micro-batch's compute: the
layer takes max(compute, all-to-all), so only the all-to-all's excess over the compute is left on the stream.

Dispatch and combine are costed as their modeled time (network.py, the busiest die's rows) on the die's UB link,
holding no AI core (a DMA task: the other phase's kernels run beside it). Two at once (a co-located die's prefill
and decode) share the link as if all of that time were bytes, latency included: an overestimate of how much they
slow each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from npu.emulated.ops import bind
from npu.emulated.timing import alone
from npu.profiles import ChipProfile
from npu.tasks import Cost, Unit
from sim.cloudmatrix.imbalance import Imbalance
from sim.cloudmatrix.network import COMBINE_ROW, DISPATCH_ROW, Network
from sim.steps import SimTask
from workloads.batching import BatchingConfig, Role, StepKind, StepPlan
from workloads.deepseek import DeepSeekConfig, ExpertLayout, forward, kv_block_bytes, weight_specs
from workloads.model import CacheConfig, Decode, OpCall, Prefill

COMM = {"MoeDispatch": ("dispatch", DISPATCH_ROW), "MoeCombine": ("combine", COMBINE_ROW)}
# HBM a die keeps free of weights and KV for activations and workspace: not published; CloudMatrix-Infer's
# decode runs 96 requests of 4K per NPU, which this leaves room for.
ACTIVATION_BYTES = 8 << 30
CONTEXT_BUCKET = 128  # decode contexts are costed at the mean rounded up to this (the cost cache's key)
PROMPT_BUCKET = 256


@dataclass(frozen=True)
class Group:
    """An engine's dies: `replicas` EP groups of `dies` dies stepping together, `shared_dies` of each holding the
    shared expert (0: every die runs it over its own tokens), prefill split into `microbatches` (2: all-to-all
    overlapped with compute). Replicas step side by side on one engine's batch (a co-located die's prefill EP
    groups under its decode EP group)."""

    dies: int
    shared_dies: int = 0
    microbatches: int = 1
    replicas: int = 1

    @property
    def engine_dies(self) -> int:
        return self.dies * self.replicas

    def layout(self, load: float = 1.0) -> ExpertLayout:
        return ExpertLayout(ep=self.dies, shared_dies=self.shared_dies, load=load)


@dataclass(frozen=True)
class Sizes:
    """Per-die serving sizes."""

    decode_batch: int = 48  # requests a decode die runs at once (96 per 910C)
    prefill_tokens: int = 4096  # prompt tokens a prefill die takes per step
    block_size: int = 128
    max_model_len: int = 16384


class GroupCosts:
    """sim/serving.py's step model for a DeepSeek deployment: tasks(plan), pull(blocks), batching(role)."""

    def __init__(
        self,
        config: DeepSeekConfig,
        chip: ChipProfile,
        prefill: Group,
        decode: Group,
        sizes: Sizes = Sizes(),
        network: Network | None = None,
        imbalance: Imbalance | None = None,
        mtp_acceptance: float | None = 0.7,
        colocated: bool = False,
    ) -> None:
        """`colocated`: both phases' engines run on the same dies, sharing the weights (the prefill layout holds the
        decode layout's experts too) and one KV pool."""
        if mtp_acceptance is not None and not 0 <= mtp_acceptance <= 1:
            raise ValueError(f"MTP acceptance {mtp_acceptance} is not a fraction in [0, 1] (None: no MTP)")
        self.config, self.chip, self.sizes, self.network = config, chip, sizes, network or Network()
        self.groups = {StepKind.PREFILL: prefill, StepKind.DECODE: decode}
        self.imbalance = imbalance or Imbalance(layers=config.moe_layers)
        self.mtp = mtp_acceptance is not None
        self.acceptance = mtp_acceptance or 0.0
        self.colocated = colocated
        self.block_bytes = kv_block_bytes(config, sizes.block_size, self.mtp)
        self._steps: dict[tuple, list[SimTask]] = {}
        self.cache = CacheConfig(self.blocks_per_die(decode), sizes.block_size)

    # -- memory and batching ------------------------------------------------------------------------------------

    def weight_bytes(self, group: Group) -> int:
        groups = self.groups.values() if self.colocated else (group,)
        return max(sum(s.nbytes for s in weight_specs(self.config, g.layout(), self.mtp).values()) for g in groups)

    def blocks_per_die(self, group: Group) -> int:
        free = self.chip.memory_bytes - self.weight_bytes(group) - ACTIVATION_BYTES
        if free < self.block_bytes:
            raise ValueError(
                f"{self.config.name} on a {self.chip.name} die of an EP{group.dies} group leaves no room for KV "
                f"({self.weight_bytes(group) / 2**30:.1f} GiB of weights of {self.chip.memory_bytes / 2**30:.0f}); "
                "use a larger EP group"
            )
        return int(free // self.block_bytes)

    def batching(self, role: Role) -> BatchingConfig:
        s = self.sizes
        group = self.groups[StepKind.DECODE if role is Role.DECODE else StepKind.PREFILL]
        dies = group.engine_dies
        tokens = max(s.prefill_tokens * dies, s.max_model_len)
        seqs = s.decode_batch * dies if role is Role.DECODE else dies * max(1, s.prefill_tokens // 64)
        return BatchingConfig(
            num_blocks=self.blocks_per_die(group) * dies,
            block_size=s.block_size,
            max_num_seqs=seqs,
            max_num_batched_tokens=tokens,
            max_model_len=s.max_model_len,
            role=role,
            decode_buckets=tuple(range(dies, seqs + dies, dies)),
            chunked_prefill=False,
        )

    # -- steps --------------------------------------------------------------------------------------------------

    def tasks(self, plan: StepPlan) -> list[SimTask]:
        group = self.groups[plan.kind]
        n = len(plan.entries)
        per_die = math.ceil(n / group.engine_dies)
        if plan.kind is StepKind.DECODE:
            context = sum(e.start + 1 for e in plan.entries) / n
            return self.decode(group, per_die, context, self._load(group, per_die * self._queries))
        length = plan.num_tokens / n
        mean_tokens = plan.num_tokens / group.engine_dies  # a die's tokens, the average (some dies may idle)
        load = self._load(group, mean_tokens) * mean_tokens / (per_die * length)
        return self.prefill(group, per_die, length, load)

    @property
    def _queries(self) -> int:
        return 2 if self.mtp else 1

    def _load(self, group: Group, tokens_per_die: float) -> float:
        routed = group.dies - group.shared_dies
        rows = tokens_per_die * self.config.num_experts_per_tok * group.dies / routed
        return self.imbalance.next(routed, rows)

    def decode(self, group: Group, batch: int, context: float, load: float) -> list[SimTask]:
        """One die's decode step for `batch` requests of mean `context` tokens (the last one included), the
        busiest die's expert `load`; scaled to one accepted token (see the module docstring)."""
        q = self._queries
        context = min(math.ceil(context / CONTEXT_BUCKET) * CONTEXT_BUCKET, self.sizes.max_model_len) + q - 1
        key = (StepKind.DECODE, group, batch, context, load)
        if key not in self._steps:
            max_blocks = -(-context // self.sizes.block_size)
            step = Decode((context,) * batch, max_blocks)
            tasks = self._build(step, group.layout(load), q, microbatches=1)
            self._steps[key] = [SimTask(t.name, _scaled(t.price, 1.0 / (1.0 + self.acceptance))) for t in tasks]
        return self._steps[key]

    def prefill(self, group: Group, prompts: int, length: float, load: float) -> list[SimTask]:
        """One die's prefill step of `prompts` prompts of mean `length` tokens at expert `load`."""
        length = max(PROMPT_BUCKET, math.ceil(length / PROMPT_BUCKET) * PROMPT_BUCKET)
        key = (StepKind.PREFILL, group, prompts, length, round(load, 3))
        if key not in self._steps:
            step = Prefill((length,) * prompts)
            self._steps[key] = self._build(step, group.layout(load), 1, group.microbatches)
        return self._steps[key]

    def pull(self, blocks: tuple[int, ...]) -> SimTask:
        """A handed-over request's KV over RoCE, the prefill and decode groups' ports carrying a step's transfers
        in parallel (its time, as bytes over the die's copy link)."""
        ports = min(g.engine_dies for g in self.groups.values())
        seconds = self.network.kv_transfer(len(blocks) * self.block_bytes, ports)
        return SimTask("kv_transfer", Cost(link_bytes=seconds * self.chip.host_link_bandwidth, unit=Unit.DMA))

    def step_time(self, tasks: list[SimTask]) -> float:
        """Seconds of a step on an idle die, its tasks one after another (a steady state's step)."""
        return sum(alone(self.chip, t.price) for t in tasks)

    # -- building -----------------------------------------------------------------------------------------------

    def _build(self, step: Prefill | Decode, layout: ExpertLayout, queries: int, microbatches: int) -> list[SimTask]:
        c = self.config
        two = replace(c, num_hidden_layers=2, first_k_dense_replace=1)  # one dense layer, one MoE layer
        one = replace(c, num_hidden_layers=1, first_k_dense_replace=1)
        calls = forward(two, self.cache, step, layout, mtp=self.mtp, queries=queries)
        dense_only = len(forward(one, self.cache, step, layout, mtp=False, queries=queries))
        main = len(forward(two, self.cache, step, layout, mtp=False, queries=queries))
        per_moe = main - dense_only
        head = 4 if isinstance(step, Prefill) else 3  # final norm, [the prompts' last rows,] LM head, argmax
        pre = 3  # the embedding and the two rotary-table gathers
        dense, moe = calls[pre : dense_only - head], calls[dense_only - head : main - head]
        tasks = [self._task(call, layout, 1) for call in calls[:pre]]
        tasks += [self._task(call, layout, c.first_k_dense_replace) for call in dense]
        tasks += self._moe(moe, layout, c.moe_layers, microbatches)
        tasks += [self._task(call, layout, 1) for call in calls[main - head : main]]
        if self.mtp:  # its input ops, its MoE layer, its head
            rest = calls[main:]
            mtp_pre = len(rest) - per_moe - head
            tasks += [self._task(call, layout, 1) for call in rest[:mtp_pre]]
            tasks += self._moe(rest[mtp_pre : mtp_pre + per_moe], layout, 1, microbatches)
            tasks += [self._task(call, layout, 1) for call in rest[mtp_pre + per_moe :]]
        return tasks

    def _task(self, call: OpCall, layout: ExpertLayout, times: int) -> SimTask:
        cost = bind(call.op, [t.spec for t in call.ins], [t.spec for t in call.outs], call.attrs).cost
        if call.op in COMM:
            op, row = COMM[call.op]
            seconds = self.network.all_to_all(op, layout.ep, call.attrs["received"], row)
            # A copy over the UB costed as its modeled time (the published latencies include the kernels' own
            # HBM reads): it holds no AI core, so the other phase's kernels run beside it.
            cost = Cost(peer_bytes=seconds * self.chip.interconnect_bandwidth, unit=Unit.DMA)
        return SimTask(call.op, cost.repeated(times))

    def _moe(self, calls: list[OpCall], layout: ExpertLayout, times: int, microbatches: int) -> list[SimTask]:
        tasks = [self._task(call, layout, 1) for call in calls]
        if microbatches > 1:  # the all-to-all hides behind the other micro-batch's compute
            comm = [t for t in tasks if t.name in COMM]
            compute = sum(alone(self.chip, t.price) for t in tasks if t.name not in COMM)
            exposed = max(0.0, sum(alone(self.chip, t.price) for t in comm) - compute)
            share = exposed / max(sum(alone(self.chip, t.price) for t in comm), 1e-12)
            tasks = [SimTask(t.name, _scaled(t.price, share)) if t.name in COMM else t for t in tasks]
        return [SimTask(t.name, t.price.repeated(times)) for t in tasks]


def _scaled(cost: Cost, factor: float) -> Cost:
    """The same kernel doing `factor` of its work (launch overhead kept)."""
    return replace(
        cost,
        flops=cost.flops * factor,
        hbm_bytes=cost.hbm_bytes * factor,
        link_bytes=cost.link_bytes * factor,
        peer_bytes=cost.peer_bytes * factor,
    )
