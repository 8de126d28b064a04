"""Matrix multiplies: the cube unit's work, tiled as CANN's MatMulV3 tiling does on 910B-class chips.

The cube multiplies 16x16x16 fractals, so M, K and N are padded to multiples of 16 and the FLOPs counted are
the padded ones. The output is cut into base blocks (baseM x baseN, one L0C accumulator each: 128 x 256 fp32 is
exactly L0C's 128 KiB) that the cores take in rounds. Like the CANN tiling (hicann/ops-nn, matmul/mat_mul_v3/
op_host/op_tiling/matmul_v3_base_tiling.cpp: CALC_M_BASIC, CalBaseSize, CalcBase), a base shape is picked from
three candidates, baseM shrinks to share the rows among the cores the N blocks leave idle (a decode GEMM with M = 1
gets baseM = 16), and the candidate whose busiest core loads the fewest rows + columns wins: a decode GEMM takes
16 x 128 blocks where 256-wide ones would leave a lopsided last round (N = 18944: 148 blocks in 7 rounds of 24,
not 74 in 4), so its N blocks spread over the cores. Split-K tilings (small M and N, long K) are not modeled.
"""

from __future__ import annotations

import math

import numpy as np

from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, same_dtype, widen
from npu.tasks import Cost, Unit

# Candidate base blocks (baseM, baseN), CANN's CALC_M_BASIC for a 128 KiB L0C, in its order (first wins ties).
BASE_BLOCKS = ((128, 256), (128, 128), (64, 512))
# The core count the tiling divides work for. CANN tiles for the chip's AI cores; a cost is computed once per
# description, before it meets a chip, so it uses 24: the 910B2 and the 910C die (a 910B4 has 20).
TILING_CORES = 24
# Cube efficiency of one base block over its K loop: CUBE_EFF_MAX * K / (K + CUBE_K0), a fixed cost per block
# (pipeline fill, writing the accumulator out) worth CUBE_K0 of K. Least-squares fit (log error, grid of 0.01
# and 16) with this module's tiling and timing.alone to BF16 torch.mm N^3 on a 910B2
# (github.com/zzc0721/torch-performance-test-data, issue #109 and database.md): N = 2048, 4096, 8192, 10240 ->
# 248.30, 315.36, 301.23, 300.94 TFLOPS measured, 256, 295, 306, 308 modeled. N = 1024 (99.86 measured, 154
# modeled) is left out: 21.5 us per mm is the host's launch rate, not the chip's. The fit lands on one baseK
# step (64) for the per-block cost.
CUBE_EFF_MAX = 0.88
CUBE_K0 = 64
# FP32 operands: the cube's fp32 rate relative to BF16, from the same table (FP32 84.53 vs BF16 315.36
# TFLOPS at 4096^3).
CUBE_FP32_RATE = 84.53 / 315.36


def _pad(x: int) -> int:
    return -(-x // 16) * 16


def gemm_tiles(batch: int, m: int, n: int) -> int:
    """Base blocks of a batched (M, N) output, as the CANN tiling picks them (see the module docstring)."""
    best = None
    for base_m, base_n in BASE_BLOCKS:
        n_blocks = max(1, -(-n // base_n))  # an empty output (n = 0) still launches
        base_m = min(base_m, _pad(max(m // max(TILING_CORES // n_blocks, 1), 1)))
        tiles = batch * -(-m // base_m) * n_blocks
        load = (base_m + base_n) * -(-tiles // TILING_CORES)  # rows + columns the busiest core loads
        if best is None or load < best[0]:
            best = (load, tiles)
    return best[1]


def gemm_cost(ins: list[TensorSpec], outs: list[TensorSpec], batch: int, m: int, k: int, n: int) -> Cost:
    dtype = ins[0].dtype
    efficiency = CUBE_EFF_MAX * _pad(k) / (_pad(k) + CUBE_K0)
    if dtype.itemsize == 4:
        efficiency *= CUBE_FP32_RATE
    return Cost(
        flops=2.0 * batch * _pad(m) * _pad(n) * _pad(k),
        hbm_bytes=sum(t.nbytes for t in (*ins, *outs)),  # each operand once: L2 (192 MB) serves the reuse
        unit=Unit.CUBE,
        tiles=gemm_tiles(batch, m, n),
        efficiency=efficiency,
    )


@register
class MatMulV2(Op):
    """x1 (M,K) @ x2 (K,N) [+ bias (N,)]; attrs transpose_x1, transpose_x2."""

    name = "MatMulV2"
    aliases = ("MatMul",)
    inputs = (2, 3)
    flags = ("transpose_x1", "transpose_x2")

    def _dims(self, ins, attrs):
        a, b = ins[0].shape, ins[1].shape
        for name, shape in (("x1", a), ("x2", b)):
            if len(shape) < 2:
                raise operand_error(self.name, name, f"shape {list(shape)} needs rank >= 2")
        ta, tb = (bool(attrs.get(f, False)) for f in self.flags)
        m, k = (a[-1], a[-2]) if ta else (a[-2], a[-1])
        k2, n = (b[-1], b[-2]) if tb else (b[-2], b[-1])
        if k != k2:
            raise operand_error(self.name, "x2", f"contraction size {k2} does not match x1's {k}")
        return m, k, n

    def _batch(self, ins) -> tuple[int, ...]:
        for name, spec in zip(("x1", "x2"), ins, strict=False):
            if len(spec.shape) != 2:
                raise operand_error(
                    self.name, name, f"shape {list(spec.shape)} is not 2-D; use BatchMatMulV2 for batches"
                )
        return ()

    def infer(self, ins, attrs, outs):
        dtype = same_dtype(self.name, ins, ("x1", "x2", "bias"))
        m, _, n = self._dims(ins, attrs)
        batch = self._batch(ins)
        if len(ins) == 3 and ins[2].shape not in ((n,), (1, n)):
            raise operand_error(self.name, "bias", f"shape {list(ins[2].shape)} is not [{n}]")
        return [TensorSpec(dtype, (*batch, m, n))]

    def compute(self, ins, attrs):
        a, b = widen(ins[0]), widen(ins[1])
        ta, tb = (bool(attrs.get(f, False)) for f in self.flags)
        out = np.matmul(np.swapaxes(a, -1, -2) if ta else a, np.swapaxes(b, -1, -2) if tb else b)
        if len(ins) == 3:
            out = out + widen(ins[2]).reshape(-1)
        return [out]

    def cost(self, ins, outs, attrs):
        m, k, n = self._dims(ins, attrs)
        return gemm_cost(ins, outs, math.prod(outs[0].shape[:-2]), m, k, n)


@register
class BatchMatMulV2(MatMulV2):
    """Batched x1 @ x2 with broadcasting batch dims; attrs adj_x1, adj_x2 (transpose the last two dims)."""

    name = "BatchMatMulV2"
    aliases = ("BatchMatMul",)
    flags = ("adj_x1", "adj_x2")

    def _batch(self, ins):
        try:
            return tuple(np.broadcast_shapes(ins[0].shape[:-2], ins[1].shape[:-2]))
        except ValueError:
            raise operand_error(
                self.name, "x2", f"batch dims {list(ins[1].shape[:-2])} do not broadcast with x1's"
            ) from None
