"""The coordinator (workloads/coordinator.py), sans-IO: engines' batching cores under explicit times, routing,
hand-over, back-pressure, aborts and failures, then a property test over random interleavings."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workloads.batching import (
    Batcher,
    BlockPool,
    Finished,
    FinishReason,
    FirstToken,
    NeverFits,
    Role,
    Scheduled,
    StepKind,
    StepPlan,
    Token,
)
from workloads.coordinator import Coordinator, Handover, Instance, Outcome, Pull, Step
from workloads.serving import EngineError
from workloads.spec import ServeSpec

EOS = 0
TOKEN = 7  # never EOS
SHAPE = dict(num_blocks=16, block_size=4, max_num_seqs=4, max_model_len=32)


def config(role: Role, **changes):
    """An engine's batching config as the drivers build it (ServeSpec.batching), with an EOS id to test STOP."""
    return replace(ServeSpec(**{**SHAPE, **changes}).batching(role), eos_token_id=EOS)


def direct(entries: int = 2, **changes) -> Coordinator:
    return Coordinator([Instance(f"e{i}", Batcher(config(Role.COLOCATED, **changes))) for i in range(entries)])


def colocated(pairs: int = 1, decode: dict | None = None, **changes) -> Coordinator:
    """A prefill and a decode engine on one shared BlockPool per pair."""
    entries, decoders = [], []
    for i in range(pairs):
        prefill_config = config(Role.PREFILL, **changes)
        pool = BlockPool(prefill_config.num_blocks)
        entries.append(Instance(f"p{i}", Batcher(prefill_config, pool)))
        decoders.append(Instance(f"d{i}", Batcher(config(Role.DECODE, **{**changes, **(decode or {})}), pool)))
    return Coordinator(entries, decoders)


def disaggregated(decoders: int = 1, prefills: int = 1, decode: dict | None = None, **changes) -> Coordinator:
    """Prefill and decode engines with a pool each: handed-over blocks are pulled across."""
    return Coordinator(
        [Instance(f"p{i}", Batcher(config(Role.PREFILL, **changes))) for i in range(prefills)],
        [Instance(f"d{i}", Batcher(config(Role.DECODE, **{**changes, **(decode or {})}))) for i in range(decoders)],
        copy_kv=True,
    )


def sampled(c: Coordinator, plan: StepPlan, token: int = TOKEN) -> dict[str, int]:
    """A token for every entry that samples and is still live (as the live driver sends)."""
    return {e.request_id: token for e in plan.entries if e.samples and e.request_id in c.requests}


def run_step(c: Coordinator, instance: Instance, now: float, token: int = TOKEN) -> tuple[Step, Outcome]:
    """Plan, pull, run and finish one step of `instance`, as the drivers do."""
    step = c.next_step(instance, now)
    assert step is not None, f"{instance.name} has nothing to do at {now}"
    c.pulled(step.pulls)
    return step, c.finish_step(instance, step.plan, sampled(c, step.plan, token), now + 0.5)


def drain(c: Coordinator, now: float) -> tuple[list, list, float]:
    """Step every live engine until none has anything to do; returns the events, the lost and the time."""
    events, lost = [], []
    for _ in range(10_000):
        progress = False
        for instance in c.instances:
            if instance.dead:
                continue
            now += 1
            step = c.next_step(instance, now)
            if step is None:
                continue
            progress = True
            c.pulled(step.pulls)
            outcome = c.finish_step(instance, step.plan, sampled(c, step.plan), now + 0.5)
            events += outcome.events
            lost += outcome.lost
        if not progress:
            return events, lost, now
    raise AssertionError("did not drain")


def pools(c: Coordinator) -> list[BlockPool]:
    return list({id(i.batcher.pool): i.batcher.pool for i in c.instances}.values())


def assert_empty(c: Coordinator) -> None:
    assert c.requests == {}
    assert all(p.num_used == 0 for p in pools(c))
    for instance in c.instances:
        stats = instance.batcher.stats()
        busy = (instance.outstanding, len(instance.inbox), stats.running, stats.waiting, stats.handing_over)
        assert busy == (0, 0, 0, 0, 0), instance.name


def finishes(outcome: Outcome) -> dict[str, FinishReason]:
    return {e.request_id: e.reason for e in outcome.events if isinstance(e, Finished)}


# -- direct -------------------------------------------------------------------------------------------------


def test_direct_routes_to_the_least_loaded_entry_and_runs_requests_to_completion():
    c = direct(2)
    a, b = c.entries
    assert c.admit("r1", 5, 3, 0.0) is a  # a tie goes to the first
    assert c.admit("r2", 5, 3, 0.0) is b
    assert (a.outstanding, b.outstanding) == (1, 1)

    step, outcome = run_step(c, b, 1.0)
    assert step.pulls == () and step.plan.kind is StepKind.PREFILL
    assert step.plan.entries == (Scheduled("r2", 0, 5, (0, 1), True),)
    assert outcome == Outcome([FirstToken("r2", TOKEN, 1.5)], [])
    _, outcome = run_step(c, b, 2.0)
    assert outcome.events == [Token("r2", TOKEN, 2.5)]
    _, outcome = run_step(c, b, 3.0)
    assert outcome.events == [Token("r2", TOKEN, 3.5), Finished("r2", FinishReason.LENGTH, 3.5, 0.0, 1.5, 3)]
    assert outcome.wake == []  # no back-pressure in a direct deployment
    assert (a.outstanding, b.outstanding) == (1, 0) and b.batcher.pool.num_used == 0
    assert c.next_step(b, 4.0) is None

    assert c.admit("r3", 5, 1, 4.0) is b  # b is the least loaded now
    events, lost, _ = drain(c, 5.0)
    assert {e.request_id: e.reason for e in events if isinstance(e, Finished)} == {
        "r1": FinishReason.LENGTH,
        "r3": FinishReason.LENGTH,
    }
    assert lost == []
    assert_empty(c)


def test_direct_a_dead_entry_loses_its_requests_and_the_others_go_on():
    c = direct(2)
    a, b = c.entries
    c.admit("r1", 5, 3, 0.0)
    c.admit("r2", 5, 3, 0.0)
    assert c.fail(a, "worker a died") == ["r1"]
    assert a.outstanding == 0 and a.batcher.pool.num_used == 0 and c.next_step(a, 1.0) is None
    assert c.admit("r3", 5, 3, 1.0) is b  # b is busier, but a is dead
    assert c.fail(b, "worker b died") == ["r2", "r3"]
    with pytest.raises(EngineError, match="worker a died"):
        c.admit("r4", 5, 3, 2.0)
    assert_empty(c)


# -- co-located: a shared pool ------------------------------------------------------------------------------


def test_colocated_hands_over_by_block_ownership_without_a_copy():
    c = colocated()
    (prefill,), (decode,) = c.entries, c.decoders
    pool = prefill.batcher.pool
    assert decode.batcher.pool is pool
    assert c.admit("r", 6, 4, 0.0) is prefill

    step = c.next_step(prefill, 1.0)
    assert step.pulls == () and step.plan.entries == (Scheduled("r", 0, 6, (0, 1), True),)
    assert c.next_step(decode, 1.0) is None  # nothing handed over yet
    outcome = c.finish_step(prefill, step.plan, {"r": TOKEN}, 2.0)
    assert outcome.events == [
        FirstToken("r", TOKEN, 2.0),
        Finished("r", FinishReason.HANDOVER, 2.0, 0.0, 2.0, 1, handover_blocks=(0, 1)),
    ]
    assert outcome.wake == [decode] and outcome.lost == []
    assert decode.inbox == [Handover("r", 6, TOKEN, prefill, (0, 1))]
    assert (prefill.outstanding, decode.outstanding) == (0, 1)
    assert pool.num_used == 2 and prefill.batcher.stats().handing_over == 1

    step = c.next_step(decode, 3.0)  # takes it over: the prefill's blocks become the decode's
    assert step.pulls == ()
    assert step.plan.kind is StepKind.DECODE and step.plan.entries == (Scheduled("r", 6, 1, (0, 1), True),)
    assert pool.num_used == 2  # nothing copied, nothing allocated
    assert decode.inbox == [] and prefill.batcher.stats().handing_over == 0
    assert decode.batcher.stats().running == 1 and decode.outstanding == 1
    outcome = c.finish_step(decode, step.plan, {"r": TOKEN}, 3.5)
    assert outcome == Outcome([Token("r", TOKEN, 3.5)], [])

    _, outcome = run_step(c, decode, 4.0)  # token 3, slot 7: still two blocks
    assert outcome.events == [Token("r", TOKEN, 4.5)] and pool.num_used == 2
    step, outcome = run_step(c, decode, 5.0)  # token 4, slot 8: a third block
    assert step.plan.entries[0].blocks == (0, 1, 2)
    assert finishes(outcome) == {"r": FinishReason.LENGTH}
    assert [e.output_tokens for e in outcome.events if isinstance(e, Finished)] == [4]
    assert outcome.wake == [prefill]  # a decode slot is free: the prefill engine may go on
    assert c.next_step(decode, 6.0) is None
    assert_empty(c)


# -- disaggregated: pools of their own, pulled across -------------------------------------------------------


def test_disaggregated_pulls_the_blocks_and_frees_the_source_once_pulled():
    c = disaggregated()
    (prefill,), (decode,) = c.entries, c.decoders
    assert prefill.batcher.pool is not decode.batcher.pool
    c.admit("a", 4, 5, 0.0)
    run_step(c, prefill, 1.0)
    step = c.next_step(decode, 2.0)  # a: 1 block pulled into decode block 0, and block 1 for its next slot
    assert step.pulls == (Pull("a", prefill, (0,), (0,)),)
    assert step.plan.entries == (Scheduled("a", 4, 1, (0, 1), True),)
    c.pulled(step.pulls)
    c.finish_step(decode, step.plan, {"a": TOKEN}, 2.5)
    assert (prefill.batcher.pool.num_used, decode.batcher.pool.num_used) == (0, 2)

    c.admit("r", 6, 3, 3.0)
    _, outcome = run_step(c, prefill, 3.0)
    assert finishes(outcome) == {"r": FinishReason.HANDOVER} and outcome.wake == [decode]
    assert decode.inbox == [Handover("r", 6, TOKEN, prefill, (0, 1))]
    step = c.next_step(decode, 4.0)
    (pull,) = step.pulls
    assert pull == Pull("r", prefill, (0, 1), (2, 3))  # source in the prefill's pool, new blocks in the decode's
    assert [e.blocks for e in step.plan.entries] == [(0, 1), (2, 3)]
    assert decode.batcher.pool.num_used == 4
    assert prefill.batcher.pool.num_used == 2  # the source stays until the copy is done
    assert prefill.batcher.stats().handing_over == 1
    c.pulled(step.pulls)
    assert prefill.batcher.pool.num_used == 0 and prefill.batcher.stats().handing_over == 0
    c.finish_step(decode, step.plan, sampled(c, step.plan), 4.5)

    events, lost, _ = drain(c, 5.0)
    assert {e.request_id for e in events if isinstance(e, Finished)} == {"a", "r"} and lost == []
    assert_empty(c)


def test_handovers_go_to_the_decode_engine_with_the_fewest_outstanding_requests():
    c = disaggregated(decoders=2)
    (prefill,), (d0, d1) = c.entries, c.decoders
    for rid in ("r1", "r2", "r3"):
        c.admit(rid, 4, 4, 0.0)
    _, outcome = run_step(c, prefill, 1.0)
    assert [h.request_id for h in d0.inbox] == ["r1", "r3"] and [h.request_id for h in d1.inbox] == ["r2"]
    assert (d0.outstanding, d1.outstanding) == (2, 1)
    assert outcome.wake == [d0, d1, d0]

    c.admit("r4", 4, 4, 2.0)
    run_step(c, prefill, 2.0)
    assert [h.request_id for h in d1.inbox] == ["r2", "r4"] and (d0.outstanding, d1.outstanding) == (2, 2)

    step = c.next_step(d0, 3.0)
    assert [(p.request_id, p.src) for p in step.pulls] == [("r1", (0,)), ("r3", (2,))]
    c.pulled(step.pulls)
    c.finish_step(d0, step.plan, sampled(c, step.plan), 3.5)
    _, lost, _ = drain(c, 4.0)
    assert lost == []
    assert_empty(c)


@pytest.mark.parametrize("build", [colocated, disaggregated])
def test_a_decode_engine_out_of_blocks_preempts_and_recomputes_what_it_took_over(build):
    c = build(num_blocks=3)  # 12 tokens: one request of 4 + 8 fills the decode engine's cache
    (prefill,), (decode,) = c.entries, c.decoders
    c.admit("a", 4, 8, 0.0)
    c.admit("b", 4, 8, 0.0)
    _, outcome = run_step(c, prefill, 1.0)
    assert finishes(outcome) == {"a": FinishReason.HANDOVER, "b": FinishReason.HANDOVER}
    step, _ = run_step(c, decode, 2.0)  # a's slot 4 takes the last free block: b is sent back
    assert step.plan.preempted == ("b",) and [e.request_id for e in step.plan.entries] == ["a"]
    assert decode.outstanding == 2 and decode.batcher.stats().waiting == 1
    events, lost, _ = drain(c, 3.0)
    assert lost == [] and decode.batcher.stats().preemptions == 1
    assert finishes(Outcome(events, [])) == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    b_tokens = [e for e in events if e.request_id == "b" and not isinstance(e, Finished)]
    assert len(b_tokens) == 7 and all(isinstance(e, Token) for e in b_tokens)  # its recompute samples token 2
    assert_empty(c)


# -- back-pressure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [colocated, disaggregated])
def test_a_prefill_engine_waits_while_its_decode_engine_is_full(build):
    c = build(max_num_seqs=2)
    (prefill,), (decode,) = c.entries, c.decoders
    c.admit("a", 4, 2, 0.0)
    c.admit("b", 4, 6, 0.0)
    c.admit("x", 4, 2, 0.0)
    step, _ = run_step(c, prefill, 1.0)
    assert [e.request_id for e in step.plan.entries] == ["a", "b"]  # x waits for a running slot
    assert decode.outstanding == 2 and prefill.batcher.stats().waiting == 1
    assert not c.has_room(prefill) and c.next_step(prefill, 2.0) is None

    step = c.next_step(decode, 2.0)  # both taken over and decoding
    assert [e.request_id for e in step.plan.entries] == ["a", "b"]
    c.pulled(step.pulls)
    assert not c.has_room(prefill) and c.next_step(prefill, 2.0) is None
    outcome = c.finish_step(decode, step.plan, sampled(c, step.plan), 2.5)
    assert finishes(outcome) == {"a": FinishReason.LENGTH}
    assert outcome.wake == [prefill] and decode.outstanding == 1
    assert c.has_room(prefill)
    step = c.next_step(prefill, 3.0)
    assert step.plan.kind is StepKind.PREFILL and [e.request_id for e in step.plan.entries] == ["x"]
    c.finish_step(prefill, step.plan, sampled(c, step.plan), 3.5)
    drain(c, 4.0)
    assert_empty(c)


# -- refusal ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [direct, colocated, disaggregated])
@pytest.mark.parametrize(
    ("prompt", "max_tokens", "why"),
    [
        (20, 13, r"r: 20 prompt \+ 13 max tokens exceed the model's context of 32"),
        (16, 10, r"r: 26 tokens need 7 KV blocks of 4, the cache has 6 in all"),  # the decode engine's cache
    ],
)
def test_a_request_that_can_never_fit_is_refused_and_leaves_no_trace(build, prompt, max_tokens, why):
    c = build(num_blocks=6)
    with pytest.raises(NeverFits, match=why):
        c.admit("r", prompt, max_tokens, 0.0)
    assert_empty(c)
    assert all(c.next_step(i, 1.0) is None for i in c.instances)
    assert c.admit("r", 16, 8, 1.0) in c.entries  # the id is free; 24 tokens fit 6 blocks
    drain(c, 2.0)
    assert_empty(c)


# -- abort --------------------------------------------------------------------------------------------------


def test_abort_while_waiting_forgets_the_request():
    c = colocated()
    (prefill,), _ = c.entries, c.decoders
    c.admit("r", 6, 4, 0.0)
    c.abort("r")
    c.abort("r")  # twice, or unknown: nothing
    c.abort("nobody")
    assert_empty(c)
    assert c.next_step(prefill, 1.0) is None


@pytest.mark.parametrize("build", [colocated, disaggregated])
def test_abort_during_a_prefill_step_then_the_step_finishes(build):
    c = build()
    (prefill,), (decode,) = c.entries, c.decoders
    c.admit("r", 6, 4, 0.0)
    c.admit("s", 3, 2, 0.0)
    step = c.next_step(prefill, 1.0)
    c.abort("r")
    assert prefill.outstanding == 1
    outcome = c.finish_step(prefill, step.plan, sampled(c, step.plan), 2.0)  # a token for s only
    assert [e.request_id for e in outcome.events] == ["s", "s"] and finishes(outcome) == {"s": FinishReason.HANDOVER}
    assert [h.request_id for h in decode.inbox] == ["s"]
    drain(c, 3.0)
    assert_empty(c)


@pytest.mark.parametrize("build", [colocated, disaggregated])
def test_abort_while_handed_over_frees_the_prefill_blocks(build):
    c = build()
    (prefill,), (decode,) = c.entries, c.decoders
    c.admit("r", 6, 4, 0.0)
    run_step(c, prefill, 1.0)
    assert len(decode.inbox) == 1 and decode.outstanding == 1 and prefill.batcher.pool.num_used == 2
    c.abort("r")
    assert_empty(c)
    assert c.next_step(decode, 2.0) is None


@pytest.mark.parametrize("build", [colocated, disaggregated])
def test_abort_while_decoding_then_the_decode_step_finishes(build):
    c = build()
    (prefill,), (decode,) = c.entries, c.decoders
    c.admit("r", 6, 4, 0.0)
    c.admit("s", 5, 3, 0.0)
    run_step(c, prefill, 1.0)
    step = c.next_step(decode, 2.0)
    c.pulled(step.pulls)
    assert [e.request_id for e in step.plan.entries] == ["r", "s"]
    c.abort("r")
    assert decode.outstanding == 1
    outcome = c.finish_step(decode, step.plan, {"s": TOKEN}, 2.5)
    assert outcome.events == [Token("s", TOKEN, 2.5)]
    _, outcome = run_step(c, decode, 3.0)
    assert finishes(outcome) == {"s": FinishReason.LENGTH}
    assert_empty(c)


def test_abort_between_a_take_over_and_its_pull_frees_both_pools():
    c = disaggregated()
    (prefill,), (decode,) = c.entries, c.decoders
    c.admit("r", 6, 4, 0.0)
    run_step(c, prefill, 1.0)
    step = c.next_step(decode, 2.0)
    assert len(step.pulls) == 1 and decode.batcher.pool.num_used == 2 and prefill.batcher.pool.num_used == 2
    c.abort("r")
    assert prefill.batcher.pool.num_used == 0
    assert decode.batcher.pool.num_used == 2  # the copy and the step in flight may still write them
    c.pulled(step.pulls)  # the driver's copy was already under way: nothing left to release
    assert c.finish_step(decode, step.plan, {}, 3.0) == Outcome([], [])
    assert_empty(c)


def test_a_block_freed_by_an_abort_in_flight_is_not_reused_by_the_partner_engine_until_the_step_ends():
    c = colocated()
    (prefill,), (decode,) = c.entries, c.decoders
    c.admit("d", 4, 3, 0.0)  # its first decode (slot 4) needs a second block
    run_step(c, prefill, 1.0)
    c.admit("r", 8, 2, 2.0)
    prefilling = c.next_step(prefill, 2.0)  # writes r's prompt into blocks 1 and 2
    c.abort("r")  # the client went away; the prefill step runs on
    decoding = c.next_step(decode, 2.0)  # (held back until the prefill step ends would do too)
    written = {b for e in prefilling.plan.entries for b in e.blocks}
    assert decoding is None or not written & {b for e in decoding.plan.entries for b in e.blocks}


# -- failures -----------------------------------------------------------------------------------------------


def test_a_dead_decode_engine_loses_what_it_owed_and_what_is_handed_to_it():
    c = colocated()
    (prefill,), (decode,) = c.entries, c.decoders
    pool = prefill.batcher.pool
    c.admit("r1", 6, 4, 0.0)
    run_step(c, prefill, 1.0)
    c.admit("r2", 6, 4, 2.0)  # handed over to r1's decode engine only after it dies
    run_step(c, decode, 2.0)  # r1 is decoding
    prefilling = c.next_step(prefill, 2.0)
    assert pool.num_used == 4

    assert c.fail(decode, "decode worker died") == ["r1"]
    assert decode.outstanding == 0 and pool.num_used == 2 and c.requests.keys() == {"r2"}
    assert c.next_step(decode, 3.0) is None
    outcome = c.finish_step(prefill, prefilling.plan, {"r2": TOKEN}, 3.0)
    assert finishes(outcome) == {"r2": FinishReason.HANDOVER}
    assert outcome.lost == [("r2", "decode worker died")] and outcome.wake == []
    assert decode.inbox == []
    assert_empty(c)

    with pytest.raises(EngineError, match="decode worker died"):
        c.admit("r3", 6, 2, 4.0)
    assert_empty(c)
    assert c.admit("r4", 6, 1, 4.0) is prefill  # ends with its first token: the prefill engine finishes it
    assert c.has_room(prefill)
    _, outcome = run_step(c, prefill, 5.0)
    assert finishes(outcome) == {"r4": FinishReason.LENGTH} and outcome.lost == []
    assert_empty(c)


def test_a_dead_decode_engine_among_two_gets_no_more_handovers():
    c = disaggregated(decoders=2)
    (prefill,), (d0, d1) = c.entries, c.decoders
    c.admit("r1", 4, 3, 0.0)
    run_step(c, prefill, 1.0)
    assert [h.request_id for h in d0.inbox] == ["r1"]
    assert c.fail(d0, "d0 died") == ["r1"]
    assert prefill.batcher.pool.num_used == 0  # the handed-over blocks went with it
    for rid in ("r2", "r3"):
        c.admit(rid, 4, 3, 2.0)
    run_step(c, prefill, 2.0)
    assert d0.inbox == [] and [h.request_id for h in d1.inbox] == ["r2", "r3"]
    _, lost, _ = drain(c, 3.0)
    assert lost == []
    assert_empty(c)


# -- random interleavings -----------------------------------------------------------------------------------


class Driver:
    """Drives a coordinator like the live and simulated drivers, one op at a time, and checks it as it goes."""

    def __init__(self, c: Coordinator, rng: random.Random) -> None:
        self.c, self.rng, self.now = c, rng, 0.0
        self.flight: dict[Instance, list] = {}  # engine → [its step, pulled yet]
        self.admitted: dict[str, tuple[int, int, bool]] = {}
        self.finished: set[str] = set()
        self.aborted: set[str] = set()
        self.lost: set[str] = set()
        self.tokens: dict[str, list[int]] = {}

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    def admit(self, rid: str, prompt: int, max_tokens: int, ignore_eos: bool) -> None:
        c, cfg = self.c, self.c.entries[0].batcher.config
        try:
            entry = c.admit(rid, prompt, max_tokens, self.tick(), ignore_eos)
        except NeverFits:
            blocks = -(-(prompt + max_tokens) // cfg.block_size)
            assert prompt + max_tokens > cfg.max_model_len or blocks > cfg.num_blocks
        except EngineError:
            assert any(i.dead for i in c.instances)
        else:
            assert entry in c.entries and not entry.dead
            self.admitted[rid] = (prompt, max_tokens, ignore_eos)
            self.tokens[rid] = []
            return
        assert rid not in c.requests

    def abort(self, pick: int) -> None:
        """Abort a live request, if there are that many, or else one that ended or never was (nothing to do)."""
        live = sorted(self.c.requests)
        rid = live[pick] if pick < len(live) else f"r{pick}"
        if rid in self.c.requests:
            self.aborted.add(rid)
        self.c.abort(rid)

    def fail(self, instance: Instance) -> None:
        if instance.dead:
            return
        lost = self.c.fail(instance, f"{instance.name} died")
        assert not set(lost) & (self.finished | self.aborted | self.lost)
        self.lost.update(lost)
        self.flight.pop(instance, None)  # its step never ends

    def advance(self, instance: Instance) -> bool:
        """Plan, pull or finish `instance`'s step; False if there is nothing to do."""
        if instance.dead:
            return False
        flight = self.flight.get(instance)
        if flight is None:
            step = self.c.next_step(instance, self.tick())
            if step is None:
                return False
            for pull in step.pulls:
                assert len(pull.src) == len(pull.dst) and pull.prefill.batcher.pool is not instance.batcher.pool
            self.flight[instance] = [step, False]
        elif not flight[1]:
            self.c.pulled(flight[0].pulls)
            flight[1] = True
        else:
            del self.flight[instance]
            plan = flight[0].plan
            tokens = {
                e.request_id: self.rng.choice((EOS, *range(1, 10)))
                for e in plan.entries
                if e.samples and e.request_id in self.c.requests
            }
            self.record(self.c.finish_step(instance, plan, tokens, self.tick()))
        return True

    def record(self, outcome: Outcome) -> None:
        for event in outcome.events:
            rid = event.request_id
            assert rid in self.admitted and rid not in self.finished | self.aborted | self.lost
            _, max_tokens, ignore_eos = self.admitted[rid]
            if isinstance(event, FirstToken | Token):
                assert isinstance(event, FirstToken) == (not self.tokens[rid])
                self.tokens[rid].append(event.token)
            elif event.reason is FinishReason.LENGTH:
                assert len(self.tokens[rid]) == max_tokens == event.output_tokens
                self.finished.add(rid)
            elif event.reason is FinishReason.STOP:
                assert self.tokens[rid][-1] == EOS and not ignore_eos
                assert len(self.tokens[rid]) <= max_tokens
                self.finished.add(rid)
            else:
                assert len(self.tokens[rid]) == 1 < max_tokens
        for rid, why in outcome.lost:
            assert why.endswith(" died") and rid not in self.c.requests
            self.lost.add(rid)

    def check(self) -> None:
        c = self.c
        live = set(self.admitted) - self.finished - self.aborted - self.lost
        assert set(c.requests) == live
        for instance in c.instances:
            assert instance.outstanding == sum(r.at is instance for r in c.requests.values()), instance.name
            assert all(h.request_id in c.requests and c.requests[h.request_id].at is instance for h in instance.inbox)
        for pool in pools(c):
            assert pool.num_used + pool.num_free == pool.total

    def drain(self) -> None:
        for _ in range(20_000):
            if not any([self.advance(i) for i in self.c.instances]):
                return
            self.check()
        raise AssertionError("the deployment did not drain")


BUILD = {
    "direct": lambda **shape: direct(2, **shape),
    "colocated": lambda **shape: colocated(2, **shape),
    "disaggregated": lambda **shape: disaggregated(decoders=2, **shape),
}

ADMIT = st.tuples(st.just("admit"), st.integers(0, 99), st.integers(1, 12), st.booleans())  # prompt: % of context
STEP = st.tuples(st.just("step"), st.integers(0, 3))
OPS = st.one_of(ADMIT, ADMIT, STEP, STEP, STEP, STEP, st.tuples(st.just("abort"), st.integers(0, 7)))


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(sorted(BUILD)),
    num_blocks=st.integers(3, 12),
    block_size=st.integers(1, 4),
    max_num_seqs=st.integers(1, 4),
    budget=st.integers(0, 12),  # 0: whole prompts
    max_model_len=st.integers(4, 24),
    ops=st.lists(OPS, min_size=10, max_size=60),
    failures=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 3)), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_random_interleavings_drain_to_nothing_and_every_request_ends(
    kind, num_blocks, block_size, max_num_seqs, budget, max_model_len, ops, failures, seed
):
    shape = dict(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
    )
    c = BUILD[kind](**shape)
    d = Driver(c, random.Random(seed))
    fail_at = dict(failures)
    for n, op in enumerate(ops):
        if n in fail_at:
            d.fail(c.instances[fail_at[n] % len(c.instances)])
        if op[0] == "admit":  # mostly within the context, sometimes past it
            _, prompt, max_tokens, ignore_eos = op
            d.admit(f"r{n}", 1 + prompt * max_model_len * 3 // 400, max_tokens, ignore_eos)
        elif op[0] == "step":
            d.advance(c.instances[op[1] % len(c.instances)])
        else:
            d.abort(op[1])
        d.check()
    d.drain()

    assert_empty(c)  # the dead engines' too: what they held was lost
    assert all(c.next_step(i, d.tick()) is None for i in c.instances)
    assert d.finished | d.aborted | d.lost == set(d.admitted)
    assert not d.finished & d.aborted and not d.finished & d.lost and not d.aborted & d.lost
