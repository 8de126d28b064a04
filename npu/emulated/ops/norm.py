"""Normalisations: RmsNorm, AddRmsNorm (residual add fused in), LayerNorm, BNInfer (inference batch norm).

Their kernels give each vector core whole rows (a row is reduced where it lies), so a cost has one tile per
normalised row: a decode step's few rows use few cores.
"""

from __future__ import annotations

import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, same_dtype, streaming_cost, widen

F32 = np.dtype(np.float32)


def _params_tail(op: str, x: TensorSpec, gamma: TensorSpec) -> int:
    k = len(gamma.shape)
    if k == 0 or k > len(x.shape) or x.shape[-k:] != gamma.shape:
        raise operand_error(op, "gamma", f"shape {list(gamma.shape)} is not a trailing part of x's {list(x.shape)}")
    if gamma.size == 0:
        raise operand_error(op, "gamma", f"shape {list(gamma.shape)} is empty: there is nothing to normalize over")
    return k


def _row_cost(ins: list[TensorSpec], outs: list[TensorSpec], rows: int):
    return streaming_cost(sum(t.nbytes for t in (*ins, *outs)), tiles=rows)


def _rms(x: np.ndarray, gamma: np.ndarray, k: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(range(x.ndim - k, x.ndim))
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps)
    return x * rstd * gamma, rstd


@register
class RmsNorm(Op):
    """y = x / sqrt(mean(x^2) + epsilon) * gamma over gamma's trailing dims; outputs y and rstd (float32).
    attr epsilon (default 1e-6)."""

    name = "RmsNorm"
    inputs = (2, 2)

    def infer(self, ins, attrs, outs):
        x, gamma = ins
        same_dtype(self.name, ins, ("x", "gamma"))
        k = _params_tail(self.name, x, gamma)
        return [x, TensorSpec(F32, x.shape[: len(x.shape) - k] + (1,) * k)]

    def compute(self, ins, attrs):
        x, gamma = widen(ins[0]), widen(ins[1])
        return list(_rms(x, gamma, gamma.ndim, float(attrs.get("epsilon", 1e-6))))

    def cost(self, ins, outs, attrs):
        return _row_cost(ins, outs, ins[0].size // ins[1].size)


@register
class AddRmsNorm(Op):
    """x = x1 + x2 (the residual add), then RmsNorm(x, gamma); outputs y, rstd (float32) and x."""

    name = "AddRmsNorm"
    inputs = (3, 3)

    def infer(self, ins, attrs, outs):
        x1, x2, gamma = ins
        same_dtype(self.name, ins, ("x1", "x2", "gamma"))
        if x1.shape != x2.shape:
            raise operand_error(self.name, "x2", f"shape {list(x2.shape)} differs from x1's {list(x1.shape)}")
        k = _params_tail(self.name, x1, gamma)
        return [x1, TensorSpec(F32, x1.shape[: len(x1.shape) - k] + (1,) * k), x1]

    def compute(self, ins, attrs):
        x = widen(ins[0]) + widen(ins[1])
        gamma = widen(ins[2])
        y, rstd = _rms(x, gamma, gamma.ndim, float(attrs.get("epsilon", 1e-6)))
        return [y, rstd, x]

    def cost(self, ins, outs, attrs):
        return _row_cost(ins, outs, ins[0].size // ins[2].size)


@register
class LayerNorm(Op):
    """Normalise over dims from attr begin_norm_axis (default -1); scale by gamma, shift by beta (their
    shape is x's from begin_params_axis, default -1; beta may be left out: no shift, as ONNX's
    LayerNormalization without B). attr epsilon (default 1e-5). Outputs y, mean and variance (float32, reduced
    dims kept as 1)."""

    name = "LayerNorm"
    inputs = (2, 3)

    def _axes(self, x: TensorSpec, attrs, key: str = "begin_norm_axis") -> int:
        rank = len(x.shape)
        begin = int(attrs.get(key, -1))
        if not -rank <= begin < rank:
            raise operand_error(self.name, f"attr {key}", f"{begin} is out of range for rank {rank}")
        return begin % rank

    def infer(self, ins, attrs, outs):
        x = ins[0]
        same_dtype(self.name, ins, ("x", "gamma", "beta"))
        begin = self._axes(x, attrs)
        params = x.shape[self._axes(x, attrs, "begin_params_axis") :]
        for name, spec in zip(("gamma", "beta"), ins[1:], strict=False):
            if spec.shape != params:
                raise operand_error(
                    self.name, name, f"shape {list(spec.shape)} is not x's shape from begin_params_axis, {list(params)}"
                )
        stat = TensorSpec(F32, x.shape[:begin] + (1,) * (len(x.shape) - begin))
        return [x, stat, stat]

    def compute(self, ins, attrs):
        x, gamma = widen(ins[0]), widen(ins[1])
        axes = tuple(range(self._axes(TensorSpec(ins[0].dtype, ins[0].shape), attrs), x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + float(attrs.get("epsilon", 1e-5))) * gamma
        return [y + widen(ins[2]) if len(ins) == 3 else y, mean, var]

    def cost(self, ins, outs, attrs):
        return _row_cost(ins, outs, outs[1].size)  # one mean per row


@register
class BNInfer(Op):
    """Inference batch norm over dim 1 (x [N, C, ...]): (x - mean) / sqrt(variance + epsilon) * scale + offset,
    the four parameters [C] of a float dtype (CANN's are float32; a graph stored in x's dtype is fine too).
    attr epsilon (default 1e-4). CANN BNInfer (reduce_ops.h, github.com/mindspore-ai/graphengine
    910/third_party/fwkacllib/inc/ops). Elementwise once the statistics are given: Op's streaming cost."""

    name = "BNInfer"
    inputs = (5, 5)
    params = ("scale", "offset", "mean", "variance")

    def infer(self, ins, attrs, outs):
        x = ins[0]
        if x.dtype not in dtypes.FLOATS or len(x.shape) < 2:
            raise operand_error(self.name, "x", f"{x} must be a float tensor [N, C, ...]")
        for name, spec in zip(self.params, ins[1:], strict=True):
            if spec.dtype not in dtypes.FLOATS or spec.shape != x.shape[1:2]:
                raise operand_error(self.name, name, f"{spec} must be a float vector [{x.shape[1]}] (x's channels)")
        return [x]

    def compute(self, ins, attrs):
        x = widen(ins[0])
        shape = (-1,) + (1,) * (x.ndim - 2)
        scale, offset, mean, variance = (widen(p).astype(x.dtype).reshape(shape) for p in ins[1:])
        std = np.sqrt(variance + float(attrs.get("epsilon", 1e-4)))
        return [(x - mean) / std * scale + offset]
