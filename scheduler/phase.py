"""The LLM phase of a stream: what the policies plan with.

In order of precedence: the virtual NPU's role in the config, the phase its client declared (FLEXNPU_PHASE,
carried in HELLO), or inference from what the stream runs. Inference follows the operators that only one phase
runs: PromptFlashAttention (whole prompts, causal) is prefill, IncreFlashAttention (one new token against the
KV cache) is decode; a stream that switches between them (one engine running both phases, as in direct
serving) is re-tagged at each. A convolution marks conventional inference (a CNN through acl.mdl): neither phase,
for good — by intensity a CNN's 1x1 convolutions and elementwise layers read as memory-bound, and a CNN taken for
decode would be protected from prefill and compete with real decode (found by `vdevctl bench models`). A stream
that ran none of these is judged by the arithmetic intensity of everything it
queued: FLOPs per HBM byte above the chip's ridge point (peak FLOPs / HBM bandwidth) is compute-bound, like
prefill; below it, memory-bound, like decode. Intensity needs a few kernels to mean anything, so it waits for
MIN_KERNELS of them.
"""

from __future__ import annotations

from npu.profiles import ChipProfile
from npu.tasks import Task, Unit
from scheduler.stream import Phase, PhaseSource, Stream

PHASE_OPERATORS = {
    "PromptFlashAttention": Phase.PREFILL,
    "IncreFlashAttention": Phase.DECODE,
    "Conv2D": Phase.UNKNOWN,  # conventional inference
}
MIN_KERNELS = 8
_INFERRED = (PhaseSource.OPERATOR, PhaseSource.INTENSITY, PhaseSource.NONE)


def declare(stream: Stream, phase: Phase, source: PhaseSource) -> None:
    """Set a phase from the config or the client; UNKNOWN leaves the stream to inference."""
    if phase is not Phase.UNKNOWN:
        stream.phase, stream.phase_from = phase, source


def observe(stream: Stream, task: Task, chip: ChipProfile) -> None:
    """Update an undeclared stream's phase with a task it queued."""
    if stream.phase_from not in _INFERRED:
        return
    by_operator = PHASE_OPERATORS.get(task.name)
    if by_operator is not None:
        stream.phase, stream.phase_from = by_operator, PhaseSource.OPERATOR
        return
    cost = task.cost()
    if cost.unit is Unit.DMA:
        return
    stream.flops += cost.flops
    stream.hbm_bytes += cost.hbm_bytes
    stream.kernels += 1
    if stream.phase_from is not PhaseSource.OPERATOR and stream.kernels >= MIN_KERNELS and stream.hbm_bytes:
        ridge = chip.peak_flops / chip.hbm_bandwidth
        compute_bound = stream.flops / stream.hbm_bytes > ridge
        stream.phase = Phase.PREFILL if compute_bound else Phase.DECODE
        stream.phase_from = PhaseSource.INTENSITY
