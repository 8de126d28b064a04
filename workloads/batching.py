"""The serving engine's batching core: requests in, one step plan out, sampled tokens back in. Sans-IO.

No I/O, threads or clocks: every call that depends on time takes `now`, so the serving processes and the
virtual-time simulator drive the same object. One step is in flight at a time: `schedule()` returns a plan,
the driver runs it, `finish_step()` records its tokens; the blocks of a request aborted meanwhile go back to the
pool only when the step ends (`finish_step()`, or `cancel_step()` when it never will), so a running step never
writes into a block handed to someone else — not even by another batcher sharing the pool.

Policy (vLLM v0's default, with v1's chunked prefill):
- KV cache: a pool of `num_blocks` blocks of `block_size` tokens. A request is admitted (FCFS, head of line
  only, so a long prompt is never starved by short ones) when fewer than `max_num_seqs` run and the pool has
  blocks for its whole prompt; a decode that crosses a block boundary gets one more block.
- Steps are either all prefill or all decode, never mixed: the two are different graphs (decode is captured
  per batch-size bucket, prefill is shaped by its tokens) and, disaggregated, run in different processes.
  Prefill goes first whenever it can make progress; otherwise every running request decodes (oldest first,
  at most `max_num_seqs`, padded up to a capture bucket).
- Chunked prefill: a prefill step carries at most `max_num_batched_tokens` prompt tokens; a prompt longer
  than what is left is split, and its remaining chunks go first in the next prefill step. Only the last chunk
  samples a token (the first token).
- Preemption by recompute: when a decode needs a block and none is free, the newest running request loses its
  blocks and goes back to the head of the queue; re-admitted, it prefills its prompt plus the tokens it had
  generated, and that prefill samples its next token.
- Refusal at `add`: a request whose prompt plus max_tokens exceeds the model's context or the whole pool can
  never run, and raises `NeverFits` naming the numbers.
- Roles: COLOCATED runs whole requests. PREFILL ends each request after its first token with a HANDOVER
  finish and keeps its blocks until `release()` (after the KV content was copied out). DECODE takes requests
  only through `add_prefilled()`, which allocates blocks for the already-computed context and returns them as
  the copy's destination; it still prefills locally to recompute after a preemption.

Token ids stay with the executor (it has the prompt and feeds back what it sampled); this core counts tokens,
and looks at a sampled id only to compare it with the EOS id.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from npu.errors import InvalidParam, NotSupported, OutOfMemory


class NeverFits(InvalidParam):
    """A request that can never run on this instance, whatever else finishes; the message names the numbers."""


class Role(Enum):
    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"


class StepKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    IDLE = "idle"


class FinishReason(Enum):
    STOP = "stop"  # sampled the EOS token
    LENGTH = "length"  # reached max_tokens
    HANDOVER = "handover"  # prefill role: first token sampled, KV blocks await copying to a decode instance


def power_of_two_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the first power of two that holds `max_num_seqs`."""
    return tuple(1 << i for i in range(max(max_num_seqs - 1, 0).bit_length() + 1))


def decode_bucket(batch_size: int, buckets: tuple[int, ...]) -> int:
    """The smallest captured batch size that holds `batch_size` decodes."""
    for bucket in buckets:
        if bucket >= batch_size:
            return bucket
    raise InvalidParam(f"decode batch of {batch_size} is larger than the largest capture bucket {buckets[-1]}")


@dataclass(frozen=True)
class BatchingConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int  # requests running at once, hence the largest decode batch
    max_num_batched_tokens: int  # prompt tokens in one prefill step
    max_model_len: int  # context: prompt plus generated tokens
    eos_token_id: int | None = None
    role: Role = Role.COLOCATED
    decode_buckets: tuple[int, ...] = ()  # empty: power_of_two_buckets(max_num_seqs)
    chunked_prefill: bool = True  # False: a prompt is prefilled whole, in one step (for executors without chunks)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise InvalidParam(f"batching config: {name} must be at least 1, got {getattr(self, name)}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidParam(
                f"batching config: without chunked prefill a whole context ({self.max_model_len} tokens) must fit "
                f"one step; max_num_batched_tokens is {self.max_num_batched_tokens}"
            )
        if not self.decode_buckets:
            object.__setattr__(self, "decode_buckets", power_of_two_buckets(self.max_num_seqs))
        buckets = self.decode_buckets
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] < self.max_num_seqs:
            raise InvalidParam(
                f"batching config: decode_buckets {buckets} must be increasing, positive and reach "
                f"max_num_seqs={self.max_num_seqs}"
            )


@dataclass(frozen=True)
class Scheduled:
    """One request's part of a step: compute tokens [start, start + num_tokens) into `blocks`."""

    request_id: str
    start: int  # tokens already in its KV cache
    num_tokens: int  # prefill: the chunk; decode: 1 (the last sampled token)
    blocks: tuple[int, ...]  # its block table; slot t lives in blocks[t // block_size]
    samples: bool  # whether this step samples a token for it (every decode, a prefill's last chunk)


@dataclass(frozen=True)
class StepPlan:
    kind: StepKind
    time: float
    entries: tuple[Scheduled, ...] = ()
    bucket: int | None = None  # decode: the capture bucket to replay
    preempted: tuple[str, ...] = ()  # requests sent back to the queue while planning this step

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def padding(self) -> int:
        """Padded decode slots in the replayed graph."""
        return 0 if self.bucket is None else self.bucket - len(self.entries)


@dataclass(frozen=True)
class FirstToken:
    request_id: str
    token: int
    time: float


@dataclass(frozen=True)
class Token:
    request_id: str
    token: int
    time: float


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: FinishReason
    time: float
    arrival: float  # when add() or add_prefilled() took it
    first_token_time: float
    output_tokens: int
    handover_blocks: tuple[int, ...] = ()  # HANDOVER: copy these, then release()


Event = FirstToken | Token | Finished


@dataclass(frozen=True)
class Stats:
    running: int
    waiting: int
    handing_over: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int  # since start


class BlockPool:
    """Fixed-size KV blocks by id. Refuses to hand out a block twice or to take back one it did not lend."""

    def __init__(self, num_blocks: int) -> None:
        self.total = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfMemory(f"KV cache: need {n} blocks, {len(self._free)} of {self.total} free")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if block not in self._used:
                raise InvalidParam(f"KV block {block} freed but not allocated")
            self._used.remove(block)
            self._free.append(block)


@dataclass(eq=False)
class _Request:
    id: str
    prompt: int
    max_tokens: int
    ignore_eos: bool
    arrival: float
    prefill_target: int  # tokens a prefill computes: the prompt, plus what it had generated when preempted
    output: int = 0  # tokens sampled so far
    computed: int = 0  # tokens whose KV is in `blocks`
    blocks: list[int] = field(default_factory=list)
    first_token_time: float | None = None

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prefill_target


class Batcher:
    def __init__(self, config: BatchingConfig, pool: BlockPool | None = None) -> None:
        """`pool`: KV blocks shared with another instance on the same memory (a co-located prefill and decode
        instance pass requests over by block ownership, no copy); by default a pool of its own."""
        self.config = config
        self.pool = pool if pool is not None else BlockPool(config.num_blocks)
        self._requests: dict[str, _Request] = {}  # live: waiting, running or handing over
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # admission order: the last is the newest
        self._in_flight: StepPlan | None = None
        self._in_flight_requests: dict[str, _Request] = {}
        self._held: list[int] = []  # blocks of requests aborted during the step in flight: freed when it ends
        self._now = -math.inf
        self._preemptions = 0

    # -- requests in -------------------------------------------------------------------------------------

    def add(self, request_id: str, prompt_tokens: int, max_tokens: int, now: float, ignore_eos: bool = False) -> None:
        if self.config.role is Role.DECODE:
            raise NotSupported(
                f"request {request_id}: this is a decode-only instance; prefill it on a prefill instance, "
                "then hand it over with add_prefilled()"
            )
        self._check_new(request_id, prompt_tokens, max_tokens, now)
        request = _Request(request_id, prompt_tokens, max_tokens, ignore_eos, now, prefill_target=prompt_tokens)
        self._requests[request_id] = request
        self._waiting.append(request)

    def add_prefilled(
        self,
        request_id: str,
        context_tokens: int,
        first_token: int,
        max_tokens: int,
        now: float,
        ignore_eos: bool = False,
        blocks: tuple[int, ...] | None = None,
    ) -> tuple[int, ...]:
        """Take a request whose context is computed elsewhere; return the blocks its KV must be copied into.
        With `blocks` (a pool shared with the prefill instance), it takes over those blocks: nothing to copy.

        Raises OutOfMemory when the blocks are not free now (retry later or elsewhere): the copy needs them at once.
        """
        if self.config.role is Role.PREFILL:
            raise NotSupported(f"request {request_id}: this is a prefill-only instance; it takes prompts with add()")
        if max_tokens < 2 or (not ignore_eos and first_token == self.config.eos_token_id):
            raise InvalidParam(
                f"request {request_id}: already finished with its first token (max_tokens={max_tokens}, "
                f"first token {first_token}); nothing is left to decode"
            )
        self._check_new(request_id, context_tokens, max_tokens, now)
        request = _Request(
            request_id,
            context_tokens,
            max_tokens,
            ignore_eos,
            now,
            context_tokens,
            1,
            context_tokens,
            first_token_time=now,
        )
        if blocks is not None and len(blocks) != self._blocks_for(context_tokens):
            raise InvalidParam(f"request {request_id}: {len(blocks)} blocks for a {context_tokens}-token context")
        request.blocks = list(blocks) if blocks is not None else self.pool.allocate(self._blocks_for(context_tokens))
        self._requests[request_id] = request
        self._running.append(request)
        return tuple(request.blocks)

    def abort(self, request_id: str) -> bool:
        """Forget a request wherever it is and free its blocks. False if it was unknown or already finished."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request in self._waiting:
            self._waiting.remove(request)
        if request in self._running:
            self._running.remove(request)
        if self._in_flight_requests.get(request_id) is request:
            self._held += request.blocks  # the step in flight may still write them
        else:
            self.pool.free(request.blocks)
        request.blocks = []
        return True

    def cancel_step(self) -> None:
        """The step in flight will never finish (its engine died): forget it, and free what it held back."""
        self._in_flight, self._in_flight_requests = None, {}
        self.pool.free(self._held)
        self._held = []

    def release(self, request_id: str, handed_over: bool = False) -> None:
        """Prefill role: the KV of a handed-over request has been copied out; free its blocks. `handed_over`: the
        decode instance took the blocks themselves (a shared pool), so they stay allocated, now its."""
        request = self._requests.get(request_id)
        if request is None or request in self._running or request in self._waiting:
            raise InvalidParam(f"request {request_id}: not waiting for its KV handover; nothing to release")
        if handed_over:
            request.blocks = []
        self.abort(request_id)

    # -- a step out --------------------------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan:
        if self._in_flight is not None:
            raise InvalidParam("schedule(): the previous step is still in flight; call finish_step() first")
        self._tick(now)
        entries = self._plan_prefill()
        if entries:
            plan = StepPlan(StepKind.PREFILL, now, entries)
        else:
            entries, preempted = self._plan_decode()
            if not entries:
                return StepPlan(StepKind.IDLE, now, preempted=preempted)
            bucket = decode_bucket(len(entries), self.config.decode_buckets)
            plan = StepPlan(StepKind.DECODE, now, entries, bucket, preempted)
        self._in_flight = plan
        self._in_flight_requests = {e.request_id: self._requests[e.request_id] for e in entries}
        return plan

    def _plan_prefill(self) -> tuple[Scheduled, ...]:
        budget = self.config.max_num_batched_tokens
        chosen: list[_Request] = [r for r in self._running if r.computed < r.prefill_target]
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            head = self._waiting[0]
            need = self._blocks_for(head.prefill_target)
            planned = sum(r.prefill_target - r.computed for r in chosen)
            whole = 0 if self.config.chunked_prefill else head.prefill_target
            if need > self.pool.num_free or budget <= planned or planned + whole > budget:
                break
            head.blocks = self.pool.allocate(need)
            self._running.append(self._waiting.popleft())
            chosen.append(head)
        entries = []
        for request in chosen:
            if budget == 0:
                break
            chunk = min(request.prefill_target - request.computed, budget)
            budget -= chunk
            last = request.computed + chunk == request.prefill_target
            entries.append(Scheduled(request.id, request.computed, chunk, tuple(request.blocks), last))
        return tuple(entries)

    def _plan_decode(self) -> tuple[tuple[Scheduled, ...], tuple[str, ...]]:
        batch: list[_Request] = []
        preempted: list[str] = []
        gone: set[str] = set()  # preempted in this loop: the only way out of _running here (a set: O(1) per request)
        for request in list(self._running):
            if len(batch) == self.config.max_num_seqs:
                break
            if request.id in gone or not request.decoding:
                continue
            while len(request.blocks) < self._blocks_for(request.computed + 1) and request.id not in gone:
                if self.pool.num_free:
                    request.blocks += self.pool.allocate(1)
                else:
                    preempted.append(self._preempt_newest())
                    gone.add(preempted[-1])
            if request.id not in gone:
                batch.append(request)
        entries = tuple(Scheduled(r.id, r.computed, 1, tuple(r.blocks), True) for r in batch)
        return entries, tuple(preempted)

    def _preempt_newest(self) -> str:
        victim = self._running.pop()
        self.pool.free(victim.blocks)
        victim.blocks = []
        victim.computed = 0
        victim.prefill_target = victim.prompt + victim.output
        self._waiting.appendleft(victim)
        self._preemptions += 1
        return victim.id

    # -- results in --------------------------------------------------------------------------------------

    def finish_step(self, plan: StepPlan, sampled_tokens: dict[str, int], now: float) -> list[Event]:
        """Record the step's tokens (one per entry that samples and is still live) and return what happened."""
        if plan.kind is StepKind.IDLE:
            self._tick(now)
            return []
        if plan is not self._in_flight:
            raise InvalidParam("finish_step(): this plan is not the step in flight")
        live = {rid: r for rid, r in self._in_flight_requests.items() if self._requests.get(rid) is r}
        expected = {e.request_id for e in plan.entries if e.samples}
        extra = sorted(sampled_tokens.keys() - expected)
        missing = sorted((expected & live.keys()) - sampled_tokens.keys())
        if extra or missing:
            raise InvalidParam(f"finish_step(): tokens for requests not sampled this step {extra}, none for {missing}")
        self._tick(now)
        self._in_flight = None
        self._in_flight_requests = {}
        self.pool.free(self._held)
        self._held = []
        events: list[Event] = []
        for entry in plan.entries:
            request = live.get(entry.request_id)
            if request is None:  # aborted while the step ran
                continue
            request.computed += entry.num_tokens
            if entry.samples:
                events += self._record(request, sampled_tokens[entry.request_id], now)
        return events

    def _record(self, request: _Request, token: int, now: float) -> list[Event]:
        request.output += 1
        events: list[Event]
        if request.first_token_time is None:
            request.first_token_time = now
            events = [FirstToken(request.id, token, now)]
        else:
            events = [Token(request.id, token, now)]
        if not request.ignore_eos and token == self.config.eos_token_id:
            reason = FinishReason.STOP
        elif request.output >= request.max_tokens:
            reason = FinishReason.LENGTH
        elif self.config.role is Role.PREFILL:
            reason = FinishReason.HANDOVER
        else:
            return events
        self._running.remove(request)
        handover: tuple[int, ...] = ()
        if reason is FinishReason.HANDOVER:
            handover = tuple(request.blocks)  # kept, and the request stays known, until release()
        else:
            del self._requests[request.id]
            self.pool.free(request.blocks)
            request.blocks = []
        first = request.first_token_time
        events.append(Finished(request.id, reason, now, request.arrival, first, request.output, handover))
        return events

    def check_fits(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        """Raise NeverFits if the request could never run here, whatever else finishes (a coordinator asks the
        decode instance before its prefill instance takes a request)."""
        cfg = self.config
        if prompt_tokens + max_tokens > cfg.max_model_len:
            raise NeverFits(
                f"request {request_id}: {prompt_tokens} prompt + {max_tokens} max tokens exceed the model's "
                f"context of {cfg.max_model_len} tokens; shorten the prompt or lower max_tokens"
            )
        kv_tokens = prompt_tokens if cfg.role is Role.PREFILL else prompt_tokens + max_tokens
        if self._blocks_for(kv_tokens) > cfg.num_blocks:
            raise NeverFits(
                f"request {request_id}: {kv_tokens} tokens need {self._blocks_for(kv_tokens)} KV blocks of "
                f"{cfg.block_size}, the cache has {cfg.num_blocks} in all; shorten the prompt or lower max_tokens"
            )

    # -- observability -----------------------------------------------------------------------------------

    def stats(self) -> Stats:
        running, waiting = len(self._running), len(self._waiting)
        return Stats(
            running=running,
            waiting=waiting,
            handing_over=len(self._requests) - running - waiting,
            kv_blocks_used=self.pool.num_used,
            kv_blocks_total=self.pool.total,
            preemptions=self._preemptions,
        )

    # -- helpers -----------------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _tick(self, now: float) -> None:
        if now < self._now:
            raise InvalidParam(f"time went backwards: {now} after {self._now}")
        self._now = now

    def _check_new(self, request_id: str, prompt_tokens: int, max_tokens: int, now: float) -> None:
        if request_id in self._requests:
            raise InvalidParam(f"request {request_id}: already added and not finished")
        if prompt_tokens < 1 or max_tokens < 1:
            raise InvalidParam(
                f"request {request_id}: prompt_tokens ({prompt_tokens}) and max_tokens ({max_tokens}) must be >= 1"
            )
        self.check_fits(request_id, prompt_tokens, max_tokens)
        self._tick(now)
