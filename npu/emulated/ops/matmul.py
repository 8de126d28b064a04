"""Matrix multiplies: the cube unit's work, counted in FLOPs."""

from __future__ import annotations

import math

import numpy as np

from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, same_dtype, widen
from npu.tasks import Cost


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
        batch = math.prod(outs[0].shape[:-2])
        return Cost(flops=2.0 * batch * m * n * k, hbm_bytes=sum(t.nbytes for t in (*ins, *outs)))


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
