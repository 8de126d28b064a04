"""Deployments of a model behind the front end's `Engine` (workloads/serving.py): which worker processes run on
which virtual NPUs, and how a request's KV cache passes from its prefill to its decode.

- direct: one worker, both phases, in direct mode (no daemon): the passthrough baseline.
- colocated: a prefill worker and a decode worker on two virtual NPUs of one physical NPU, through the daemon.
  The decode worker imports the prefill worker's KV pools (pyACL IPC memory): one cache, one block pool shared
  by the two batchers, and a handover passes block ownership — no copy.
- disaggregated: prefill and decode workers on two physical NPUs. The decode worker imports the prefill worker's
  pools with peer access and pulls each handed-over request's blocks into its own pool, device to device across
  the chips' interconnect.

The coordinator (workloads/coordinator.py, sans-IO: routing, back-pressure, hand-over) runs in the front end's
trio loop: each worker has a loop that asks it for the worker's next step, has the worker run it (after pulling
handed-over KV, disaggregated) and routes the sampled tokens to the requests' streams.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from interposer.shim_env import shim_env
from workloads.batching import Batcher, BlockPool, Finished, FinishReason, NeverFits, Role, StepKind, StepPlan
from workloads.coordinator import Coordinator, Instance, Outcome, Pull
from workloads.model import model_config
from workloads.serving import EngineError, EngineStats, Output, RequestRejected
from workloads.spec import DEPLOYMENTS, ServeSpec
from workloads.workerproc import WorkerProcess


def _ignore(why: str) -> None:
    pass


@dataclass(eq=False)
class _Request:
    id: str
    tokens: list[int]  # prompt, then every sampled token
    stream: trio.MemorySendChannel


@dataclass(eq=False)
class Worker:
    """A worker process and its coordinator instance, with the loop's wake-up."""

    core: Instance
    process: WorkerProcess
    wake: trio.Event = field(default_factory=trio.Event)
    # recent steps: (kind, ms of host work issuing it, modeled ms on the device, wall ms of the worker call)
    timings: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def poke(self) -> None:
        self.wake.set()

    async def idle(self) -> None:
        await self.wake.wait()
        self.wake = trio.Event()


class Deployment:
    """An Engine over one or two worker processes, coordinated by workloads/coordinator.py."""

    def __init__(
        self, spec: ServeSpec, workers: list[Worker], copy_kv: bool, on_failure: Callable[[str], None] = _ignore
    ) -> None:
        """`on_failure(why)`: a worker died (the front end's health goes down; a supervisor restarts the service)."""
        config = model_config(spec.model)
        self.model, self.max_model_len, self.vocab_size = config.name, spec.max_model_len, config.vocab_size
        self.workers = {w.core: w for w in workers}
        entries = [w.core for w in workers if w.core.role is not Role.DECODE]
        decoders = [w.core for w in workers if w.core.role is Role.DECODE]
        self.core = Coordinator(entries, decoders, copy_kv)
        self.on_failure = on_failure
        self.requests: dict[str, _Request] = {}

    # -- Engine ----------------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: list[int], max_tokens: int, ignore_eos: bool):
        send, receive = trio.open_memory_channel(math.inf)
        try:
            core = self.core.admit(request_id, len(prompt), max_tokens, trio.current_time(), ignore_eos)
        except NeverFits as exc:
            raise RequestRejected(exc.message) from None
        self.requests[request_id] = _Request(request_id, list(prompt), send)
        self.workers[core].poke()
        finished = False
        try:
            async for item in receive:
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finish:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            for core in self.core.abort(request_id):
                self.workers[core].poke()

    def stats(self) -> EngineStats:
        instances = self.core.instances
        pools = {id(i.batcher.pool): i.batcher.pool for i in instances}.values()  # a shared pool counts once
        return EngineStats(
            running=sum(i.batcher.stats().running for i in instances),
            waiting=sum(i.batcher.stats().waiting + len(i.inbox) for i in instances),
            kv_blocks_used=sum(p.num_used for p in pools),
            kv_blocks_total=sum(p.total for p in pools),
        )

    # -- the loops -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for worker in self.workers.values():
                nursery.start_soon(self._serve, worker)
                nursery.start_soon(self._watch, worker)

    async def _watch(self, worker: Worker) -> None:
        """A worker that exits, even while idle, fails at once (not at the next request)."""
        await worker.process.process.wait()
        if not worker.core.dead:
            self._fail(worker, str(worker.process.died("its wait")))

    async def _serve(self, worker: Worker) -> None:
        while not worker.core.dead:
            try:
                step = self.core.next_step(worker.core, trio.current_time())
                if step is None:
                    await worker.idle()  # poked when a request arrives, is handed over or makes room
                    continue
                if step.pulls:
                    await self._pull(worker, step.pulls)
                sampled = await self._step(worker, step.plan)
            except EngineError as exc:
                self._fail(worker, str(exc))
                return
            self._route(self.core.finish_step(worker.core, step.plan, sampled, trio.current_time()))

    async def _pull(self, worker: Worker, pulls: tuple[Pull, ...]) -> None:
        """Disaggregated: copy handed-over KV blocks from the prefill worker's pools, across the interconnect."""
        pairs = [[src, dst] for pull in pulls for src, dst in zip(pull.src, pull.dst, strict=True)]
        await worker.process.call("pull", blocks=pairs)
        for core in self.core.pulled(pulls):
            self.workers[core].poke()

    async def _step(self, worker: Worker, plan: StepPlan) -> dict[str, int]:
        entries = [e for e in plan.entries if e.request_id in self.requests]
        if not entries:
            return {}
        blocks = [list(e.blocks) for e in entries]
        began = trio.current_time()
        if plan.kind is StepKind.PREFILL:  # each request's chunk: tokens [start, start + num_tokens)
            chunks = [self.requests[e.request_id].tokens[e.start : e.start + e.num_tokens] for e in entries]
            starts = [e.start for e in entries]
            answer = await worker.process.call("prefill", prompts=chunks, starts=starts, blocks=blocks)
        else:
            last = [self.requests[e.request_id].tokens[-1] for e in entries]
            lengths = [e.start + 1 for e in entries]
            answer = await worker.process.call("decode", tokens=last, context_lens=lengths, blocks=blocks)
        wall_ms = (trio.current_time() - began) * 1e3
        worker.timings.append((plan.kind.value, answer["issue_ms"], answer["device_ms"], wall_ms))
        return {e.request_id: t for e, t in zip(entries, answer["tokens"], strict=True) if e.samples}

    def _route(self, outcome: Outcome) -> None:
        finished = {e.request_id: e for e in outcome.events if isinstance(e, Finished)}
        for event in outcome.events:
            request = self.requests.get(event.request_id)
            if request is None or isinstance(event, Finished):
                continue
            request.tokens.append(event.token)
            done = finished.get(event.request_id)
            if done is None or done.reason is FinishReason.HANDOVER:
                request.stream.send_nowait(Output(event.token))
            else:
                request.stream.send_nowait(Output(event.token, done.reason.value))
                del self.requests[request.id]
        for request_id, why in outcome.lost:
            self._lose(request_id, why)
        for core in outcome.wake:
            self.workers[core].poke()

    def _fail(self, worker: Worker, why: str) -> None:
        """A worker died: every request it holds ends with why; the other worker goes on (and serves what it can
        alone); the front end is told."""
        if worker.core.dead:
            return
        for request_id in self.core.fail(worker.core, why):
            self._lose(request_id, why)
        self.on_failure(why)
        for other in self.workers.values():
            other.poke()  # a prefill worker held back for a dead decode worker's room goes on (to lose them)

    def _lose(self, request_id: str, why: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            request.stream.send_nowait(EngineError(why))


# -- starting a deployment -----------------------------------------------------------------------------------


def topology(kind: str, spec: ServeSpec) -> str:
    """The daemon's (or direct mode's) config: 910B2s, numeric or timing mode, roles for the phases."""
    if kind not in DEPLOYMENTS:
        raise ValueError(f"unknown deployment {kind!r} (have {', '.join(DEPLOYMENTS)})")
    mode = "timing" if spec.timing else "numeric"
    chips = 2 if kind == "disaggregated" else 1
    lines = [f'[daemon]\ntime_scale = {spec.time_scale}\npolicy = "{spec.policy}"\n']
    if spec.policy_options:
        lines.append(f"[policy.{spec.policy}]\n" + "".join(f"{k} = {v!r}\n" for k, v in spec.policy_options.items()))
    lines += [f'[[physical]]\nname = "npu{i}"\nchip = "910B2"\nmode = "{mode}"\n' for i in range(chips)]
    roles = {"direct": [("any", 0)], "colocated": [("prefill", 0), ("decode", 0)]}.get(
        kind, [("prefill", 0), ("decode", 1)]
    )
    lines += [
        f'[[virtual]]\nname = "davinci{i}"\nphysical = "npu{chip}"\nrole = "{role}"\n'
        for i, (role, chip) in enumerate(roles)
    ]
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def deployment(
    kind: str,
    spec: ServeSpec,
    workdir: Path | None = None,
    mount: Path | None = None,
    on_failure: Callable[[str], None] = _ignore,
) -> AsyncIterator[Deployment]:
    """Start the workers `kind` needs and the coordinator's loops, and stop them on exit. Through a daemon (all but
    direct), `mount` is a daemon serving `topology(kind, spec)`: the caller starts it (tools/launch.py's
    `deployment` does both)."""
    config_text = topology(kind, spec)
    if (mount is None) != (kind == "direct"):
        raise ValueError(f"deployment {kind!r}: a daemon's mount is needed by all but direct, got {mount}")
    with contextlib.ExitStack() as stack:
        if kind == "direct":  # the topology for the worker's own in-process NPU
            work = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="flexnpu-serve-")))
            config = work / f"{kind}.toml"
            config.write_text(config_text)
            envs = [shim_env(["davinci0"], direct=True, config=str(config))]
        else:
            envs = [shim_env([str(mount / f"davinci{i}")], mount, phase=p) for i, p in enumerate(PHASES)]
        processes = [await WorkerProcess.start(name, env) for name, env in zip(_names(kind), envs, strict=False)]
        try:
            engine = await _load(kind, spec, processes, on_failure)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.run)
                yield engine
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for process in reversed(processes):  # an importer of IPC memory lets go before its exporter frees it
                    await process.aclose()


PHASES = ("prefill", "decode")


def _names(kind: str) -> list[str]:
    return ["model"] if kind == "direct" else list(PHASES)


async def _load(
    kind: str, spec: ServeSpec, processes: list[WorkerProcess], on_failure: Callable[[str], None]
) -> Deployment:
    load = {"model": spec.model, "num_blocks": spec.num_blocks, "block_size": spec.block_size, "seed": spec.seed}
    load |= {"weights": not spec.timing, "max_num_seqs": spec.max_num_seqs, "max_model_len": spec.max_model_len}
    if kind == "direct":
        await processes[0].call("init", **load, kv=None)
        model = Worker(Instance("model", Batcher(spec.batching(Role.COLOCATED))), processes[0])
        return Deployment(spec, [model], copy_kv=False, on_failure=on_failure)
    prefill, decode = processes
    await prefill.call("init", **load, kv=None)
    decode_pid = (await decode.call("pid"))["pid"]
    keys = (await prefill.call("export", pids=[decode_pid]))["keys"]
    if kind == "colocated":  # one cache: the decode worker uses the prefill worker's pools, and so its blocks
        await decode.call("init", **load, kv=keys)
        pool = BlockPool(spec.num_blocks)
    else:  # a cache on each chip; the decode worker pulls blocks from the prefill's across the interconnect
        await decode.call("init", **load, kv=None)
        await decode.call("attach_peer", keys=keys)
        pool = None
    workers = [
        Worker(Instance("prefill", Batcher(spec.batching(Role.PREFILL), pool)), prefill),
        Worker(Instance("decode", Batcher(spec.batching(Role.DECODE), pool)), decode),
    ]
    return Deployment(spec, workers, copy_kv=kind == "disaggregated", on_failure=on_failure)
