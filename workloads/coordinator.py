"""The coordinator above a deployment's serving engines: routing, back-pressure, and the hand-over of requests from
prefill to decode engines. Sans-IO: requests and the engines' step results in, decisions out, time passed in.
workloads/deploy.py drives it with trio over worker processes, sim/serving.py with its event heap over modeled
chips, so the served and the simulated deployment coordinate alike.

- Engines (`Instance`: a name and a batching core): `entries` take new requests (a direct deployment's engines run
  both phases; otherwise they are prefill engines); `decoders` finish what prefill engines hand over.
- Routing: a new request goes to the live entry engine with the fewest unfinished requests. A handed-over one goes
  to the decode engine sharing its prefill engine's KV block pool (co-located: the blocks change owner, nothing is
  copied), or else to the live decode engine with the fewest (disaggregated: its blocks are pulled across).
- Back-pressure: a prefill engine plans a step only while the decode engine it would hand over to holds fewer than
  max_num_seqs requests, so prompts wait before their prefill (TTFT) rather than after it for a slot (TPOT).
- Hand-over: a prefill engine's request ends with a HANDOVER finish after its first token and waits in the decode
  engine's inbox until that engine plans its next step, which takes it in (the prefill engine's blocks, or new
  ones to pull into: a `Pull` for the driver to copy before running the step; `pulled()` then frees the source).
  A request whose blocks are not free yet waits for a later step.
- An engine that dies loses the requests it holds (`fail`); the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from npu.errors import OutOfMemory
from workloads.batching import Batcher, Event, Finished, FinishReason, FirstToken, Role, StepKind, StepPlan
from workloads.serving import EngineError


@dataclass(eq=False)
class Instance:
    """One serving engine as the coordinator sees it: its batching core and the requests it owes."""

    name: str
    batcher: Batcher
    inbox: list[Handover] = field(default_factory=list)  # decode: handed-over requests to take in
    outstanding: int = 0  # unfinished requests routed here, the inbox's included (the router's measure)
    dead: str | None = None  # why it can no longer serve

    @property
    def role(self) -> Role:
        return self.batcher.config.role


@dataclass(frozen=True)
class Handover:
    request_id: str
    context: int  # tokens whose KV the prefill engine computed
    first_token: int
    prefill: Instance
    blocks: tuple[int, ...]  # in the prefill engine's pool


@dataclass(frozen=True)
class Pull:
    """KV blocks to copy from a prefill engine's pool (`src`) into a decode engine's (`dst`), before its step."""

    request_id: str
    prefill: Instance
    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """An engine's next step: copy the pulls in, then run the plan."""

    plan: StepPlan
    pulls: tuple[Pull, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What a finished step did: the batching core's events (tokens, finishes, hand-overs included), the engines
    that may have work now, and the requests lost with why (handed to a decode engine that died)."""

    events: list[Event]
    wake: list[Instance]
    lost: list[tuple[str, str]] = field(default_factory=list)


@dataclass(eq=False)
class _Request:
    prompt: int
    max_tokens: int
    ignore_eos: bool
    at: Instance  # the engine that owes it now


class Coordinator:
    def __init__(self, entries: list[Instance], decoders: list[Instance] = (), copy_kv: bool = False) -> None:
        """`copy_kv`: handed-over blocks are pulled into the decode engine's own pool (disaggregated); otherwise
        each prefill engine shares its pool with one decode engine, which takes the blocks over."""
        self.entries, self.decoders, self.copy_kv = list(entries), list(decoders), copy_kv
        self._partner = {}
        if decoders and not copy_kv:
            self._partner = {e: next(d for d in decoders if d.batcher.pool is e.batcher.pool) for e in entries}
        self.requests: dict[str, _Request] = {}

    @property
    def instances(self) -> list[Instance]:
        return self.entries + self.decoders

    # -- requests in --------------------------------------------------------------------------------------------

    def admit(self, request_id: str, prompt: int, max_tokens: int, now: float, ignore_eos: bool = False) -> Instance:
        """Route a new request to an entry engine and return it (to wake). Raises NeverFits for a request that can
        never run here (its decode engine is asked too), EngineError when no engine can take it."""
        live = [e for e in self.entries if not e.dead]
        if not live:
            raise EngineError(self.entries[0].dead)
        entry = min(live, key=lambda e: e.outstanding)
        if entry.role is Role.PREFILL:
            decode = self._decoder(entry)
            decode.batcher.check_fits(request_id, prompt, max_tokens)
            if decode.dead and max_tokens > 1:  # a one-token request ends on the prefill engine
                raise EngineError(decode.dead)
        entry.batcher.add(request_id, prompt, max_tokens, now, ignore_eos)
        entry.outstanding += 1
        self.requests[request_id] = _Request(prompt, max_tokens, ignore_eos, entry)
        return entry

    def abort(self, request_id: str) -> list[Instance]:
        """Forget a request wherever it is (its client went away, or its engine died) and free its blocks; the
        engines that may have room now are returned, to wake."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        request.at.outstanding -= 1
        for instance in self.instances:
            instance.batcher.abort(request_id)
            instance.inbox[:] = [h for h in instance.inbox if h.request_id != request_id]
        return self.instances

    def fail(self, instance: Instance, why: str) -> list[str]:
        """`instance` died: the requests it owed are lost (returned); the other engines go on."""
        instance.dead = why
        lost = [rid for rid, request in self.requests.items() if request.at is instance]
        for rid in lost:
            self.abort(rid)
        instance.batcher.cancel_step()
        return lost

    # -- steps --------------------------------------------------------------------------------------------------

    def has_room(self, instance: Instance) -> bool:
        """Back-pressure: may this engine plan a step now?"""
        if instance.role is not Role.PREFILL:
            return True
        decode = self._decoder(instance)
        return decode.dead is not None or decode.outstanding < decode.batcher.config.max_num_seqs

    def next_step(self, instance: Instance, now: float) -> Step | None:
        """The engine's next step, or None: nothing to do, or held back (it is woken when that changes)."""
        if instance.dead or not self.has_room(instance):
            return None
        pulls = self._take_handovers(instance, now)
        plan = instance.batcher.schedule(now)
        if plan.kind is StepKind.IDLE:  # a request taken over would have made a decode step
            return None
        return Step(plan, tuple(pulls))

    def pulled(self, pulls: tuple[Pull, ...]) -> list[Instance]:
        """The driver copied these blocks: the prefill engines' copies are free again (they may take prompts that
        waited for blocks: returned, to wake)."""
        for pull in pulls:
            if pull.request_id in self.requests:  # else aborted meanwhile, blocks and all
                pull.prefill.batcher.release(pull.request_id)
        return list({pull.prefill: None for pull in pulls})

    def finish_step(self, instance: Instance, plan: StepPlan, sampled: dict[str, int], now: float) -> Outcome:
        """Record a step's sampled tokens; finished requests leave, handed-over ones go to a decode engine."""
        events = instance.batcher.finish_step(plan, sampled, now)
        first = {e.request_id: e.token for e in events if isinstance(e, FirstToken)}
        wake: list[Instance] = []
        lost: list[tuple[str, str]] = []
        for event in events:
            if not isinstance(event, Finished):
                continue
            rid, request = event.request_id, self.requests[event.request_id]
            if event.reason is not FinishReason.HANDOVER:
                instance.outstanding -= 1
                del self.requests[rid]
                if instance.role is Role.DECODE:  # room for another prompt
                    wake += self.entries
                continue
            decode = self._decoder(instance)
            if decode.dead:
                self.abort(rid)
                lost.append((rid, decode.dead))
                continue
            instance.outstanding -= 1
            decode.inbox.append(Handover(rid, request.prompt, first[rid], instance, event.handover_blocks))
            decode.outstanding += 1
            request.at = decode
            wake.append(decode)
        return Outcome(events, wake, lost)

    # -- internals ----------------------------------------------------------------------------------------------

    def _decoder(self, prefill: Instance) -> Instance:
        """Where a prefill engine hands over: the decode engine on its pool, or the least loaded live one."""
        if not self.copy_kv:
            return self._partner[prefill]
        live = [d for d in self.decoders if not d.dead] or self.decoders
        return min(live, key=lambda d: d.outstanding)

    def _take_handovers(self, decode: Instance, now: float) -> list[Pull]:
        pulls, waiting = [], []
        for handover in decode.inbox:
            rid, request = handover.request_id, self.requests[handover.request_id]
            own = None if self.copy_kv else handover.blocks
            try:
                blocks = decode.batcher.add_prefilled(
                    rid, handover.context, handover.first_token, request.max_tokens, now, request.ignore_eos, own
                )
            except OutOfMemory:
                waiting.append(handover)
                continue
            if self.copy_kv:
                pulls.append(Pull(rid, handover.prefill, handover.blocks, blocks))
            else:
                handover.prefill.batcher.release(rid, handed_over=True)
        decode.inbox[:] = waiting
        return pulls
