"""A serving deployment in virtual time: the serving engines' batching core (workloads/batching.py) planning steps,
the model's step costs on the chips' engines and policies, requests from the load generator's draws.

It drives the live deployment's coordinator (workloads/coordinator.py: routing, back-pressure, hand-over) with an
event heap instead of processes and sockets, on as many chips as asked:
- direct: one engine per chip running both phases (one stream, its phase inferred per step), fifo;
- colocated: a prefill and a decode engine per chip, one KV block pool (the live deployment's IPC sharing), the
  chip's policy deciding between their streams;
- disaggregated: `prefill_npus` chips of prefill engines and the rest decode engines; a handed-over request's KV
  blocks cross the interconnect (a PeerCopy's cost) before its first decode on its decode chip.
A step: the engine's host plans it and issues it (`host_ms`, the serving
process's work per step), the chip runs its tasks, the sampled tokens are the step's end.

Events are kept in one heap in modeled time; chips are advanced to their next event in time order with everything
else, so any number of chips interleave exactly.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from npu.emulated.device import EmulatedNPU
from npu.profiles import ChipProfile
from npu.tasks import Cost, Unit
from scheduler.engine import Engine
from scheduler.phase import declare
from scheduler.policies import make_policy
from scheduler.stream import Phase, PhaseSource, Stream, TaskEntry
from sim.steps import SimTask, StepCosts
from workloads.batching import Batcher, BlockPool, FinishReason, FirstToken, NeverFits, Role, StepKind, Token
from workloads.coordinator import Coordinator, Instance, Step
from workloads.model import CacheConfig, ModelConfig, kv_block_bytes
from workloads.spec import DEPLOYMENTS, ServeSpec
from workloads.traffic import RequestResult


@dataclass(frozen=True)
class SimSpec:
    model: ModelConfig
    chip: ChipProfile
    deployment: str = "colocated"
    npus: int = 1
    prefill_npus: int = 0  # disaggregated: chips of prefill engines (0: half, rounded up)
    serve: ServeSpec = ServeSpec()  # the engines' KV cache and batch sizes, and the chips' policy, as served live
    host_ms: float = 1.0  # the serving process's work before a decode step reaches the chip (inputs, a replay)
    prefill_host_ms: float = 0.0  # the same before a prefill step (0: launched op by op, the chip starts at once)
    fold: int = 1
    keep_itl: bool = True  # per-token gaps (memory: one float per token)
    # A step model for what StepCosts does not describe (sim/cloudmatrix: an EP group of dies as one chip), called
    # with this spec: its tasks(plan), pull(blocks) and batching(role) replace the dense model's. None: StepCosts.
    steps: Callable | None = None

    def __post_init__(self) -> None:
        if self.deployment not in DEPLOYMENTS:
            raise ValueError(f"unknown deployment {self.deployment!r} (have {', '.join(DEPLOYMENTS)})")
        if self.npus < 1:
            raise ValueError(f"a deployment needs at least one NPU, got npus={self.npus}")
        if self.prefill_npus and self.deployment != "disaggregated":
            raise ValueError(f"prefill_npus={self.prefill_npus} applies only to the disaggregated deployment")
        if self.deployment == "disaggregated" and not 0 < self.prefill_chips < self.npus:
            raise ValueError(
                f"disaggregated needs prefill and decode chips: {self.prefill_chips} prefill of {self.npus} NPUs"
            )

    @property
    def prefill_chips(self) -> int:
        return self.prefill_npus or math.ceil(self.npus / 2)


@dataclass(eq=False)
class _Engine:
    """One serving engine: the coordinator's instance, its stream on a chip, the step in flight."""

    core: Instance
    chip: Engine
    stream: Stream
    step: Step | None = None  # the step being issued or on the chip
    on_chip: bool = False  # its tasks were handed to the chip's engine

    @property
    def idle(self) -> bool:
        return self.step is None


class Simulation:
    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        serve = spec.serve
        if spec.steps is None:
            cache = CacheConfig(serve.num_blocks, serve.block_size)
            self.costs = StepCosts(spec.model, cache, -(-serve.max_model_len // serve.block_size), spec.fold)
            self.block_bytes = kv_block_bytes(spec.model, serve.block_size)
            self._batching, self._pull = serve.batching, self._peer_copy
        else:
            self.costs = spec.steps(spec)
            self._batching, self._pull = self.costs.batching, self.costs.pull
        self.chips = [self._chip(i) for i in range(spec.npus)]
        self.engines: dict[Instance, _Engine] = {}
        self.coordinator = self._build()
        self.on_chip = {c: [e for e in self.engines.values() if e.chip is c] for c in self.chips}
        self._due: dict[Engine, float] = {}  # each busy chip's next event
        self.heap: list = []
        self._seq = itertools.count()
        self.results: dict[str, RequestResult] = {}
        self._token_times: dict[str, list[float]] = {}
        self.now = 0.0

    # -- building ---------------------------------------------------------------------------------------------

    def _chip(self, i: int) -> Engine:
        policy = make_policy(self.spec.serve.policy, **self.spec.serve.policy_options)
        return Engine(EmulatedNPU(f"npu{i}", self.spec.chip, "timing"), policy)

    def _engine(self, name: str, role: Role, chip: Engine, phase: Phase, pool: BlockPool | None = None) -> Instance:
        stream = Stream()
        declare(stream, phase, PhaseSource.ROLE)  # as a virtual NPU's role in the config does
        chip.add_stream(stream)
        core = Instance(name, Batcher(self._batching(role), pool))
        self.engines[core] = _Engine(core, chip, stream)
        return core

    def _build(self) -> Coordinator:
        kind = self.spec.deployment
        entries, decoders = [], []
        for i, chip in enumerate(self.chips):
            if kind == "direct":
                entries.append(self._engine(f"npu{i}", Role.COLOCATED, chip, Phase.UNKNOWN))
            elif kind == "colocated":  # a chip's prefill engine hands over to the decode engine beside it (one pool)
                pool = BlockPool(self._batching(Role.DECODE).num_blocks)
                entries.append(self._engine(f"npu{i}/prefill", Role.PREFILL, chip, Phase.PREFILL, pool))
                decoders.append(self._engine(f"npu{i}/decode", Role.DECODE, chip, Phase.DECODE, pool))
            elif i < self.spec.prefill_chips:
                entries.append(self._engine(f"npu{i}/prefill", Role.PREFILL, chip, Phase.PREFILL))
            else:
                decoders.append(self._engine(f"npu{i}/decode", Role.DECODE, chip, Phase.DECODE))
        return Coordinator(entries, decoders, copy_kv=kind == "disaggregated")

    # -- running ----------------------------------------------------------------------------------------------

    def run(self, requests: list[tuple[float, int, int]]) -> list[RequestResult]:
        """Serve (arrival s, prompt tokens, max tokens) requests to the end; results in request order."""
        for i, (at, prompt, max_tokens) in enumerate(requests):
            self.results[str(i)] = RequestResult(prompt, max_tokens, at)
            self._at(at, self._arrive, str(i))
        due = self._due
        while True:
            t_heap = self.heap[0][0] if self.heap else math.inf
            chip = min(due, key=due.__getitem__) if due else None
            if chip is None and not self.heap:
                break
            if chip is not None and due[chip] <= t_heap:
                self.now = due[chip]
                chip.advance(self.now)
                self._refresh(chip)
                for engine in self.on_chip[chip]:
                    if engine.on_chip and not engine.stream.queue:
                        self._step_done(engine)
            else:
                t, _, action, arg = heapq.heappop(self.heap)
                self.now = t
                action(arg)
        return [self.results[str(i)] for i in range(len(requests))]

    def _at(self, t: float, action: Callable, arg) -> None:
        heapq.heappush(self.heap, (t, next(self._seq), action, arg))

    def _arrive(self, rid: str) -> None:
        r = self.results[rid]
        try:
            core = self.coordinator.admit(rid, r.prompt_tokens, r.max_tokens, self.now, ignore_eos=True)
        except NeverFits as exc:  # refused, as the live server refuses it
            r.error = exc.message
            return
        self._wake(self.engines[core])

    def _wake(self, engine: _Engine) -> None:
        if engine.idle:
            self._plan(engine)

    def _plan(self, engine: _Engine) -> None:
        step = self.coordinator.next_step(engine.core, self.now)
        if step is None:  # idle, or held back by back-pressure: woken when that changes
            return
        engine.step = step
        host_ms = self.spec.host_ms if step.plan.kind is StepKind.DECODE else self.spec.prefill_host_ms
        self._at(self.now + host_ms / 1e3, self._issue, engine)

    def _issue(self, engine: _Engine) -> None:
        step = engine.step
        pulls = [self._pull(p.src) for p in step.pulls]  # handed-over KV crosses the interconnect first
        tasks = pulls + self.costs.tasks(step.plan)
        engine.chip.submit_all([TaskEntry(engine.stream, 0, task=t) for t in tasks], self.now)
        engine.on_chip = True
        self._refresh(engine.chip)
        for core in self.coordinator.pulled(step.pulls):
            self._wake(self.engines[core])

    def _peer_copy(self, blocks: tuple[int, ...]) -> SimTask:
        size = len(blocks) * self.block_bytes
        return SimTask("memcpy_peer", Cost(hbm_bytes=size, peer_bytes=size, unit=Unit.DMA))

    def _refresh(self, chip: Engine) -> None:
        t = chip.npu.next_event()
        if t is None:
            self._due.pop(chip, None)
        else:
            self._due[chip] = t

    def _step_done(self, engine: _Engine) -> None:
        plan, engine.step, engine.on_chip = engine.step.plan, None, False
        sampled = {e.request_id: 0 for e in plan.entries if e.samples}
        outcome = self.coordinator.finish_step(engine.core, plan, sampled, self.now)
        for event in outcome.events:
            self._record(event)
        for core in outcome.wake:
            self._wake(self.engines[core])
        self._plan(engine)

    def _record(self, event) -> None:
        rid, r = event.request_id, self.results[event.request_id]
        if isinstance(event, FirstToken):
            r.ttft_s = event.time - r.sent_s
            r.output_tokens = 1
            self._token_times[rid] = [event.time] if self.spec.keep_itl else [event.time, event.time]
            return
        times = self._token_times.get(rid)
        if isinstance(event, Token):
            r.output_tokens += 1
            if self.spec.keep_itl:
                times.append(event.time)
            else:
                times[1] = event.time
            return
        if event.reason is FinishReason.HANDOVER:  # the coordinator passed it to a decode engine
            return
        times = self._token_times.pop(rid)
        r.e2e_s = times[-1] - r.sent_s
        if self.spec.keep_itl:
            r.itl_s = [b - a for a, b in itertools.pairwise(times)]
        if r.output_tokens > 1:
            r.tpot_s = (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)

    # -- what a timeline needs ---------------------------------------------------------------------------------

    def trace(self, npu: int = 0) -> None:
        """Record the kernels of chip `npu` (phase, start, end, cores) in its engine's trace."""
        self.chips[npu].trace = []
