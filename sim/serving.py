"""A serving deployment in virtual time: the serving engines' batching core (workloads/batching.py) planning steps,
the model's step costs on the chips' engines and policies, requests from the load generator's draws.

It is deploy.py's coordinator without processes or sockets, on as many chips as asked:
- direct: one engine per chip running both phases (one stream, its phase inferred per step), fifo;
- colocated: a prefill and a decode engine per chip, one KV block pool (the live deployment's IPC sharing), the
  chip's policy deciding between their streams;
- disaggregated: `prefill_npus` chips of prefill engines and the rest decode engines; a handed-over request's KV
  blocks cross the interconnect (a PeerCopy's cost) before its first decode on its decode chip.
A router sends each new request to the entry engine with the fewest unfinished requests, and each handover to the
decode engine with the fewest. A step: the engine's host plans it and issues it (`host_ms`, the serving
process's work per step), the chip runs its tasks, the sampled tokens are the step's end.

Events are kept in one heap in modeled time; chips are advanced to their next event in time order with everything
else, so any number of chips interleave exactly.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from npu.emulated.device import EmulatedNPU
from npu.errors import OutOfMemory
from npu.profiles import ChipProfile
from npu.tasks import Cost, Unit
from scheduler.engine import Engine
from scheduler.phase import declare
from scheduler.policies import make_policy
from scheduler.stream import Phase, PhaseSource, Stream, TaskEntry
from sim.steps import SimTask, StepCosts
from workloads.batching import (
    Batcher,
    BlockPool,
    FinishReason,
    FirstToken,
    NeverFits,
    Role,
    StepKind,
    StepPlan,
    Token,
)
from workloads.deploy import ServeSpec
from workloads.model import CacheConfig, ModelConfig
from workloads.traffic import RequestResult

DEPLOYMENTS = ("direct", "colocated", "disaggregated")


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
    """One serving engine: its batcher, its stream on a chip, the step in flight."""

    name: str
    role: Role
    batcher: Batcher
    chip: Engine
    stream: Stream
    plan: StepPlan | None = None  # the step being issued or on the chip
    on_chip: bool = False  # its tasks were handed to the chip's engine
    inbox: list = field(default_factory=list)  # decode: (request id, context, prefill engine, blocks) handed over
    outstanding: int = 0  # unfinished requests routed here (the router's measure)

    @property
    def idle(self) -> bool:
        return self.plan is None


class Simulation:
    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        serve = spec.serve
        cache = CacheConfig(serve.num_blocks, serve.block_size)
        self.costs = StepCosts(spec.model, cache, -(-serve.max_model_len // serve.block_size), spec.fold)
        self.block_bytes = 2 * spec.model.num_hidden_layers * spec.model.num_key_value_heads * spec.model.head_dim
        self.block_bytes *= spec.model.dtype.itemsize * serve.block_size
        self.chips = [self._chip(i) for i in range(spec.npus)]
        self.entries: list[_Engine] = []  # engines that take new requests
        self.decoders: list[_Engine] = []  # decode engines (colocated, disaggregated)
        self._build()
        self.on_chip = {c: [e for e in self.entries + self.decoders if e.chip is c] for c in self.chips}
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

    def _engine(self, name: str, role: Role, chip: Engine, phase: Phase, pool: BlockPool | None = None) -> _Engine:
        stream = Stream()
        declare(stream, phase, PhaseSource.ROLE)  # as a virtual NPU's role in the config does
        chip.add_stream(stream)
        return _Engine(name, role, Batcher(self.spec.serve.batching(role), pool), chip, stream)

    def _build(self) -> None:
        kind = self.spec.deployment
        for i, chip in enumerate(self.chips):
            if kind == "direct":
                self.entries.append(self._engine(f"npu{i}", Role.COLOCATED, chip, Phase.UNKNOWN))
            elif kind == "colocated":
                pool = BlockPool(self.spec.serve.num_blocks)
                self.entries.append(self._engine(f"npu{i}/prefill", Role.PREFILL, chip, Phase.PREFILL, pool))
                self.decoders.append(self._engine(f"npu{i}/decode", Role.DECODE, chip, Phase.DECODE, pool))
            elif i < self.spec.prefill_chips:
                self.entries.append(self._engine(f"npu{i}/prefill", Role.PREFILL, chip, Phase.PREFILL))
            else:
                self.decoders.append(self._engine(f"npu{i}/decode", Role.DECODE, chip, Phase.DECODE))
        if kind == "colocated":  # a chip's prefill engine hands over to the decode engine beside it (one pool)
            self.partner = dict(zip(map(id, self.entries), self.decoders, strict=True))

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
        engine = min(self.entries, key=lambda e: e.outstanding)
        engine.outstanding += 1
        try:
            if engine.role is Role.PREFILL:  # its decode engine must be able to finish it
                self._decoder(engine).batcher.check_fits(rid, r.prompt_tokens, r.max_tokens)
            engine.batcher.add(rid, r.prompt_tokens, r.max_tokens, self.now, ignore_eos=True)
        except NeverFits as exc:  # refused, as the live server refuses it
            r.error = exc.message
            engine.outstanding -= 1
            return
        self._wake(engine)

    def _wake(self, engine: _Engine) -> None:
        if engine.idle:
            self._plan(engine)

    def _plan(self, engine: _Engine) -> None:
        if engine.role is Role.PREFILL and not self._decode_room(engine):
            return  # woken when a decode engine finishes a request
        pulls = self._take_handovers(engine)
        plan = engine.batcher.schedule(self.now)
        if plan.kind is StepKind.IDLE:  # a handover that made a request runnable makes a decode step: no pulls here
            return
        engine.plan = plan
        host_ms = self.spec.host_ms if plan.kind is StepKind.DECODE else self.spec.prefill_host_ms
        self._at(self.now + host_ms / 1e3, self._issue, (engine, pulls))

    def _issue(self, arg) -> None:
        engine, pulls = arg
        tasks = pulls + self.costs.tasks(engine.plan)
        engine.chip.submit_all([TaskEntry(engine.stream, 0, task=t) for t in tasks], self.now)
        engine.on_chip = True
        self._refresh(engine.chip)

    def _refresh(self, chip: Engine) -> None:
        t = chip.npu.next_event()
        if t is None:
            self._due.pop(chip, None)
        else:
            self._due[chip] = t

    def _step_done(self, engine: _Engine) -> None:
        plan, engine.plan, engine.on_chip = engine.plan, None, False
        sampled = {e.request_id: 0 for e in plan.entries if e.samples}
        for event in engine.batcher.finish_step(plan, sampled, self.now):
            self._record(engine, event)
        self._plan(engine)

    def _record(self, engine: _Engine, event) -> None:
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
        # Finished
        if event.reason is FinishReason.HANDOVER:
            self._hand_over(engine, rid, event)
            return
        engine.outstanding -= 1
        if engine.role is Role.DECODE:
            for entry in self.entries:
                self._wake(entry)
        times = self._token_times.pop(rid)
        r.e2e_s = times[-1] - r.sent_s
        if self.spec.keep_itl:
            r.itl_s = [b - a for a, b in itertools.pairwise(times)]
        if r.output_tokens > 1:
            r.tpot_s = (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)

    def _decoder(self, prefill: _Engine) -> _Engine:
        """Where a prefill engine hands over: the decode engine beside it, or the least loaded."""
        if self.spec.deployment == "colocated":
            return self.partner[id(prefill)]
        return min(self.decoders, key=lambda e: e.outstanding)

    def _decode_room(self, prefill: _Engine) -> bool:
        """Back-pressure, as the live coordinator has it: a prefill engine starts new prompts only while the decode
        engine it hands over to has fewer than max_num_seqs requests, so prompts wait before their prefill (TTFT)
        rather than after it for a decode slot (TPOT)."""
        return self._decoder(prefill).outstanding < self.spec.serve.max_num_seqs

    def _hand_over(self, prefill: _Engine, rid: str, done) -> None:
        prefill.outstanding -= 1
        decode = self._decoder(prefill)
        decode.outstanding += 1
        r = self.results[rid]
        decode.inbox.append((rid, r.prompt_tokens, prefill, done.handover_blocks))
        self._wake(decode)

    def _take_handovers(self, decode: _Engine) -> list[SimTask]:
        """Handed-over requests join the decode engine: blocks change hands (a shared pool) or are pulled across
        the interconnect (disaggregated); a request whose blocks are not free yet waits for a later step."""
        pulls, waiting = [], []
        copy = self.spec.deployment == "disaggregated"
        for rid, context, prefill, blocks in decode.inbox:
            r = self.results[rid]
            try:
                decode.batcher.add_prefilled(
                    rid, context, 0, r.max_tokens, self.now, ignore_eos=True, blocks=None if copy else blocks
                )
            except OutOfMemory:
                waiting.append((rid, context, prefill, blocks))
                continue
            if copy:
                size = len(blocks) * self.block_bytes
                pulls.append(SimTask("memcpy_peer", Cost(hbm_bytes=size, peer_bytes=size, unit=Unit.DMA)))
            prefill.batcher.release(rid, handed_over=not copy)
        decode.inbox[:] = waiting
        return pulls

    # -- what a timeline needs ---------------------------------------------------------------------------------

    def trace(self, npu: int = 0) -> None:
        """Record the kernels of chip `npu` (phase, start, end, cores) in its engine's trace."""
        self.chips[npu].trace = []
