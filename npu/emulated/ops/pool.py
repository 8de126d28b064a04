"""Pooling in NCHW: CANN MaxPoolV3, AvgPoolV2 and GlobalAveragePool (nn_pooling_ops.h,
github.com/mindspore-ai/graphengine 910/third_party/fwkacllib/inc/ops).

MaxPoolV3 and AvgPoolV2 take x [N, C, H, W] and attrs ksize and strides (4 ints in NCHW order, N and C set to 1),
padding_mode ("CALCULATED": pads (top, bottom, left, right) apply; "VALID": none; "SAME" is not modeled, pass
its pads), data_format ("NCHW", the only layout kept here), global_pooling (the window is all of H x W, no
padding) and ceil_mode (conv.window: the output size rounds up). AvgPoolV2 also takes exclusive (default true:
a window's divisor counts only the input it covers; false also counts the pads, not ceil mode's overhang, as
ONNX's count_include_pad and PyTorch do) and divisor_override (> 0: the divisor of every window).

Vector kernels: each input byte read once, each output byte written once (Op's streaming cost).
"""

from __future__ import annotations

import math

import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, streaming_cost, widen
from npu.emulated.ops.conv import Window, nchw, pads, pair, window


class Pool(Op):
    def _window(self, x: TensorSpec, attrs) -> Window:
        nchw(self.name, x, attrs)
        if attrs.get("global_pooling", False):
            return window(self.name, x, x.shape[2:], (1, 1), (1, 1), (0, 0, 0, 0))
        mode = attrs.get("padding_mode", "CALCULATED")
        if mode not in ("CALCULATED", "VALID"):
            raise operand_error(self.name, "attr padding_mode", f"{mode!r} is not modeled: pass its pads, CALCULATED")
        return window(
            self.name,
            x,
            pair(self.name, attrs, "ksize"),
            pair(self.name, attrs, "strides"),
            (1, 1),
            pads(self.name, attrs) if mode == "CALCULATED" else (0, 0, 0, 0),
            bool(attrs.get("ceil_mode", False)),
        )

    def infer(self, ins, attrs, outs):
        x = ins[0]
        win = self._window(x, attrs)
        return [TensorSpec(x.dtype, x.shape[:2] + win.out)]


@register
class MaxPoolV3(Pool):
    name = "MaxPoolV3"

    def infer(self, ins, attrs, outs):
        if ins[0].dtype == np.bool_:
            raise operand_error(self.name, "x", "bool has no order; cast to a number first")
        return super().infer(ins, attrs, outs)

    def compute(self, ins, attrs):
        x = widen(ins[0])
        win = self._window(TensorSpec(ins[0].dtype, ins[0].shape), attrs)
        lowest = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
        y = None
        for _, _, tap in win.taps(win.padded(x, lowest)):
            y = tap.copy() if y is None else np.maximum(y, tap)
        return [y]


@register
class AvgPoolV2(Pool):
    name = "AvgPoolV2"

    def infer(self, ins, attrs, outs):
        if ins[0].dtype not in dtypes.FLOATS:
            raise operand_error(self.name, "x", f"needs a float dtype, got {dtypes.name(ins[0].dtype)}")
        return super().infer(ins, attrs, outs)

    def compute(self, ins, attrs):
        x = widen(ins[0])
        win = self._window(TensorSpec(ins[0].dtype, ins[0].shape), attrs)
        total = sum(tap for _, _, tap in win.taps(win.padded(x, 0)))
        return [total / self._divisor(x.shape, win, attrs)]

    @staticmethod
    def _divisor(shape: tuple[int, ...], win: Window, attrs) -> np.ndarray | int:
        override = int(attrs.get("divisor_override", 0))
        if override > 0:
            return override
        with_pads = not attrs.get("exclusive", True)
        counts = []
        for a in range(2):
            size, begin, end = shape[2 + a], win.pads[2 * a], win.pads[2 * a + 1]
            start = np.arange(win.out[a]) * win.stride[a] - begin
            low, high = (-begin, size + end) if with_pads else (0, size)
            counts.append(np.minimum(start + win.kernel[a], high) - np.maximum(start, low))
        return np.multiply.outer(*counts)


@register
class GlobalAveragePool(Op):
    """y [N, C, 1, ...] = the mean of x [N, C, D1, ...] over every dim after C. Each (n, c) plane is reduced
    where it lies: one tile per plane."""

    name = "GlobalAveragePool"

    def infer(self, ins, attrs, outs):
        x = ins[0]
        if x.dtype not in dtypes.FLOATS or len(x.shape) < 3 or not math.prod(x.shape[2:]):
            raise operand_error(self.name, "x", f"{x} is not a float [N, C, D1, ...] with non-empty D1, ...")
        return [TensorSpec(x.dtype, x.shape[:2] + (1,) * (len(x.shape) - 2))]

    def compute(self, ins, attrs):
        x = widen(ins[0])
        return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)]

    def cost(self, ins, outs, attrs):
        return streaming_cost(ins[0].nbytes + outs[0].nbytes, tiles=math.prod(ins[0].shape[:2]))
