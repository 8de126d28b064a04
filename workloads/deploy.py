"""Deployments of a model behind the front end's `Engine` (workloads/serving.py): which worker processes run on
which virtual NPUs, and how a request's KV cache passes from its prefill to its decode.

- direct: one worker, both phases, in direct mode (no daemon): the passthrough baseline.
- colocated: a prefill worker and a decode worker on two virtual NPUs of one physical NPU, through the daemon.
  The decode worker imports the prefill worker's KV pools (pyACL IPC memory): one cache, one block pool shared
  by the two batchers, and a handover passes block ownership — no copy.
- disaggregated: prefill and decode workers on two physical NPUs. The decode worker imports the prefill worker's
  pools with peer access and pulls each handed-over request's blocks into its own pool, device to device across
  the chips' interconnect.

The coordinator runs in the front end's trio loop: each worker has a Batcher (workloads/batching.py) and a loop
that plans a step, has the worker run it and routes the sampled tokens to the requests' streams. A decode loop
takes handed-over requests between its steps, so a request's KV is in place before its first decode.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from npu.errors import InvalidParam, OutOfMemory
from tools import launch
from workloads.batching import (
    Batcher,
    BatchingConfig,
    BlockPool,
    Finished,
    FinishReason,
    NeverFits,
    Role,
    StepKind,
    StepPlan,
)
from workloads.model import ModelConfig, model_config, parameter_count
from workloads.serving import EngineError, EngineStats, Output, RequestRejected
from workloads.workerproc import WorkerProcess

DEPLOYMENTS = ("direct", "colocated", "disaggregated")
GiB = 1 << 30


@dataclass(frozen=True)
class ServeSpec:
    """What to serve and how big its KV cache and batches are."""

    model: str = "tiny"
    num_blocks: int = 256
    block_size: int = 16
    max_num_seqs: int = 16
    max_model_len: int = 256
    seed: int = 0
    timing: bool = False  # shapes only (a 7B model's weights cost no host memory); tokens are then meaningless
    time_scale: float = 1.0  # wall seconds per modeled second of the emulated NPUs
    policy: str = "fifo"  # the chips' scheduling policy (scheduler/policies.py) and its options
    policy_options: dict = field(default_factory=dict, hash=False)

    @classmethod
    def for_model(cls, model: str | ModelConfig, **changes) -> ServeSpec:
        """Sizes that fit the model on a 910B2 virtual NPU (32 GiB, two per chip): the tiny model computes real
        tokens; a 7B-class model runs in timing mode, its KV cache what its weights leave of the quota."""
        config = model if isinstance(model, ModelConfig) else model_config(model)
        model = config.name
        if config.name == "tiny":
            return replace(cls(model=model, max_model_len=config.max_position_embeddings), **changes)
        block_size = 128
        block_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * block_size
        kv_bytes = 32 * GiB * 0.9 - parameter_count(config) * 2  # bf16 weights; a tenth for activations
        defaults = cls(
            model=model,
            num_blocks=int(kv_bytes // block_bytes),
            block_size=block_size,
            max_num_seqs=64,
            max_model_len=min(8192, config.max_position_embeddings),
            timing=True,
        )
        return replace(defaults, **changes)

    def batching(self, role: Role) -> BatchingConfig:
        """The batching core's configuration of an engine in `role` (the live workers and the simulator alike)."""
        return BatchingConfig(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_model_len,
            max_model_len=self.max_model_len,
            role=role,
            chunked_prefill=False,  # the worker prefills whole prompts
        )


@dataclass(eq=False)
class _Request:
    id: str
    tokens: list[int]  # prompt, then every sampled token
    max_tokens: int
    ignore_eos: bool
    stream: trio.MemorySendChannel


@dataclass(eq=False)
class _Handover:
    request: _Request
    context: int
    blocks: tuple[int, ...]


@dataclass(eq=False)
class Instance:
    """One worker and the batcher that plans its steps."""

    name: str
    worker: WorkerProcess
    batcher: Batcher
    wake: trio.Event = field(default_factory=trio.Event)
    inbox: list[_Handover] = field(default_factory=list)  # decode: handed-over requests to take
    dead: str | None = None  # why the worker can no longer serve
    # recent steps: (kind, ms of host work issuing it, modeled ms on the device, wall ms of the worker call)
    timings: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def poke(self) -> None:
        self.wake.set()

    async def idle(self) -> None:
        await self.wake.wait()
        self.wake = trio.Event()


class Deployment:
    """An Engine over one or two instances. `entry` takes new requests; `decode`, if another, finishes them."""

    def __init__(self, spec: ServeSpec, entry: Instance, decode: Instance | None, copy_kv: bool) -> None:
        config = model_config(spec.model)
        self.model, self.max_model_len, self.vocab_size = config.name, spec.max_model_len, config.vocab_size
        self.entry, self.decode = entry, decode
        self.copy_kv = copy_kv  # disaggregated: handed-over blocks are pulled into the decode worker's own pool
        self.requests: dict[str, _Request] = {}

    @property
    def instances(self) -> list[Instance]:
        return [self.entry] + ([self.decode] if self.decode else [])

    # -- Engine ----------------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: list[int], max_tokens: int, ignore_eos: bool):
        if self.entry.dead:
            raise EngineError(self.entry.dead)
        send, receive = trio.open_memory_channel(math.inf)
        try:
            if self.decode is not None:  # the decode instance must be able to finish it
                self.decode.batcher.check_fits(request_id, len(prompt), max_tokens)
            self.entry.batcher.add(request_id, len(prompt), max_tokens, trio.current_time(), ignore_eos)
        except NeverFits as exc:
            raise RequestRejected(exc.message) from None
        self.requests[request_id] = _Request(request_id, list(prompt), max_tokens, ignore_eos, send)
        self.entry.poke()
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
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for instance in self.instances:
            instance.batcher.abort(request_id)
            instance.inbox[:] = [h for h in instance.inbox if h.request is not request]

    def stats(self) -> EngineStats:
        batchers = [i.batcher for i in self.instances]
        pools = {id(b.pool): b.pool for b in batchers}.values()  # a shared pool counts once
        return EngineStats(
            running=sum(b.stats().running for b in batchers),
            waiting=sum(b.stats().waiting for b in batchers) + sum(len(i.inbox) for i in self.instances),
            kv_blocks_used=sum(p.num_used for p in pools),
            kv_blocks_total=sum(p.total for p in pools),
        )

    # -- the loops -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for instance in self.instances:
                nursery.start_soon(self._serve, instance)

    async def _serve(self, instance: Instance) -> None:
        while not instance.dead:
            try:
                await self._take_handovers(instance)
                if instance is self.entry and not self._decode_room():
                    await instance.idle()  # poked when the decode instance finishes a request
                    continue
                plan = instance.batcher.schedule(trio.current_time())
                if plan.kind is StepKind.IDLE:
                    await instance.idle()
                    continue
                sampled = await self._step(instance, plan)
            except EngineError as exc:
                self._fail(instance, str(exc))
                return
            self._route(instance, instance.batcher.finish_step(plan, sampled, trio.current_time()))

    async def _step(self, instance: Instance, plan: StepPlan) -> dict[str, int]:
        entries = [e for e in plan.entries if e.request_id in self.requests]
        if not entries:
            return {}
        blocks = [list(e.blocks) for e in entries]
        began = trio.current_time()
        if plan.kind is StepKind.PREFILL:  # whole prompts (chunked_prefill is off): the request's tokens so far
            prompts = [self.requests[e.request_id].tokens[: e.start + e.num_tokens] for e in entries]
            answer = await instance.worker.call("prefill", prompts=prompts, blocks=blocks)
        else:
            last = [self.requests[e.request_id].tokens[-1] for e in entries]
            lengths = [e.start + 1 for e in entries]
            answer = await instance.worker.call("decode", tokens=last, context_lens=lengths, blocks=blocks)
        wall_ms = (trio.current_time() - began) * 1e3
        instance.timings.append((plan.kind.value, answer["issue_ms"], answer["device_ms"], wall_ms))
        return {e.request_id: t for e, t in zip(entries, answer["tokens"], strict=True) if e.samples}

    def _route(self, instance: Instance, events: list) -> None:
        finished = {e.request_id: e for e in events if isinstance(e, Finished)}
        for event in events:
            request = self.requests.get(event.request_id)
            if request is None or isinstance(event, Finished):
                continue
            request.tokens.append(event.token)
            done = finished.get(event.request_id)
            if done is not None and done.reason is FinishReason.HANDOVER:
                request.stream.send_nowait(Output(event.token))
                self._hand_over(instance, request, done)
            elif done is not None:
                request.stream.send_nowait(Output(event.token, done.reason.value))
                del self.requests[request.id]
                if instance is self.decode:
                    self.entry.poke()
            else:
                request.stream.send_nowait(Output(event.token))

    def _decode_room(self) -> bool:
        """Back-pressure: the prefill instance starts new prompts only while the decode instance has fewer than
        max_num_seqs requests, so prompts wait before their prefill (TTFT) rather than after it (TPOT)."""
        decode = self.decode
        if decode is None or decode.dead:
            return True
        return decode.batcher.stats().running + len(decode.inbox) < decode.batcher.config.max_num_seqs

    def _hand_over(self, prefill: Instance, request: _Request, done: Finished) -> None:
        decode = self.decode
        assert decode is not None
        if decode.dead:
            prefill.batcher.release(request.id)
            self._lose(request, decode.dead)
            return
        decode.inbox.append(_Handover(request, len(request.tokens) - 1, done.handover_blocks))
        decode.poke()

    async def _take_handovers(self, decode: Instance) -> None:
        """Requests prefilled elsewhere join this decode instance: their blocks change hands (a shared pool) or
        are pulled across (disaggregated); a request whose blocks are not free yet waits for a later step."""
        waiting = []
        for handover in decode.inbox:
            request = handover.request
            now = trio.current_time()
            try:
                own = None if self.copy_kv else handover.blocks
                blocks = decode.batcher.add_prefilled(
                    request.id, handover.context, request.tokens[-1], request.max_tokens, now, request.ignore_eos, own
                )
            except OutOfMemory:
                waiting.append(handover)
                continue
            if self.copy_kv:
                await decode.worker.call("pull", blocks=[list(p) for p in zip(handover.blocks, blocks, strict=True)])
            self.entry.batcher.release(request.id, handed_over=not self.copy_kv)
        decode.inbox[:] = waiting

    def _fail(self, instance: Instance, why: str) -> None:
        """A worker died: every request it holds ends with why; the other instance goes on."""
        instance.dead = why
        held = [r for r in list(self.requests.values()) if instance.batcher.abort(r.id)]
        held += [h.request for h in instance.inbox]
        instance.inbox.clear()
        for request in held:
            if instance is self.decode:
                with contextlib.suppress(InvalidParam):  # its prefill blocks, unless already handed over
                    self.entry.batcher.release(request.id)
            self._lose(request, why)

    def _lose(self, request: _Request, why: str) -> None:
        self.requests.pop(request.id, None)
        request.stream.send_nowait(EngineError(why))


# -- starting a deployment -----------------------------------------------------------------------------------


def topology(kind: str, spec: ServeSpec) -> str:
    """The daemon's (or direct mode's) config: 910B2s, numeric or timing mode, roles for the phases."""
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
async def deployment(kind: str, spec: ServeSpec, workdir: Path | None = None) -> AsyncIterator[Deployment]:
    """Start what `kind` needs — the daemon (on a private mount), the workers, the coordinator's loops — and stop
    it all on exit."""
    if kind not in DEPLOYMENTS:
        raise ValueError(f"unknown deployment {kind!r} (have {', '.join(DEPLOYMENTS)})")
    with contextlib.ExitStack() as stack:
        work = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="flexnpu-serve-")))
        config = work / f"{kind}.toml"
        config.write_text(topology(kind, spec))
        if kind == "direct":
            envs = [launch.shim_env(["davinci0"], direct=True, config=str(config))]
        else:
            mount = work / "dev"
            stack.enter_context(launch.daemon(mount, config, log=work / "daemon.log"))
            envs = [launch.shim_env([str(mount / f"davinci{i}")], mount, phase=p) for i, p in enumerate(PHASES)]
        workers = [await WorkerProcess.start(name, env) for name, env in zip(_names(kind), envs, strict=False)]
        try:
            engine = await _load(kind, spec, workers)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.run)
                yield engine
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for worker in reversed(workers):  # an importer of IPC memory lets go before its exporter frees it
                    await worker.aclose()


PHASES = ("prefill", "decode")


def _names(kind: str) -> list[str]:
    return ["model"] if kind == "direct" else list(PHASES)


async def _load(kind: str, spec: ServeSpec, workers: list[WorkerProcess]) -> Deployment:
    load = {"model": spec.model, "num_blocks": spec.num_blocks, "block_size": spec.block_size, "seed": spec.seed}
    load |= {"weights": not spec.timing, "max_num_seqs": spec.max_num_seqs, "max_model_len": spec.max_model_len}
    role = {"direct": Role.COLOCATED}.get(kind, Role.PREFILL)
    entry_config = spec.batching(role)
    if kind == "direct":
        await workers[0].call("init", **load, kv=None)
        return Deployment(spec, Instance("model", workers[0], Batcher(entry_config)), None, copy_kv=False)
    prefill, decode = workers
    await prefill.call("init", **load, kv=None)
    decode_pid = (await decode.call("pid"))["pid"]
    keys = (await prefill.call("export", pids=[decode_pid]))["keys"]
    decode_config = spec.batching(Role.DECODE)
    if kind == "colocated":  # one cache: the decode worker uses the prefill worker's pools, and so its blocks
        await decode.call("init", **load, kv=keys)
        pool = BlockPool(spec.num_blocks)
        entry, last = Batcher(entry_config, pool), Batcher(decode_config, pool)
    else:  # a cache on each chip; the decode worker pulls blocks from the prefill's across the interconnect
        await decode.call("init", **load, kv=None)
        await decode.call("attach_peer", keys=keys)
        entry, last = Batcher(entry_config), Batcher(decode_config)
    return Deployment(
        spec, Instance("prefill", prefill, entry), Instance("decode", decode, last), copy_kv=kind == "disaggregated"
    )
