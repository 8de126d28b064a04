"""Resize over H and W of an NCHW tensor: CANN's ONNX-style Resize (image_ops.h, github.com/mindspore-ai/graphengine
910/third_party/fwkacllib/inc/ops), nearest or (bi)linear, with ONNX's coordinate transformations and rounding.

attrs mode ("nearest", "linear"), coordinate_transformation_mode (half_pixel, pytorch_half_pixel, align_corners,
asymmetric), nearest_mode (round_prefer_floor, round_prefer_ceil, floor, ceil), as CANN and ONNX (opset 13 on)
name them; cubic, tf_crop_and_resize and half_pixel_symmetric are not modeled. CANN passes scales or sizes as
tensors; here they are attrs, exactly one of: scales (4 floats, N and C 1.0: the output is floor(in * scale) and a
source coordinate is computed from the scale itself, as ONNX does) or sizes (4 ints: the scale is out / in).
Coordinates are computed in float32, as onnxruntime does, so nearest picks the same rows at ties. Linear
interpolation clamps the source coordinate to the input (edge values beyond it).
"""

from __future__ import annotations

import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, widen

F32 = np.float32
ROUNDING = {
    "round_prefer_floor": lambda c: np.ceil(c - F32(0.5)),
    "round_prefer_ceil": lambda c: np.floor(c + F32(0.5)),
    "floor": np.floor,
    "ceil": np.ceil,
}
CHOICES = {
    "mode": ("nearest", "linear"),
    "coordinate_transformation_mode": ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"),
    "nearest_mode": tuple(ROUNDING),
}


def _source(out_len: int, in_len: int, scale: np.float32, transform: str) -> np.ndarray:
    """The input coordinate of each output position along one axis."""
    o = np.arange(out_len, dtype=F32)
    if transform == "align_corners":
        return o * F32(in_len - 1) / F32(out_len - 1) if out_len > 1 else np.zeros_like(o)
    if transform == "asymmetric":
        return o / scale
    if transform == "pytorch_half_pixel" and out_len <= 1:
        return np.zeros_like(o)
    return (o + F32(0.5)) / scale - F32(0.5)


@register
class Resize(Op):
    name = "Resize"

    def _plan(self, x: TensorSpec, attrs) -> tuple[tuple[int, ...], tuple[np.float32, np.float32]]:
        """The output shape and the (H, W) scales."""
        for key, choices in CHOICES.items():
            if attrs.get(key, choices[0]) not in choices:
                raise operand_error(self.name, f"attr {key}", f"{attrs[key]!r} is not one of {choices} (modeled here)")
        if len(x.shape) != 4 or min(x.shape[2:]) < 1 or x.dtype == np.bool_:
            raise operand_error(self.name, "x", f"{x} is not a number tensor [N, C, H, W] with H, W >= 1")
        if attrs.get("mode", "nearest") == "linear" and x.dtype not in dtypes.FLOATS:
            raise operand_error(self.name, "x", f"linear mode needs a float dtype, got {dtypes.name(x.dtype)}")
        scales, sizes = attrs.get("scales"), attrs.get("sizes")
        if (scales is None) == (sizes is None):
            raise operand_error(self.name, "attrs", "pass exactly one of scales (4 floats) and sizes (4 ints)")
        given = scales if scales is not None else sizes
        if not isinstance(given, list | tuple) or len(given) != 4 or min(given) <= 0:
            which = "attr scales" if scales is not None else "attr sizes"
            raise operand_error(self.name, which, f"{given} is not 4 values > 0")
        if scales is not None:
            hw = tuple(F32(s) for s in scales[2:])
            shape = (*x.shape[:2], *(int(np.floor(F32(n) * s)) for n, s in zip(x.shape[2:], hw, strict=True)))
            if [float(s) for s in scales[:2]] != [1.0, 1.0]:
                raise operand_error(self.name, "attr scales", f"{scales}: N and C are not resized (1.0)")
        else:
            shape = tuple(int(s) for s in sizes)
            hw = tuple(F32(o) / F32(n) for o, n in zip(shape[2:], x.shape[2:], strict=True))
            if shape[:2] != x.shape[:2]:
                raise operand_error(self.name, "attr sizes", f"{sizes}: N and C are not resized ({list(x.shape[:2])})")
        return shape, hw

    def infer(self, ins, attrs, outs):
        shape, _ = self._plan(ins[0], attrs)
        return [TensorSpec(ins[0].dtype, shape)]

    def compute(self, ins, attrs):
        x = ins[0]
        shape, scales = self._plan(TensorSpec(x.dtype, x.shape), attrs)
        transform = attrs.get("coordinate_transformation_mode", "half_pixel")
        axes = list(zip(shape[2:], x.shape[2:], scales, strict=True))
        coords = [(_source(o, n, s, transform), n) for o, n, s in axes]
        if attrs.get("mode", "nearest") == "nearest":
            rounding = ROUNDING[attrs.get("nearest_mode", "round_prefer_floor")]
            rows, cols = (np.clip(rounding(c), 0, n - 1).astype(np.intp) for c, n in coords)
            return [x[:, :, rows][:, :, :, cols]]
        (r0, r1, fr), (c0, c1, fc) = (_neighbours(c, n) for c, n in coords)
        x = widen(x)
        rows = x[:, :, r0] * (1 - fr)[:, None] + x[:, :, r1] * fr[:, None]
        return [rows[..., c0] * (1 - fc) + rows[..., c1] * fc]


def _neighbours(coord: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis: the two input positions around each (clamped) coordinate, and the
    weight of the second."""
    coord = np.clip(coord, 0, length - 1)
    floor = np.floor(coord)
    low = floor.astype(np.intp)
    return low, np.minimum(low + 1, length - 1), coord - floor
