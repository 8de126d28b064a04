"""2-D convolution (CANN Conv2D) in NCHW, run on the cube as the GEMM of its im2col; and the sliding-window
geometry the pools share.

CANN Conv2D (nn_calculation_ops.h, github.com/mindspore-ai/graphengine 910/third_party/fwkacllib/inc/ops):
x [N, Cin, H, W], filter [Cout, Cin/groups, KH, KW], optional bias [Cout]; attrs strides and dilations (4 ints in
x's layout, N and C set to 1), pads (top, bottom, left, right), groups, data_format. The emulated chip keeps NCHW
only, so data_format defaults to "NCHW" here (CANN's default is "NHWC"); pads default to zeros.

Cost: per group the GEMM M = N*Ho*Wo, K = Cin/groups*KH*KW, N = Cout/groups, tiled by matmul's CANN base blocks;
the patches are built in L1 (load3d), so HBM moves x, the filter, the bias and y once. FLOPs are the useful
2*N*Ho*Wo*Cout*(Cin/groups)*KH*KW; the cube's 16-wide fractal padding (a depthwise conv fills one row of 16 in K
and in N) lowers the efficiency instead, so the time is that of the padded GEMM.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, same_dtype, widen
from npu.emulated.ops.matmul import gemm_cost


@dataclass(frozen=True)
class Window:
    """A 2-D window sliding over the H and W of an NCHW input: (H, W) pairs, pads (top, bottom, left, right)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    out: tuple[int, int]

    def padded(self, x: np.ndarray, value) -> np.ndarray:
        """x padded with `value`, at the end also as far as the last window reaches (ceil mode)."""
        widths = [(0, 0)] * (x.ndim - 2)
        for a in range(2):
            begin, end = self.pads[2 * a], self.pads[2 * a + 1]
            reach = (self.out[a] - 1) * self.stride[a] + (self.kernel[a] - 1) * self.dilation[a] + 1
            widths.append((begin, max(end, reach - x.shape[x.ndim - 2 + a] - begin)))
        return np.pad(x, widths, constant_values=value)

    def taps(self, padded: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Per kernel position (i, j): the [..., Ho, Wo] view of the padded input it reads."""
        (kh, kw), (sh, sw), (dh, dw), (ho, wo) = self.kernel, self.stride, self.dilation, self.out
        for i in range(kh):
            rows = slice(i * dh, i * dh + (ho - 1) * sh + 1, sh)
            for j in range(kw):
                yield i, j, padded[..., rows, j * dw : j * dw + (wo - 1) * sw + 1 : sw]


def nchw(op: str, x: TensorSpec, attrs: dict) -> None:
    if len(x.shape) != 4:
        raise operand_error(op, "x", f"{x} is not 4-D [N, C, H, W]")
    if attrs.get("data_format", "NCHW") != "NCHW":
        raise operand_error(op, "attr data_format", f"{attrs['data_format']!r}: the emulated chip keeps NCHW only")


def pair(op: str, attrs: dict, key: str, default: list[int] | None = None) -> tuple[int, int]:
    """An attr of 4 ints in NCHW order whose N and C entries are 1 (strides, dilations, ksize): its (H, W)."""
    value = attrs.get(key, default)
    if value is None:
        raise operand_error(op, f"attr {key}", "is required: 4 ints in NCHW order, N and C set to 1")
    if not isinstance(value, list | tuple) or len(value) != 4 or list(value[:2]) != [1, 1] or min(value) < 1:
        raise operand_error(op, f"attr {key}", f"{value} is not 4 positive ints in NCHW order with N and C set to 1")
    return int(value[2]), int(value[3])


def pads(op: str, attrs: dict) -> tuple[int, int, int, int]:
    value = attrs.get("pads", [0, 0, 0, 0])
    if not isinstance(value, list | tuple) or len(value) != 4 or min(value) < 0:
        raise operand_error(op, "attr pads", f"{value} is not 4 ints >= 0 (top, bottom, left, right)")
    return tuple(int(p) for p in value)


def window(
    op: str,
    x: TensorSpec,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int, int, int],
    ceil_mode: bool = False,
) -> Window:
    """The window over x's H and W, and the output size it gives (rounded up in ceil mode, where a last window
    that would start in the trailing padding is dropped, as PyTorch and ONNX define it)."""
    out = []
    for a in range(2):
        size, begin, end = x.shape[2 + a], pad[2 * a], pad[2 * a + 1]
        span = (kernel[a] - 1) * dilation[a] + 1
        room = size + begin + end - span
        n = (-(-room // stride[a]) if ceil_mode else room // stride[a]) + 1
        if ceil_mode and (n - 1) * stride[a] >= size + begin:
            n -= 1
        if kernel[a] < 1 or room < 0 or n < 1:
            raise operand_error(
                op, "x", f"dim {2 + a} of {list(x.shape)}, padded {begin} + {end}, has no room for a window of {span}"
            )
        out.append(n)
    return Window(kernel, stride, dilation, pad, (out[0], out[1]))


@register
class Conv2D(Op):
    """y [N, Cout, Ho, Wo] = x [N, Cin, H, W] convolved with filter [Cout, Cin/groups, KH, KW] (+ bias [Cout])."""

    name = "Conv2D"
    inputs = (2, 3)

    def _geometry(self, ins: list[TensorSpec], attrs) -> tuple[Window, int]:
        x, w = ins[0], ins[1]
        nchw(self.name, x, attrs)
        if x.dtype not in dtypes.FLOATS:
            raise operand_error(self.name, "x", f"needs a float dtype, got {dtypes.name(x.dtype)}")
        same_dtype(self.name, ins[:2], ("x", "filter"))
        groups = int(attrs.get("groups", 1))
        cin = x.shape[1]
        if len(w.shape) != 4 or groups < 1 or cin % groups or w.shape[0] % groups or w.shape[1] * groups != cin:
            raise operand_error(
                self.name, "filter", f"{w} is not [Cout, Cin/groups, KH, KW] for {cin} channels in {groups} groups"
            )
        if len(ins) == 3 and (ins[2].shape != w.shape[:1] or ins[2].dtype not in dtypes.FLOATS):
            raise operand_error(self.name, "bias", f"{ins[2]} is not a float vector [{w.shape[0]}]")
        dilation = pair(self.name, attrs, "dilations", [1, 1, 1, 1])
        stride = pair(self.name, attrs, "strides")
        return window(self.name, x, w.shape[2:], stride, dilation, pads(self.name, attrs)), groups

    def infer(self, ins, attrs, outs):
        win, _ = self._geometry(ins, attrs)
        return [TensorSpec(ins[0].dtype, (ins[0].shape[0], ins[1].shape[0], *win.out))]

    def compute(self, ins, attrs):
        win, groups = self._geometry([TensorSpec(a.dtype, a.shape) for a in ins], attrs)
        x, w = widen(ins[0]), widen(ins[1])
        (n, cin), cout, (ho, wo) = x.shape[:2], w.shape[0], win.out
        padded = win.padded(x, 0)
        padded = padded.reshape(n, groups, cin // groups, *padded.shape[2:])
        filters = w.reshape(groups, cout // groups, *w.shape[1:])
        y = np.zeros((n, groups, cout // groups, ho * wo), x.dtype)
        for i, j, tap in win.taps(padded):  # one GEMM per kernel position: memory stays O(output)
            y += filters[..., i, j] @ tap.reshape(n, groups, cin // groups, ho * wo)
        y = y.reshape(n, cout, ho, wo)
        if len(ins) == 3:
            y += widen(ins[2]).astype(y.dtype).reshape(-1, 1, 1)
        return [y]

    def cost(self, ins, outs, attrs):
        win, groups = self._geometry(ins, attrs)
        x, w = ins[0], ins[1]
        m, k = x.shape[0] * win.out[0] * win.out[1], w.size // max(w.shape[0], 1)
        padded = gemm_cost(ins, outs, groups, m, k, w.shape[0] // groups)
        if not padded.flops:
            return padded
        flops = 2.0 * m * w.shape[0] * k
        return replace(padded, flops=flops, efficiency=padded.efficiency * flops / padded.flops)
