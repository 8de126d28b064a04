"""The batching core (workloads/batching.py), step by step with explicit times, then a property test."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu.errors import InvalidParam, NotSupported, OutOfMemory
from workloads.batching import (
    Batcher,
    BatchingConfig,
    BlockPool,
    Finished,
    FinishReason,
    FirstToken,
    NeverFits,
    Role,
    Stats,
    StepKind,
    Token,
    decode_bucket,
    power_of_two_buckets,
)

EOS = 0


def batcher(**overrides) -> Batcher:
    config = dict(
        num_blocks=16, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, eos_token_id=EOS
    )
    config.update(overrides)
    return Batcher(BatchingConfig(**config))


def tokens_for(plan, token: int = 7) -> dict[str, int]:
    return {e.request_id: token for e in plan.entries if e.samples}


def step(b: Batcher, now: float, token: int = 7):
    plan = b.schedule(now)
    return plan, b.finish_step(plan, tokens_for(plan, token), now + 0.5)


def ids(plan) -> list[str]:
    return [e.request_id for e in plan.entries]


# -- admission, budget, batch size -----------------------------------------------------------------------


def test_admission_waits_for_free_blocks_for_the_whole_prompt():
    b = batcher(num_blocks=4)
    for rid in "abc":
        b.add(rid, prompt_tokens=8, max_tokens=1, now=0.0)  # 2 blocks each

    plan = b.schedule(1.0)
    assert plan.kind is StepKind.PREFILL
    assert ids(plan) == ["a", "b"]
    assert [e.blocks for e in plan.entries] == [(0, 1), (2, 3)]
    assert (b.stats().running, b.stats().waiting, b.stats().kv_blocks_used) == (2, 1, 4)

    events = b.finish_step(plan, {"a": 5, "b": 5}, 2.0)
    assert events == [
        FirstToken("a", 5, 2.0),
        Finished("a", FinishReason.LENGTH, 2.0, 0.0, 2.0, 1),
        FirstToken("b", 5, 2.0),
        Finished("b", FinishReason.LENGTH, 2.0, 0.0, 2.0, 1),
    ]
    assert b.stats().kv_blocks_used == 0

    plan = b.schedule(3.0)
    assert ids(plan) == ["c"] and plan.entries[0].num_tokens == 8


def test_token_budget_splits_prefills_across_steps_and_only_the_last_chunk_samples():
    b = batcher(max_num_batched_tokens=10)
    b.add("a", 6, 3, now=0.0)
    b.add("b", 6, 3, now=0.0)
    b.add("c", 3, 3, now=0.0)

    p1 = b.schedule(1.0)
    assert [(e.request_id, e.start, e.num_tokens, e.samples) for e in p1.entries] == [
        ("a", 0, 6, True),
        ("b", 0, 4, False),
    ]
    assert p1.num_tokens == 10 and b.stats().waiting == 1  # c not admitted: no budget left for it
    with pytest.raises(InvalidParam, match=r"not sampled this step \['b'\]"):
        b.finish_step(p1, {"a": 1, "b": 1}, 2.0)
    assert b.finish_step(p1, {"a": 1}, 2.0) == [FirstToken("a", 1, 2.0)]

    p2 = b.schedule(3.0)  # the rest of b first, then c; a waits for a decode step
    assert [(e.request_id, e.start, e.num_tokens, e.samples) for e in p2.entries] == [
        ("b", 4, 2, True),
        ("c", 0, 3, True),
    ]
    b.finish_step(p2, tokens_for(p2), 4.0)

    p3 = b.schedule(5.0)
    assert p3.kind is StepKind.DECODE
    assert [(e.request_id, e.start, e.num_tokens) for e in p3.entries] == [("a", 6, 1), ("b", 6, 1), ("c", 3, 1)]
    assert (p3.bucket, p3.padding) == (4, 1)


def test_decode_batch_is_capped_at_max_num_seqs():
    b = batcher(max_num_seqs=2)
    for rid in "abc":
        b.add(rid, 4, 3, now=0.0)
    plan, _ = step(b, 1.0)
    assert ids(plan) == ["a", "b"]  # admission stops at two running
    plan, _ = step(b, 2.0)
    assert plan.kind is StepKind.DECODE and ids(plan) == ["a", "b"] and plan.bucket == 2
    plan, events = step(b, 3.0)
    assert [e.request_id for e in events if isinstance(e, Finished)] == ["a", "b"]
    plan, _ = step(b, 4.0)
    assert plan.kind is StepKind.PREFILL and ids(plan) == ["c"]

    d = batcher(max_num_seqs=2, role=Role.DECODE)
    for rid in "xyz":
        d.add_prefilled(rid, 4, first_token=9, max_tokens=3, now=0.0)
    plan = d.schedule(1.0)
    assert ids(plan) == ["x", "y"] and d.stats().running == 3  # the oldest two decode


def test_blocks_grow_with_the_context_and_are_freed_at_finish():
    b = batcher(block_size=4)
    b.add("a", 3, 6, now=0.0)
    seen = []
    for t in range(6):
        plan, events = step(b, float(t))
        entry = plan.entries[0]
        seen.append((entry.start, entry.num_tokens, len(entry.blocks)))
    # context 3 → 1 block; the input at slot 3 still fits; slot 4 needs a second block; slot 8 would need a third
    assert seen == [(0, 3, 1), (3, 1, 1), (4, 1, 2), (5, 1, 2), (6, 1, 2), (7, 1, 2)]
    assert events[-1] == Finished("a", FinishReason.LENGTH, 5.5, 0.0, 0.5, 6)
    assert b.stats().kv_blocks_used == 0 and b.stats().running == 0


def test_eos_finishes_a_request_unless_it_ignores_eos():
    b = batcher()
    b.add("a", 4, 10, now=0.0)
    b.add("b", 4, 10, now=0.0, ignore_eos=True)
    step(b, 1.0, token=3)
    _, events = step(b, 2.0, token=EOS)
    assert events == [
        Token("a", EOS, 2.5),
        Finished("a", FinishReason.STOP, 2.5, 0.0, 1.5, 2),
        Token("b", EOS, 2.5),
    ]
    assert b.stats().running == 1


# -- preemption --------------------------------------------------------------------------------------------


def test_preemption_frees_the_newest_request_and_recomputes_it_later():
    b = batcher(num_blocks=3, block_size=2)
    b.add("a", 2, 4, now=0.0)
    b.add("b", 2, 4, now=0.0)
    step(b, 1.0)  # a: block 0, b: block 1

    plan = b.schedule(2.0)  # a takes the last block; b needs one too
    assert plan.kind is StepKind.DECODE and ids(plan) == ["a"] and plan.preempted == ("b",)
    stats = b.stats()
    assert (stats.running, stats.waiting, stats.preemptions, stats.kv_blocks_used) == (1, 1, 1, 2)
    b.finish_step(plan, {"a": 7}, 2.5)

    plan, _ = step(b, 3.0)  # b's recompute needs 2 blocks, one is free: a decodes alone
    assert ids(plan) == ["a"]
    plan, events = step(b, 4.0)
    assert events[-1].reason is FinishReason.LENGTH and b.stats().kv_blocks_used == 0

    plan, events = step(b, 5.0)  # b re-prefills its prompt and its first token, and samples its second
    assert plan.kind is StepKind.PREFILL
    assert [(e.request_id, e.start, e.num_tokens, e.samples) for e in plan.entries] == [("b", 0, 3, True)]
    assert events == [Token("b", 7, 5.5)]
    for t in (6.0, 7.0):
        _, events = step(b, t)
    assert events[-1] == Finished("b", FinishReason.LENGTH, 7.5, 0.0, 1.5, 4)
    assert b.stats().kv_blocks_used == 0


# -- refusal, abort, misuse ----------------------------------------------------------------------------


def test_a_request_that_can_never_fit_is_refused_at_add_naming_the_numbers():
    b = batcher(num_blocks=8, block_size=16, max_model_len=4096)
    with pytest.raises(NeverFits, match=r"r1: 150 tokens need 10 KV blocks of 16, the cache has 8 in all"):
        b.add("r1", 100, 50, now=0.0)
    with pytest.raises(NeverFits, match=r"r2: 60 prompt \+ 10 max tokens exceed the model's context of 64"):
        batcher(max_model_len=64).add("r2", 60, 10, now=0.0)
    b.add("r3", 100, 28, now=0.0)  # exactly 8 blocks
    assert (b.stats().waiting, b.stats().kv_blocks_used) == (1, 0)

    p = batcher(num_blocks=2, block_size=4, role=Role.PREFILL)
    p.add("long-answer", 8, 50, now=0.0)  # a prefill instance holds the prompt only
    with pytest.raises(NeverFits, match="9 tokens need 3 KV blocks of 4, the cache has 2"):
        p.add("long-prompt", 9, 1, now=0.0)


def test_abort_frees_blocks_wherever_the_request_is():
    b = batcher(num_blocks=4, block_size=4)
    b.add("a", 8, 4, now=0.0)
    b.add("b", 8, 4, now=0.0)
    b.add("c", 8, 4, now=0.0)
    plan = b.schedule(1.0)
    assert ids(plan) == ["a", "b"] and b.stats().kv_blocks_used == 4

    assert b.abort("b")  # while its step runs: its token is ignored; its blocks wait for the step's end
    assert b.abort("c")  # waiting
    assert not b.abort("c") and not b.abort("nobody")
    assert b.stats().kv_blocks_used == 4 and b.stats().waiting == 0  # the running step may still write b's
    assert b.finish_step(plan, {"a": 1}, 2.0) == [FirstToken("a", 1, 2.0)]
    assert b.stats().kv_blocks_used == 2

    assert b.abort("a")
    assert b.stats() == Stats(running=0, waiting=0, handing_over=0, kv_blocks_used=0, kv_blocks_total=4, preemptions=0)
    assert b.schedule(3.0).kind is StepKind.IDLE


def test_misuse_is_refused_with_a_reason():
    b = batcher()
    b.add("a", 4, 2, now=1.0)
    with pytest.raises(InvalidParam, match="already added"):
        b.add("a", 4, 2, now=1.0)
    with pytest.raises(InvalidParam, match="time went backwards"):
        b.add("z", 4, 2, now=0.5)
    with pytest.raises(InvalidParam, match="must be >= 1"):
        b.add("z", 0, 2, now=1.0)
    plan = b.schedule(2.0)
    with pytest.raises(InvalidParam, match="still in flight"):
        b.schedule(2.0)
    with pytest.raises(InvalidParam, match=r"none for \['a'\]"):
        b.finish_step(plan, {}, 3.0)
    b.finish_step(plan, {"a": 1}, 3.0)
    with pytest.raises(InvalidParam, match="not the step in flight"):
        b.finish_step(plan, {"a": 1}, 3.0)


# -- disaggregated roles -------------------------------------------------------------------------------


def test_prefill_only_instance_hands_over_after_the_first_token_and_keeps_blocks_until_release():
    p = batcher(block_size=4, role=Role.PREFILL)
    p.add("a", 5, 10, now=0.0)
    p.add("b", 5, 10, now=0.0)
    plan = p.schedule(1.0)
    events = p.finish_step(plan, {"a": 42, "b": EOS}, 2.0)
    assert events == [
        FirstToken("a", 42, 2.0),
        Finished("a", FinishReason.HANDOVER, 2.0, 0.0, 2.0, 1, handover_blocks=(0, 1)),
        FirstToken("b", EOS, 2.0),
        Finished("b", FinishReason.STOP, 2.0, 0.0, 2.0, 1),  # done: nothing to hand over
    ]
    stats = p.stats()
    assert (stats.running, stats.handing_over, stats.kv_blocks_used) == (0, 1, 2)
    assert p.schedule(3.0).kind is StepKind.IDLE  # a handed-over request never decodes here

    p.release("a")
    assert p.stats().kv_blocks_used == 0 and p.stats().handing_over == 0
    with pytest.raises(InvalidParam, match="not waiting for its KV handover"):
        p.release("a")
    with pytest.raises(NotSupported, match="prefill-only"):
        p.add_prefilled("c", 5, 42, 10, now=3.0)


def test_decode_only_instance_takes_prefilled_requests_into_fresh_blocks():
    d = batcher(num_blocks=4, block_size=4, role=Role.DECODE)
    with pytest.raises(NotSupported, match="decode-only"):
        d.add("a", 5, 10, now=0.0)
    assert d.add_prefilled("a", context_tokens=5, first_token=42, max_tokens=3, now=0.0) == (0, 1)

    plan = d.schedule(1.0)
    assert plan.kind is StepKind.DECODE and (plan.bucket, plan.padding) == (1, 0)
    assert [(e.request_id, e.start, e.num_tokens, e.blocks) for e in plan.entries] == [("a", 5, 1, (0, 1))]
    assert d.finish_step(plan, {"a": 8}, 1.5) == [Token("a", 8, 1.5)]  # the first token came from the prefill side
    _, events = step(d, 2.0, token=9)
    assert events == [Token("a", 9, 2.5), Finished("a", FinishReason.LENGTH, 2.5, 0.0, 0.0, 3)]
    assert d.stats().kv_blocks_used == 0

    d.add_prefilled("b", 12, 42, 4, now=3.0)
    with pytest.raises(OutOfMemory, match="need 2 blocks, 1 of 4 free") as not_now:
        d.add_prefilled("c", 5, 42, 3, now=3.0)
    assert not isinstance(not_now.value, NeverFits)  # retry later, unlike a refusal
    with pytest.raises(InvalidParam, match="already finished with its first token"):
        d.add_prefilled("d", 4, EOS, 3, now=3.0)
    with pytest.raises(InvalidParam, match="already finished with its first token"):
        d.add_prefilled("e", 4, 42, 1, now=3.0)


# -- graph-capture buckets -----------------------------------------------------------------------------


def test_decode_bucket_is_the_smallest_capture_size_that_holds_the_batch():
    assert power_of_two_buckets(1) == (1,)
    assert power_of_two_buckets(5) == (1, 2, 4, 8)
    assert power_of_two_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert [decode_bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert decode_bucket(3, (1, 8, 24)) == 8
    with pytest.raises(InvalidParam, match="largest capture bucket 8"):
        decode_bucket(9, (1, 2, 4, 8))
    with pytest.raises(InvalidParam, match="reach max_num_seqs=16"):
        BatchingConfig(16, 4, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=64, decode_buckets=(1, 8))

    b = batcher(max_num_seqs=6, decode_buckets=(1, 3, 6))
    for rid in "abcd":
        b.add(rid, 2, 4, now=0.0)
    step(b, 1.0)
    plan = b.schedule(2.0)
    assert (len(plan.entries), plan.bucket, plan.padding) == (4, 6, 2)


# -- property: random workloads never leak or double-allocate, and always drain ------------------------


def assert_blocks_consistent(b: Batcher) -> None:
    """Every used block belongs to exactly one live request, and every live request's blocks are used."""
    held = [block for r in b._requests.values() for block in r.blocks]
    assert len(held) == len(set(held)) == b.stats().kv_blocks_used
    assert b.pool.num_used + b.pool.num_free == b.pool.total


def check_plan(b: Batcher, plan) -> None:
    cfg = b.config
    blocks = [block for e in plan.entries for block in e.blocks]
    assert len(blocks) == len(set(blocks))
    for e in plan.entries:
        assert len(e.blocks) * cfg.block_size >= e.start + e.num_tokens
    if plan.kind is StepKind.PREFILL:
        assert 0 < plan.num_tokens <= cfg.max_num_batched_tokens
    if plan.kind is StepKind.DECODE:
        assert len(plan.entries) <= cfg.max_num_seqs
        assert plan.bucket == decode_bucket(len(plan.entries), cfg.decode_buckets)


OPS = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 12), st.integers(1, 12), st.booleans()),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("step"), st.integers(0, 2**16), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from(list(Role)),
    num_blocks=st.integers(2, 16),
    block_size=st.integers(1, 4),
    max_num_seqs=st.integers(1, 4),
    budget=st.integers(1, 16),
    max_model_len=st.integers(8, 48),
    ops=st.lists(OPS, max_size=40),
)
def test_random_workloads_never_leak_blocks_and_every_request_ends(
    role, num_blocks, block_size, max_num_seqs, budget, max_model_len, ops
):
    b = batcher(
        role=role,
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
    )
    accepted: dict[str, int] = {}  # id → max_tokens
    ended: set[str] = set()
    outputs: dict[str, list] = {}
    now = 0.0

    def run_step(rng: random.Random, abort_in_flight: bool) -> None:
        nonlocal now
        now += 1
        plan = b.schedule(now)
        check_plan(b, plan)
        if abort_in_flight and plan.entries:
            victim = plan.entries[-1].request_id
            assert b.abort(victim)
            ended.add(victim)
        sampled = {e.request_id: rng.randrange(10) for e in plan.entries if e.samples}  # EOS is 0
        now += 0.5
        for event in b.finish_step(plan, sampled, now):
            outputs.setdefault(event.request_id, []).append(event)
            if isinstance(event, Finished):
                assert event.request_id not in ended
                ended.add(event.request_id)
                if event.reason is FinishReason.HANDOVER:
                    b.release(event.request_id)
        assert_blocks_consistent(b)

    for n, op in enumerate(ops):
        rid = f"r{n}"
        if op[0] == "add":
            _, prompt, max_tokens, ignore_eos = op
            if role is Role.DECODE:
                max_tokens = max(max_tokens, 2)  # a handed-over request has its first token and more to come
            try:
                if role is Role.DECODE:
                    b.add_prefilled(rid, prompt, 1, max_tokens, now, ignore_eos)
                else:
                    b.add(rid, prompt, max_tokens, now, ignore_eos)
            except NeverFits:
                assert (
                    prompt + max_tokens > max_model_len
                    or -(-prompt // block_size) > num_blocks
                    or (role is not Role.PREFILL and -(-(prompt + max_tokens) // block_size) > num_blocks)
                )
                continue
            except OutOfMemory:
                assert role is Role.DECODE
                continue
            accepted[rid] = max_tokens
        elif op[0] == "abort":
            target = f"r{op[1]}"
            if b.abort(target):
                assert target in accepted and target not in ended
                ended.add(target)
        else:
            run_step(random.Random(op[1]), abort_in_flight=op[2])
        assert_blocks_consistent(b)

    for _ in range(2000):  # drain: nothing new arrives, every accepted request must end
        if b.stats().running == b.stats().waiting == 0:
            break
        run_step(random.Random(now), abort_in_flight=False)
    assert b.stats().running == b.stats().waiting == b.stats().handing_over == b.stats().kv_blocks_used == 0
    assert ended == set(accepted)
    for rid, events in outputs.items():
        tokens = [e for e in events if not isinstance(e, Finished)]
        if role is not Role.DECODE:
            assert isinstance(tokens[0], FirstToken) and not any(isinstance(e, FirstToken) for e in tokens[1:])
        if isinstance(events[-1], Finished):
            assert len(tokens) <= events[-1].output_tokens <= max(accepted[rid], 2)


def test_a_shared_pool_hands_blocks_from_prefill_to_decode_without_a_copy():
    pool = BlockPool(8)
    shape = dict(num_blocks=8, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    prefill = Batcher(BatchingConfig(**shape, role=Role.PREFILL), pool=pool)
    decode = Batcher(BatchingConfig(**shape, role=Role.DECODE), pool=pool)
    prefill.add("r", 6, 5, 0.0)
    _, events = step(prefill, 1.0, token=42)
    (finished,) = [e for e in events if isinstance(e, Finished)]
    assert finished.reason is FinishReason.HANDOVER
    blocks = decode.add_prefilled("r", 6, 42, 5, 2.0, blocks=finished.handover_blocks)
    assert blocks == finished.handover_blocks and pool.num_used == 2
    prefill.release("r", handed_over=True)
    assert pool.num_used == 2  # still held, now by the decode instance
    plan = decode.schedule(3.0)
    assert [e.blocks for e in plan.entries] == [blocks]
    decode.abort("r")
    assert pool.num_used == 2  # the decode step in flight may still write them: not the prefill's to take yet
    decode.finish_step(plan, {}, 4.0)
    assert pool.num_used == 0


def test_without_chunked_prefill_prompts_are_prefilled_whole():
    b = batcher(num_blocks=64, max_num_batched_tokens=64, max_model_len=64, chunked_prefill=False)
    for rid, n in (("a", 40), ("b", 30), ("c", 20)):
        b.add(rid, prompt_tokens=n, max_tokens=2, now=0.0)
    first, _ = step(b, 1.0)
    assert [(e.request_id, e.start, e.num_tokens) for e in first.entries] == [("a", 0, 40)]  # b would not fit whole
    second, _ = step(b, 2.0)
    assert [(e.request_id, e.num_tokens) for e in second.entries] == [("b", 30), ("c", 20)]
    with pytest.raises(InvalidParam, match="whole context"):
        BatchingConfig(
            num_blocks=4,
            block_size=4,
            max_num_seqs=2,
            max_num_batched_tokens=8,
            max_model_len=16,
            chunked_prefill=False,
        )
