"""One Qwen2.5-7B decoder layer, batch 1, decoding one token against 1024 cached tokens, in timing mode on a
910B2 with no clock, through the direct-mode runtime: the modeled time is the sum of its kernels' times, and the
layer is bound by reading its weights."""

from __future__ import annotations

import numpy as np
import pytest
from ml_dtypes import bfloat16

from interposer.shim.flexnpu_client.runtime import MEMCPY_CHUNK, Runtime
from interposer.wire import COMMANDS, AttrKind, Op
from npu.emulated.ops import TensorSpec, bind
from npu.emulated.timing import alone
from npu.profiles import profile
from tools.launch import one_npu_config

BF16, F32, I32, ND = 27, 0, 3, 2
H, FF, NQ, NKV, D, L = 3584, 18944, 28, 4, 128, 1024  # hidden, intermediate, heads, KV heads, head dim, context
KV = NKV * D  # 512
HBM, OVERHEAD = 32 * 24 * 1.8e9, 3e-6  # 910B2: ddr_rate 32 B/cycle x 24 AI cores x 1.8 GHz
B2 = profile("910B2")

CONFIG = one_npu_config("timing")


def bf16(*dims):
    return (BF16, dims)


# (op, inputs, outputs, attrs, FLOPs, HBM bytes), the bytes written out by hand: every operand read or written
# once, bf16 = 2 bytes, fp32 = 4, int32 = 4. AddRmsNorm: x1, x2, gamma in, y and x out (5 x 2H) + rstd (4).
NORM_BYTES = 5 * 2 * H + 4
LAYER = [
    ("AddRmsNorm", [bf16(1, H), bf16(1, H), bf16(H)], [bf16(1, H), (F32, (1, 1)), bf16(1, H)], {}, 0, NORM_BYTES),
    ("MatMulV2", [bf16(1, H), bf16(H, H + 2 * KV), bf16(H + 2 * KV)], [bf16(1, H + 2 * KV)], {},
     2 * H * (H + 2 * KV), 2 * (H + H * (H + 2 * KV) + 2 * (H + 2 * KV))),
    ("ApplyRotaryPosEmb", [bf16(1, 1, NQ, D), bf16(1, 1, NKV, D), bf16(1, 1, 1, D), bf16(1, 1, 1, D)],
     [bf16(1, 1, NQ, D), bf16(1, 1, NKV, D)], {}, 0, 2 * (2 * NQ * D + 2 * NKV * D + 2 * D)),
    ("ScatterUpdate", [bf16(L, KV), (I32, (1,)), bf16(1, KV)], [bf16(L, KV)], {}, 0, 4 + 2 * 2 * KV),
    ("ScatterUpdate", [bf16(L, KV), (I32, (1,)), bf16(1, KV)], [bf16(L, KV)], {}, 0, 4 + 2 * 2 * KV),
    ("IncreFlashAttention", [bf16(1, 1, H), bf16(1, L, KV), bf16(1, L, KV)], [bf16(1, 1, H)],
     {"num_heads": NQ, "num_key_value_heads": NKV, "actual_seq_lengths": [L]},
     4 * NQ * L * D, 2 * H * 2 + 2 * L * KV * 2),
    ("MatMulV2", [bf16(1, H), bf16(H, H)], [bf16(1, H)], {}, 2 * H * H, 2 * (H + H * H + H)),
    ("AddRmsNorm", [bf16(1, H), bf16(1, H), bf16(H)], [bf16(1, H), (F32, (1, 1)), bf16(1, H)], {}, 0, NORM_BYTES),
    ("MatMulV2", [bf16(1, H), bf16(H, 2 * FF)], [bf16(1, 2 * FF)], {}, 2 * H * 2 * FF, 2 * (H + H * 2 * FF + 2 * FF)),
    ("SwiGlu", [bf16(1, 2 * FF)], [bf16(1, FF)], {}, 0, 2 * (2 * FF + FF)),
    ("MatMulV2", [bf16(1, FF), bf16(FF, H)], [bf16(1, H)], {}, 2 * FF * H, 2 * (FF + FF * H + H)),
]  # fmt: skip
WEIGHT_BYTES = 2 * (H * (H + 2 * KV) + H * H + H * 2 * FF + FF * H)  # 466 MB


def kernel(op, ins, outs, attrs):
    spec = {BF16: np.dtype(bfloat16), F32: np.dtype(np.float32), I32: np.dtype(np.int32)}
    return bind(op, [TensorSpec(spec[d], s) for d, s in ins], [TensorSpec(spec[d], s) for d, s in outs], attrs)


def test_each_op_costs_what_is_counted_by_hand():
    for op, ins, outs, attrs, flops, nbytes in LAYER:
        cost = kernel(op, ins, outs, attrs).cost
        assert cost.hbm_bytes == nbytes, op
        # The cube works on 16-row tiles: a one-row GEMM pays for 16 rows (K and N are multiples of 16 here).
        assert cost.flops == flops * (16 if op == "MatMulV2" else 1), op


@pytest.fixture
def runtime(direct_runtime):
    return direct_runtime(CONFIG)


def elapsed_ms(rt: Runtime, stream: int, run) -> float:
    start, end = rt.create(Op.EVENT_CREATE), rt.create(Op.EVENT_CREATE)
    rt.submit(Op.EVENT_RECORD, start, event=start, stream=stream)
    run()
    rt.submit(Op.EVENT_RECORD, end, event=end, stream=stream)
    rt.call(Op.STREAM_SYNC, stream, handle=stream)
    reply = rt.call(Op.EVENT_ELAPSED, start, start=start, end=end)
    return COMMANDS[Op.EVENT_ELAPSED].reply.parse(reply).ns / 1e6


def test_decoder_layer_takes_its_roofline_time(runtime):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)

    def operand(dtype, dims):
        nbytes = {BF16: 2, F32: 4, I32: 4}[dtype]
        for d in dims:
            nbytes *= d
        return (dtype, ND, dims, runtime.malloc(nbytes, 0))

    launches = [
        ([operand(*t) for t in ins], [operand(*t) for t in outs], {k: _attr(v) for k, v in attrs.items()}, op)
        for op, ins, outs, attrs, _, _ in LAYER
    ]
    modeled = elapsed_ms(runtime, stream, lambda: [runtime.launch(op, i, o, a, stream) for i, o, a, op in launches])

    # Ops on one stream run back to back: the layer takes the sum of each kernel's time on the idle chip.
    expected = sum(alone(B2, kernel(op, ins, outs, attrs).cost) for op, ins, outs, attrs, *_ in LAYER)
    assert modeled == pytest.approx(expected * 1e3, rel=1e-6)  # 0.48 ms
    # The roofline: a decode step reads every weight once, 0.34 ms at 1.38 TB/s; batch-1 GEMMs cut into too few
    # tiles to occupy every core (and so every core's memory path) add the rest.
    assert WEIGHT_BYTES / HBM * 1e3 < modeled < 1.5 * WEIGHT_BYTES / HBM * 1e3


def _attr(value):
    return (AttrKind.LIST_INT, value) if isinstance(value, list) else (AttrKind.INT, value)


def test_a_blocking_copy_is_work_on_the_host_link(runtime):
    """aclrtMemcpy of 64 MiB host-to-device queues on the default stream and takes its time on the host link
    (50 GB/s on 910B2), chunk by chunk, each chunk a task with its launch overhead."""
    size, link = 64 << 20, 50e9
    host, dev = runtime.malloc_host(size), runtime.malloc(size, 0)
    chunks = -(-size // MEMCPY_CHUNK)
    modeled = elapsed_ms(runtime, 0, lambda: runtime.memcpy(dev, size, host, size, 1))
    assert modeled == pytest.approx((size / link + chunks * OVERHEAD) * 1e3, rel=1e-6)  # 1.34 ms


def _gemm(runtime: Runtime, n: int):
    """A bf16 n^3 GEMM's kernel, and a function launching it on a stream."""
    a, b, c = ((BF16, ND, (n, n), runtime.malloc(2 * n * n, 0)) for _ in range(3))

    def launch(stream: int) -> None:
        runtime.launch("MatMulV2", [a, b], [c], {}, stream)

    return kernel("MatMulV2", [bf16(n, n), bf16(n, n)], [bf16(n, n)], {}), launch


def test_a_streams_core_limit_holds_its_kernels_to_that_many_cores(runtime):
    """aclrtSetStreamResLimit: a 4096^3 GEMM (512 tiles) on a stream limited to 6 cube cores runs as 6 blocks."""
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    gemm, launch = _gemm(runtime, 4096)
    whole = elapsed_ms(runtime, stream, lambda: launch(stream))
    runtime.call(Op.STREAM_LIMIT_SET, stream, stream=stream, kind=0, value=6)
    limited = elapsed_ms(runtime, stream, lambda: launch(stream))
    assert whole == pytest.approx(alone(B2, gemm.cost) * 1e3, rel=1e-6)
    assert limited == pytest.approx(alone(B2, gemm.cost, cube_limit=6) * 1e3, rel=1e-6)
    assert limited > 3.5 * whole  # 86 tiles per block instead of 22


def test_a_thread_can_take_another_streams_limits(runtime):
    """aclrtUseStreamResInCurrentThread: kernels launched from this thread take that stream's limits."""
    stream, limited = (runtime.create(Op.STREAM_CREATE, priority=0, flag=0) for _ in range(2))
    runtime.call(Op.STREAM_LIMIT_SET, limited, stream=limited, kind=0, value=6)
    gemm, launch = _gemm(runtime, 4096)
    runtime.use_stream_limits(limited)
    try:
        taken = elapsed_ms(runtime, stream, lambda: launch(stream))
    finally:
        runtime.use_stream_limits(None)
    assert taken == pytest.approx(alone(B2, gemm.cost, cube_limit=6) * 1e3, rel=1e-6)
    assert elapsed_ms(runtime, stream, lambda: launch(stream)) == pytest.approx(alone(B2, gemm.cost) * 1e3, rel=1e-6)
