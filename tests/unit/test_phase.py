"""The phase of a stream (scheduler/phase.py), as the engine tags the tasks queued on it: declared by the
virtual NPU's role or the client, otherwise inferred from the attention operators it runs, otherwise from the
arithmetic intensity of its kernels against the chip's ridge point (910B2: 353.9 TFLOPS / 1.38 TB/s = 256 FLOPs
per HBM byte)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu.emulated.device import EmulatedNPU
from npu.profiles import profile
from npu.tasks import Cost, Unit
from scheduler import phase
from scheduler.engine import Engine
from scheduler.phase import MIN_KERNELS
from scheduler.policies import make_policy
from scheduler.stream import Phase, PhaseSource, Stream, TaskEntry

B2 = profile("910B2")
RIDGE = B2.peak_flops / B2.hbm_bandwidth

ATTENTION = Cost(flops=1e9, hbm_bytes=1e7, unit=Unit.MIX, tiles=8)
GEMM = Cost(flops=1e9, hbm_bytes=1e6, unit=Unit.CUBE, tiles=8)  # 1000 FLOPs per byte: compute-bound
NORM = Cost(hbm_bytes=1e6, unit=Unit.VECTOR, tiles=8)  # no FLOPs: memory-bound
COPY = Cost(hbm_bytes=1e6, link_bytes=1e6, unit=Unit.DMA)


class FakeTask:
    def __init__(self, name: str, cost: Cost) -> None:
        self.name, self._cost = name, cost

    def cost(self) -> Cost:
        return self._cost

    def run(self) -> None:
        pass


def prefill_attention() -> FakeTask:
    return FakeTask("PromptFlashAttention", ATTENTION)


def decode_attention() -> FakeTask:
    return FakeTask("IncreFlashAttention", ATTENTION)


def gemm() -> FakeTask:
    return FakeTask("MatMulV2", GEMM)


def norm() -> FakeTask:
    return FakeTask("RmsNorm", NORM)


class Rig:
    def __init__(self) -> None:
        self.engine = Engine(EmulatedNPU("npu0", B2, "timing"), make_policy("fifo"))
        self.seq = 0
        self.t = 0.0

    def stream(self, phase_: Phase = Phase.UNKNOWN, source: PhaseSource = PhaseSource.CLIENT) -> Stream:
        stream = Stream()
        phase.declare(stream, phase_, source)
        self.engine.add_stream(stream)
        return stream

    def submit(self, stream: Stream, task: FakeTask) -> TaskEntry:
        self.seq += 1
        self.t += 1e-3  # each task on an idle chip: phases are what is under test, not timing
        entry = TaskEntry(stream, self.seq, task=task)
        self.engine.submit(entry, self.t)
        return entry


def test_ridge_point_used_here():
    assert pytest.approx(256.0) == RIDGE
    assert GEMM.flops / GEMM.hbm_bytes > RIDGE > ATTENTION.flops / ATTENTION.hbm_bytes


def test_an_undeclared_stream_starts_unknown():
    """A stream nobody declared a phase for is unknown until it runs something telling."""
    rig = Rig()
    s = rig.stream()  # the client declared UNKNOWN: left to inference
    assert (s.phase, s.phase_from) == (Phase.UNKNOWN, PhaseSource.NONE)
    entry = rig.submit(s, norm())
    assert entry.phase is Phase.UNKNOWN


def test_incre_flash_attention_makes_a_stream_decode():
    """An undeclared stream that queues IncreFlashAttention (one new token against the KV cache) is decode, and
    the task that told is tagged decode itself."""
    rig = Rig()
    s = rig.stream()
    entry = rig.submit(s, decode_attention())
    assert (s.phase, s.phase_from) == (Phase.DECODE, PhaseSource.OPERATOR)
    assert entry.phase is Phase.DECODE
    assert rig.submit(s, gemm()).phase is Phase.DECODE  # what follows on the stream is decode too


def test_prompt_flash_attention_makes_a_stream_prefill():
    """An undeclared stream that queues PromptFlashAttention (whole prompts) is prefill."""
    rig = Rig()
    s = rig.stream()
    entry = rig.submit(s, prefill_attention())
    assert (s.phase, s.phase_from) == (Phase.PREFILL, PhaseSource.OPERATOR)
    assert entry.phase is Phase.PREFILL


def test_a_stream_running_both_phases_is_retagged_at_each_attention_operator():
    """One engine running both phases on one stream (direct serving): the stream switches at each attention
    operator, back and forth, and each task is tagged with the phase of the step it belongs to."""
    rig = Rig()
    s = rig.stream()
    tagged = []
    for attention, expected in [(prefill_attention, Phase.PREFILL), (decode_attention, Phase.DECODE)] * 2 + [
        (decode_attention, Phase.DECODE),
        (prefill_attention, Phase.PREFILL),
    ]:
        tagged.append(rig.submit(s, attention()).phase)
        assert (s.phase, s.phase_from) == (expected, PhaseSource.OPERATOR)
        tagged.append(rig.submit(s, gemm()).phase)
    assert tagged == [p for p in ("prefill", "decode", "prefill", "decode", "decode", "prefill") for _ in range(2)]


@pytest.mark.parametrize("source", [PhaseSource.ROLE, PhaseSource.CLIENT])
@pytest.mark.parametrize("declared", [Phase.PREFILL, Phase.DECODE])
def test_a_declared_phase_is_never_overridden(declared, source):
    """A phase from the virtual NPU's role or the client's declaration wins over everything the stream runs: the
    other phase's attention operator, and any number of kernels of the other phase's intensity."""
    rig = Rig()
    s = rig.stream(declared, source)
    assert (s.phase, s.phase_from) == (declared, source)
    contrary_attention = decode_attention if declared is Phase.PREFILL else prefill_attention
    contrary_kernel = norm if declared is Phase.PREFILL else gemm
    entries = [rig.submit(s, contrary_attention())]
    entries += [rig.submit(s, contrary_kernel()) for _ in range(3 * MIN_KERNELS)]
    entries.append(rig.submit(s, contrary_attention()))
    assert (s.phase, s.phase_from) == (declared, source)
    assert {e.phase for e in entries} == {declared}


def test_declaring_unknown_leaves_the_stream_to_inference():
    """A client that declares no phase (UNKNOWN) does not pin the stream: inference still applies."""
    rig = Rig()
    s = rig.stream(Phase.UNKNOWN, PhaseSource.CLIENT)
    assert s.phase_from is PhaseSource.NONE
    rig.submit(s, decode_attention())
    assert (s.phase, s.phase_from) == (Phase.DECODE, PhaseSource.OPERATOR)


def test_compute_bound_kernels_make_a_stream_prefill_after_min_kernels():
    """An undeclared stream of GEMM-like kernels (1000 FLOPs per HBM byte, above the 256 ridge) stays unknown for
    MIN_KERNELS - 1 kernels (too few to judge) and is prefill, by intensity, from the MIN_KERNELS-th on."""
    rig = Rig()
    s = rig.stream()
    entries = [rig.submit(s, gemm()) for _ in range(MIN_KERNELS)]
    assert [e.phase for e in entries] == [Phase.UNKNOWN] * (MIN_KERNELS - 1) + [Phase.PREFILL]
    assert (s.phase, s.phase_from) == (Phase.PREFILL, PhaseSource.INTENSITY)


def test_memory_bound_kernels_make_a_stream_decode_after_min_kernels():
    """An undeclared stream of low-intensity vector kernels is decode, by intensity, after MIN_KERNELS of them."""
    rig = Rig()
    s = rig.stream()
    entries = [rig.submit(s, norm()) for _ in range(MIN_KERNELS)]
    assert [e.phase for e in entries] == [Phase.UNKNOWN] * (MIN_KERNELS - 1) + [Phase.DECODE]
    assert (s.phase, s.phase_from) == (Phase.DECODE, PhaseSource.INTENSITY)


def test_intensity_weighs_everything_the_stream_queued():
    """Intensity is of all the stream's kernels together (FLOPs over bytes), not of the last one: a GEMM stream
    that then queues enough memory-bound kernels to pull its FLOPs per byte under the ridge becomes decode."""
    rig = Rig()
    s = rig.stream()
    for _ in range(MIN_KERNELS):
        rig.submit(s, gemm())
    assert s.phase is Phase.PREFILL
    # 8 GFLOP over 8 MB so far; each norm adds 1 MB: under 256 FLOPs per byte after 8e9 / 256e6 - 8 = 23.25 more.
    for _ in range(23):
        rig.submit(s, norm())
    assert s.phase is Phase.PREFILL
    rig.submit(s, norm())
    assert (s.phase, s.phase_from) == (Phase.DECODE, PhaseSource.INTENSITY)


def test_intensity_at_the_ridge_is_memory_bound():
    """Exactly at the ridge point a kernel is not compute-bound (it needs more than the ridge)."""
    rig = Rig()
    s = rig.stream()
    at_ridge = Cost(flops=RIDGE * 1e6, hbm_bytes=1e6, unit=Unit.CUBE, tiles=8)
    for _ in range(MIN_KERNELS):
        rig.submit(s, FakeTask("MatMulV2", at_ridge))
    assert s.phase is Phase.DECODE


def test_copies_do_not_count_towards_intensity():
    """Copies (Unit.DMA) move bytes without being a kernel: they neither count towards MIN_KERNELS nor dilute
    a compute-bound stream's intensity."""
    rig = Rig()
    s = rig.stream()
    for _ in range(4 * MIN_KERNELS):
        rig.submit(s, FakeTask("memcpy_h2d", COPY))
    assert (s.phase, s.kernels, s.hbm_bytes) == (Phase.UNKNOWN, 0, 0.0)
    for _ in range(MIN_KERNELS):
        rig.submit(s, gemm())
    assert s.phase is Phase.PREFILL


def test_an_attention_operator_outranks_intensity():
    """Once an attention operator has named the phase, intensity does not override it, however many kernels of
    the other kind follow; intensity never decided a stream that ran an attention operator."""
    rig = Rig()
    s = rig.stream()
    rig.submit(s, decode_attention())
    for _ in range(3 * MIN_KERNELS):
        rig.submit(s, gemm())
    assert (s.phase, s.phase_from) == (Phase.DECODE, PhaseSource.OPERATOR)
    t = Rig()
    s = t.stream()
    for _ in range(MIN_KERNELS):
        t.submit(s, norm())
    assert s.phase_from is PhaseSource.INTENSITY
    t.submit(s, prefill_attention())  # an operator outranks an earlier judgement by intensity
    assert (s.phase, s.phase_from) == (Phase.PREFILL, PhaseSource.OPERATOR)


def test_a_graph_replay_is_tagged_by_all_of_its_tasks():
    """Tasks queued together (a graph replay's step) are tagged by the phase all of them tell: GEMMs queued with
    an IncreFlashAttention are decode, including those queued before it."""
    rig = Rig()
    s = rig.stream()
    step = [TaskEntry(s, i, task=t) for i, t in enumerate([gemm(), gemm(), decode_attention(), gemm()])]
    rig.engine.submit_all(step, 0.0)
    assert [e.phase for e in step] == [Phase.DECODE] * 4


def test_phase_is_per_stream():
    """What one stream runs says nothing about another's phase."""
    rig = Rig()
    a, b, c = rig.stream(), rig.stream(), rig.stream()
    rig.submit(a, prefill_attention())
    rig.submit(b, decode_attention())
    assert (a.phase, b.phase, c.phase) == (Phase.PREFILL, Phase.DECODE, Phase.UNKNOWN)


_TASK = st.sampled_from([prefill_attention, decode_attention, gemm, norm, lambda: FakeTask("memcpy", COPY)])


@settings(max_examples=50, deadline=None, database=None)
@given(
    declared=st.sampled_from([Phase.PREFILL, Phase.DECODE]),
    source=st.sampled_from([PhaseSource.ROLE, PhaseSource.CLIENT]),
    tasks=st.lists(_TASK, max_size=40),
)
def test_declared_phase_holds_for_any_sequence_of_tasks(declared, source, tasks):
    """Any sequence of attention operators, GEMMs, vector kernels and copies leaves a declared stream, and every
    task on it, in its declared phase."""
    rig = Rig()
    s = rig.stream(declared, source)
    for make in tasks:
        assert rig.submit(s, make()).phase is declared
    assert (s.phase, s.phase_from) == (declared, source)


@settings(max_examples=50, deadline=None, database=None)
@given(tasks=st.lists(_TASK, min_size=1, max_size=40))
def test_an_undeclared_stream_follows_its_last_attention_operator(tasks):
    """On an undeclared stream, after any sequence of tasks, the phase is the one named by its last attention
    operator, if it ran one."""
    rig = Rig()
    s = rig.stream()
    for make in tasks:
        rig.submit(s, make())
    named = [t for t in tasks if t in (prefill_attention, decode_attention)]
    if named:
        expected = Phase.PREFILL if named[-1] is prefill_attention else Phase.DECODE
        assert (s.phase, s.phase_from) == (expected, PhaseSource.OPERATOR)
    else:
        assert s.phase_from in (PhaseSource.NONE, PhaseSource.INTENSITY)


def test_a_convolution_marks_conventional_inference_for_good():
    """A CNN's stream reads as memory-bound by intensity (its elementwise layers and 1x1 convolutions); taken for
    decode it would compete with real decode under flex. A Conv2D makes it neither phase, whatever follows."""
    stream = Stream()
    for _ in range(MIN_KERNELS):
        phase.observe(stream, norm(), B2)
    assert (stream.phase, stream.phase_from) == (Phase.DECODE, PhaseSource.INTENSITY)
    phase.observe(stream, FakeTask("Conv2D", GEMM), B2)
    for _ in range(3 * MIN_KERNELS):
        phase.observe(stream, norm(), B2)
    assert (stream.phase, stream.phase_from) == (Phase.UNKNOWN, PhaseSource.OPERATOR)
