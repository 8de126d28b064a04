"""INT8 W8A8 as CloudMatrix-Infer serves DeepSeek-R1 (arXiv 2506.12708): activations quantized per
token at run time (DynamicQuant, on the vector cores), weights per output channel offline, the matrix multiply in
INT8 on the cube with INT32 accumulation and a dequantizing epilogue (QuantMatMul, CANN's QuantBatchMatmulV3).

Numerics: scale = max|x| / 127 per row (1 for an all-zero row), q = round(x / scale) clipped to [-127, 127];
QuantMatMul computes (q_x @ q_w^T) * x_scale[:, None] * w_scale[None, :] exactly (int64 accumulation) and casts to
attr `dtype` (a numpy dtype name; default bfloat16).

Cost: the Da Vinci cube does twice as many INT8 MACs per cycle as FP16 ones (Ascend 910's launch figures: 256
TFLOPS FP16, 512 TOPS INT8). For the 910C, a third-party summary of arXiv 2506.12708 (pillumina.github.io) gives
4.45 and 1.29 tokens/s per TFLOPS for its 6,688 and 1,943 tokens/s per NPU: ~1,500 TOPS per package, twice its
752 TFLOPS FP16. So an INT8 GEMM is costed as the FP16 GEMM of its shape (matmul.gemm_cost: tiling, K efficiency)
at twice the rate, times INT8_EFF; its bytes are the INT8 operands', the scales' and the output's.
"""

from __future__ import annotations

from dataclasses import replace

import ml_dtypes
import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, streaming_cost, widen
from npu.emulated.ops.matmul import gemm_cost

I8, F32 = np.dtype(np.int8), np.dtype(np.float32)
INT8_RATE = 2.0  # INT8 MACs per cycle relative to FP16 on the cube (see the module docstring)
# What an INT8 GEMM reaches of that doubled rate, relative to the FP16 GEMM of its shape (the dequantizing epilogue
# on the vector cores, the activations' quantization feeding it): no public measurement on 910B/910C. Fitted (with
# sim/cloudmatrix's other two fitted constants) to CloudMatrix-Infer's prefill figure, 6,688 tokens/s per NPU at
# 4K prompts with perfect EPLB (arXiv 2506.12708).
INT8_EFF = 0.62
OUT_DTYPES = {"float32": F32, "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric INT8 (the last axis is a row): (q, scale)."""
    x = x.astype(np.float32, copy=False)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def out_dtype(op: str, attrs: dict) -> np.dtype:
    name = str(attrs.get("dtype", "bfloat16"))
    if name not in OUT_DTYPES:
        raise operand_error(op, "attr dtype", f"{name!r} is not one of {', '.join(OUT_DTYPES)}")
    return OUT_DTYPES[name]


def int8_gemm_cost(ins: list[TensorSpec], outs: list[TensorSpec], batch: int, m: int, k: int, n: int):
    """An INT8 GEMM: the FP16 GEMM's tiling and efficiency at INT8_RATE times the rate."""
    cost = gemm_cost(ins, outs, batch, m, k, n)
    return replace(cost, efficiency=cost.efficiency * INT8_RATE * INT8_EFF)


@register
class DynamicQuant(Op):
    """x [..., K] float -> (q int8 [..., K], scale float32 [...]), per row."""

    name = "DynamicQuant"

    def infer(self, ins, attrs, outs):
        x = ins[0]
        if x.dtype not in dtypes.FLOATS or not x.shape:
            raise operand_error(self.name, "x", f"is {x}; it needs a float tensor with a last axis of rows")
        return [TensorSpec(I8, x.shape), TensorSpec(F32, x.shape[:-1])]

    def compute(self, ins, attrs):
        return list(quantize(widen(ins[0])))

    def cost(self, ins, outs, attrs):
        rows = max(1, ins[0].size // max(ins[0].shape[-1], 1))
        return streaming_cost(ins[0].nbytes + sum(t.nbytes for t in outs), tiles=rows)


@register
class QuantMatMul(Op):
    """x int8 [M, K] @ w int8 [N, K]^T, dequantized by x_scale [M] and w_scale [N] (float32): out [M, N] in attr
    dtype. The weight keeps Hugging Face's [out, in] layout, as MatMulV2 with transpose_x2."""

    name = "QuantMatMul"
    inputs = (4, 4)

    def _dims(self, ins) -> tuple[int, int, int]:
        x, w, xs, ws = ins
        for name, spec in (("x", x), ("w", w)):
            if spec.dtype != I8 or len(spec.shape) != 2:
                raise operand_error(self.name, name, f"is {spec}; it must be int8 and 2-D")
        (m, k), (n, k2) = x.shape, w.shape
        if k != k2:
            raise operand_error(self.name, "w", f"contraction size {k2} does not match x's {k}")
        if xs != TensorSpec(F32, (m,)):
            raise operand_error(self.name, "x_scale", f"is {xs}; it must be float32 [{m}]")
        if ws != TensorSpec(F32, (n,)):
            raise operand_error(self.name, "w_scale", f"is {ws}; it must be float32 [{n}]")
        return m, k, n

    def infer(self, ins, attrs, outs):
        m, _, n = self._dims(ins)
        return [TensorSpec(out_dtype(self.name, attrs), (m, n))]

    def compute(self, ins, attrs):
        x, w, xs, ws = ins
        acc = x.astype(np.int64) @ w.astype(np.int64).T
        return [acc.astype(np.float32) * xs[:, None] * ws[None, :]]

    def cost(self, ins, outs, attrs):
        m, k, n = self._dims(ins)
        return int8_gemm_cost(ins, outs, 1, m, k, n)
