"""`vdevctl bench fidelity`: the emulated chip beside public measurements, and a co-location probe.

1. Each calibrated quantity — GEMM and attention throughput, device copy and elementwise bandwidth — modeled on
   the 910B2 profile with the op library's own cost functions, beside the public measurement it is calibrated
   against (source named), and the ratio. Target: within ±15 %.
2. The co-location probe the scheduling work cites: a prefill-shaped kernel stream (one Qwen2.5-7B forward pass
   over a 2048-token prompt) and a decode-shaped one (batch-32 decode steps at 1024 cached tokens) on one chip,
   alone and together, under fifo and under fixed cube/vector core splits (stream core limits). It reports the
   prefill's time and the mean decode step while both run, as slowdowns against each alone.
3. The probe again across the figures nobody has measured (per-core memory path, vector cores' share of it,
   launch overhead): a conclusion that flips inside that range is not a conclusion.

Everything runs in modeled time (no clock, no daemon): the figures are the model's, exactly.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ml_dtypes import bfloat16

from npu.emulated.device import EmulatedNPU
from npu.emulated.ops import TensorSpec, bind
from npu.emulated.timing import alone
from npu.memory import Buffer, Region
from npu.profiles import ChipProfile, profile
from npu.tasks import Cost, DeviceToDevice
from scheduler.engine import Engine
from scheduler.policies import make_policy
from scheduler.stream import Event, RecordEntry, Stream, TaskEntry
from workloads.tables import plain

BF16 = np.dtype(bfloat16)
CHIP = profile("910B2")
TOLERANCE = 0.15


def t(*shape: int, dtype: np.dtype = BF16) -> TensorSpec:
    return TensorSpec(np.dtype(dtype), shape)


# -- calibrated quantities ---------------------------------------------------------------------------------


def gemm_tflops(n: int) -> Callable[[ChipProfile], float]:
    cost = bind("MatMulV2", [t(n, n), t(n, n)], [t(n, n)], {}).cost
    return lambda chip: 2 * n**3 / alone(chip, cost) / 1e12


def attention_tflops(s: int, s_kv: int) -> Callable[[ChipProfile], float]:
    """torch_npu fused attention, one head of 128, no mask: 4·S·S_kv·D FLOPs."""
    cost = bind(
        "PromptFlashAttention", [t(1, s, 128), t(1, s_kv, 128), t(1, s_kv, 128)], [t(1, s, 128)], {"num_heads": 1}
    ).cost
    return lambda chip: 4 * s * s_kv * 128 / alone(chip, cost) / 1e12


def copy_tbps(nbytes: int) -> Callable[[ChipProfile], float]:
    region = Region(Buffer(nbytes, None), 0, nbytes)  # timing mode: no backing store
    cost = DeviceToDevice(region, region).cost()
    return lambda chip: 2 * nbytes / alone(chip, cost) / 1e12


def elementwise_tbps(elements: int) -> Callable[[ChipProfile], float]:
    """A unary elementwise op over float32 (torch.exp in the measurement): bytes read plus written."""
    cost = bind("Gelu", [t(elements, dtype=np.float32)], [t(elements, dtype=np.float32)], {}).cost
    return lambda chip: 8 * elements / alone(chip, cost) / 1e12


@dataclass(frozen=True)
class Measured:
    what: str
    unit: str
    value: float
    source: str
    model: Callable[[ChipProfile], float]
    note: str = ""


TORCH_MM = "torch-performance-test-data issue #109 (zzc0721), torch.mm BF16 on 910B2"
FUSED_ATTENTION = "cannmirror/pto-isa demos/torch_jit/flash/README.md, torch_npu fused attention on 910B2"
MEASUREMENTS = [
    Measured(
        "GEMM bf16 1024^3",
        "TFLOPS",
        99.9,
        TORCH_MM,
        gemm_tflops(1024),
        "the measurement is a host-timed torch call: its launch cost is in it",
    ),
    Measured("GEMM bf16 2048^3", "TFLOPS", 248.3, TORCH_MM, gemm_tflops(2048)),
    Measured("GEMM bf16 4096^3", "TFLOPS", 315.4, TORCH_MM, gemm_tflops(4096)),
    Measured(
        "GEMM bf16 8192^3",
        "TFLOPS",
        301.2,
        TORCH_MM,
        gemm_tflops(8192),
        "the chip runs 8192^3 slower than 4096^3 (clock or L2); the model has no such effect",
    ),
    Measured(
        "attention 1x128, 2048 x 16384",
        "TFLOPS",
        155.0,
        FUSED_ATTENTION,
        attention_tflops(2048, 16384),
        "measured 176 us host-timed less the ~65 us floor a tiny call shows = 111 us on the chip; the model "
        "runs 16 query blocks on 16 of 24 cores, the real kernel evidently spreads wider (its time grows "
        "less than its FLOPs from 2048 to 3072 rows): key splits for prefill attention are not modeled",
    ),
    Measured(
        "attention 1x128, 3072 x 16384",
        "TFLOPS",
        165.0,
        FUSED_ATTENTION,
        attention_tflops(3072, 16384),
        "221 us host-timed less the ~65 us floor",
    ),
    Measured(
        "device copy 256 MiB, read+write",
        "TB/s",
        1.267,
        "third-party 910B spec note (aclrtMemcpy D2D, 910B1)",
        copy_tbps(256 << 20),
    ),
    Measured(
        "elementwise fp32 256 Mi elements, read+write",
        "TB/s",
        1.28,
        "gameofdimension/limulidae torch.exp (642 GB/s counting input bytes only)",
        elementwise_tbps(256 << 20),
    ),
]


def calibration(chip: ChipProfile) -> list[dict]:
    rows = []
    for m in MEASUREMENTS:
        modeled = m.model(chip)
        ratio = modeled / m.value
        rows.append(
            {
                "what": m.what,
                "unit": m.unit,
                "modeled": modeled,
                "measured": m.value,
                "ratio": ratio,
                "within": abs(ratio - 1) <= TOLERANCE,
                "source": m.source,
                "note": m.note,
            }
        )
    return rows


# -- the co-location probe -------------------------------------------------------------------------------

# Qwen2.5-7B: hidden 3584, intermediate 18944, 28 query heads and 4 KV heads of 128, 28 layers.
H, FF, NQ, NKV, D, LAYERS = 3584, 18944, 28, 4, 128, 28
QKV = (NQ + 2 * NKV) * D


def _layer(tokens: int, batch: int, context: int, prefill: bool) -> list[Cost]:
    """The kernels of one decoder layer: `tokens` rows through the GEMMs, then attention."""
    rows = tokens
    kernels = [
        bind("AddRmsNorm", [t(rows, H), t(rows, H), t(H)], [t(rows, H), t(rows, 1, dtype=np.float32), t(rows, H)], {}),
        bind("MatMulV2", [t(rows, H), t(H, QKV), t(QKV)], [t(rows, QKV)], {}),
    ]
    if prefill:
        s = tokens // batch
        kernels.append(
            bind(
                "PromptFlashAttention",
                [t(batch, s, NQ * D), t(batch, s, NKV * D), t(batch, s, NKV * D)],
                [t(batch, s, NQ * D)],
                {"num_heads": NQ, "num_key_value_heads": NKV, "next_tokens": 0},
            )
        )
    else:
        kernels.append(
            bind(
                "IncreFlashAttention",
                [t(batch, 1, NQ * D), t(batch, context, NKV * D), t(batch, context, NKV * D)],
                [t(batch, 1, NQ * D)],
                {"num_heads": NQ, "num_key_value_heads": NKV},
            )
        )
    kernels += [
        bind("MatMulV2", [t(rows, NQ * D), t(NQ * D, H)], [t(rows, H)], {}),
        bind("AddRmsNorm", [t(rows, H), t(rows, H), t(H)], [t(rows, H), t(rows, 1, dtype=np.float32), t(rows, H)], {}),
        bind("MatMulV2", [t(rows, H), t(H, 2 * FF)], [t(rows, 2 * FF)], {}),
        bind("SwiGlu", [t(rows, 2 * FF)], [t(rows, FF)], {}),
        bind("MatMulV2", [t(rows, FF), t(FF, H)], [t(rows, H)], {}),
    ]
    return [k.cost for k in kernels]


PREFILL = _layer(2048, 1, 0, prefill=True) * LAYERS  # one forward pass over a 2048-token prompt
DECODE_STEP = _layer(32, 32, 1024, prefill=False) * LAYERS  # one decode step of 32 requests


class _Task:
    name = "kernel"

    def __init__(self, cost: Cost) -> None:
        self._cost = cost

    def cost(self) -> Cost:
        return self._cost

    def run(self) -> None:
        pass


def _run(
    chip: ChipProfile,
    prefill_limit: tuple[int, int] | None,
    decode_limit: tuple[int, int] | None,
    with_prefill: bool = True,
    with_decode: bool = True,
    steps: int = 1,
) -> tuple[float, list[float]]:
    """Run the probe's streams; return the prefill's end and each decode step's end (modeled seconds)."""
    engine = Engine(EmulatedNPU("probe", chip, "timing"), make_policy("fifo"))
    seq = itertools.count(1)

    def stream(limit: tuple[int, int] | None) -> Stream:
        s = Stream(cube_limit=limit[0], vector_limit=limit[1]) if limit else Stream()
        engine.add_stream(s)
        return s

    def mark(s: Stream) -> Event:
        event = Event(recorded=1)
        engine.submit(RecordEntry(s, next(seq), event=event, generation=1), 0.0)
        return event

    prefill_done, step_done = None, []
    p, d = stream(prefill_limit), stream(decode_limit)
    for _ in range(steps if with_decode else 0):
        for cost in DECODE_STEP:
            engine.submit(TaskEntry(d, next(seq), task=_Task(cost)), 0.0)
        step_done.append(mark(d))
    if with_prefill:
        for cost in PREFILL:
            engine.submit(TaskEntry(p, next(seq), task=_Task(cost)), 0.0)
        prefill_done = mark(p)
    engine.advance(math.inf)
    return (prefill_done.timestamp if prefill_done else 0.0), [e.timestamp for e in step_done]


def probe(chip: ChipProfile) -> list[dict]:
    prefill_alone, _ = _run(chip, None, None, with_decode=False)
    _, (step_alone,) = _run(chip, None, None, with_prefill=False)
    steps = math.ceil(3 * prefill_alone / step_alone) + 1  # decode keeps running past the prefill's end
    splits = [("fifo (whole chip each)", None, None)] + [
        (f"split {c}/{chip.ai_cores - c} cube cores", (c, 2 * c), (chip.ai_cores - c, 2 * (chip.ai_cores - c)))
        for c in (18, 12, 6)
    ]
    rows = []
    for name, p_limit, d_limit in splits:
        prefill_end, step_ends = _run(chip, p_limit, d_limit, steps=steps)
        steps_during = [b - a for a, b in zip([0.0, *step_ends], step_ends, strict=False) if b <= prefill_end]
        step = statistics.fmean(steps_during or step_ends[:1])
        rows.append(
            {
                "setting": name,
                "prefill_ms": prefill_end * 1e3,
                "decode_step_ms": step * 1e3,
                "prefill_slowdown": prefill_end / prefill_alone,
                "decode_slowdown": step / step_alone,
            }
        )
    rows.insert(
        0,
        {
            "setting": "alone",
            "prefill_ms": prefill_alone * 1e3,
            "decode_step_ms": step_alone * 1e3,
            "prefill_slowdown": 1.0,
            "decode_slowdown": 1.0,
        },
    )
    return rows


# The figures nobody has measured, and their plausible ranges.
def sweeps(chip: ChipProfile) -> list[tuple[str, ChipProfile]]:
    bw = chip.core_bandwidth
    return [
        ("default", chip),
        ("core path x2 (115 GB/s)", chip.with_(core_bandwidth=2 * bw, vector_core_bandwidth=bw)),
        ("core path x4 (6 cores fill HBM)", chip.with_(core_bandwidth=4 * bw, vector_core_bandwidth=2 * bw)),
        ("vector share 1/4 of the path", chip.with_(vector_core_bandwidth=bw / 4)),
        ("vector share all of the path", chip.with_(vector_core_bandwidth=bw)),
        ("launch overhead 1 us", chip.with_(launch_overhead_s=1e-6)),
        ("launch overhead 10 us", chip.with_(launch_overhead_s=10e-6)),
    ]


def run(quick: bool = False) -> dict:
    variants = sweeps(CHIP)[:3] if quick else sweeps(CHIP)
    return {
        "chip": CHIP.name,
        "calibration": calibration(CHIP),
        "probe": probe(CHIP),
        "sensitivity": [{"variant": name, "probe": probe(chip)} for name, chip in variants],
    }


def render(r: dict) -> str:
    cal = plain(
        [("quantity", "modeled", "measured", "ratio", "ok", "source")]
        + [
            (
                c["what"],
                f"{c['modeled']:.3g} {c['unit']}",
                f"{c['measured']:.3g}",
                f"{c['ratio']:.2f}",
                "yes" if c["within"] else "NO",
                c["source"],
            )
            for c in r["calibration"]
        ]
    )
    notes = "\n".join(f"  {c['what']}: {c['note']}" for c in r["calibration"] if c["note"])

    def probe_table(rows: list[dict]) -> str:
        return plain(
            [("setting", "prefill ms", "decode step ms", "prefill slowdown", "decode slowdown")]
            + [
                (
                    p["setting"],
                    f"{p['prefill_ms']:.2f}",
                    f"{p['decode_step_ms']:.3f}",
                    f"{p['prefill_slowdown']:.2f}x",
                    f"{p['decode_slowdown']:.2f}x",
                )
                for p in rows
            ]
        )

    sens = plain(
        [("variant", "fifo prefill", "fifo decode", "best split", "its prefill", "its decode")]
        + [_sensitivity_row(v) for v in r["sensitivity"]]
    )
    return (
        f"Calibration ({r['chip']}, target: within ±{TOLERANCE:.0%} of each measurement)\n{cal}\nNotes:\n{notes}\n\n"
        f"Co-location probe: a 2048-token prefill pass beside batch-32 decode steps (Qwen2.5-7B shapes)\n"
        f"{probe_table(r['probe'])}\n\n"
        f"Across the unmeasured figures (slowdowns vs alone; best split = lowest sum of the two slowdowns)\n{sens}"
    )


def _sensitivity_row(v: dict) -> tuple[str, ...]:
    fifo = next(p for p in v["probe"] if p["setting"].startswith("fifo"))
    splits = [p for p in v["probe"] if p["setting"].startswith("split")]
    best = min(splits, key=lambda p: p["prefill_slowdown"] + p["decode_slowdown"])
    return (
        v["variant"],
        f"{fifo['prefill_slowdown']:.2f}x",
        f"{fifo['decode_slowdown']:.2f}x",
        best["setting"].removeprefix("split "),
        f"{best['prefill_slowdown']:.2f}x",
        f"{best['decode_slowdown']:.2f}x",
    )
