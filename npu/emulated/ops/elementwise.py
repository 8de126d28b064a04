"""Elementwise and row-wise vector ops: arithmetic, casts, activations, clipping, softmax.

Elementwise kernels stream their bytes through the unified buffer (base.VECTOR_TILE_BYTES a tile, Op's default
cost); softmax gives each vector core whole rows. Op types, inputs and attrs are CANN's (op_proto headers
elewise_calculation_ops.h and nonlinear_fuc_ops.h, e.g. github.com/mindspore-ai/graphengine, 910/third_party/
fwkacllib/inc/ops/); where CANN passes a scalar as a tensor (ClipByValue's bounds) an attr may carry it instead."""

from __future__ import annotations

import math

import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import (
    Op,
    TensorSpec,
    axis,
    broadcast,
    operand_error,
    register,
    same_dtype,
    streaming_cost,
    widen,
)


class Binary(Op):
    inputs = (2, 2)
    fn = staticmethod(np.add)
    takes_bool = True  # Add and Mul are logical or / and on bools; Sub and Div have no bool meaning

    def infer(self, ins, attrs, outs):
        dtype = same_dtype(self.name, ins, ("x1", "x2"))
        if dtype == np.bool_ and not self.takes_bool:
            raise operand_error(self.name, "x1", "bool has no meaning here; cast to a number first")
        return [TensorSpec(dtype, broadcast(self.name, ins[0], ins[1]))]

    def compute(self, ins, attrs):
        a, b = (widen(x) for x in ins)
        return [self.fn(a, b)]


@register
class Add(Binary):
    name = "Add"
    aliases = ("AddV2",)
    fn = staticmethod(np.add)


@register
class Sub(Binary):
    name = "Sub"
    fn = staticmethod(np.subtract)
    takes_bool = False


@register
class Mul(Binary):
    name = "Mul"
    fn = staticmethod(np.multiply)


@register
class Div(Binary):
    """Integer division truncates toward zero (C semantics); division by zero gives 0 for integers."""

    name = "Div"
    aliases = ("RealDiv",)
    takes_bool = False

    def compute(self, ins, attrs):
        a, b = np.broadcast_arrays(*ins)
        if np.issubdtype(a.dtype, np.integer):
            safe = np.where(b == 0, 1, b)
            quotient = np.abs(a) // np.abs(safe)  # exact in integers (float64 would lose int64 above 2**53)
            return [np.where(b == 0, 0, np.where((a < 0) != (safe < 0), -quotient, quotient))]
        return [widen(a) / widen(b)]


@register
class Cast(Op):
    """attr dst_type: the aclDataType to cast to."""

    name = "Cast"

    def infer(self, ins, attrs, outs):
        if "dst_type" not in attrs:
            raise operand_error(self.name, "attr dst_type", "missing (the aclDataType to cast to)")
        return [TensorSpec(dtypes.from_acl(attrs["dst_type"], "Cast attr dst_type"), ins[0].shape)]

    def compute(self, ins, attrs):
        return [ins[0]]  # the write casts to the declared output dtype


class Unary(Op):
    def infer(self, ins, attrs, outs):
        if ins[0].dtype not in dtypes.FLOATS:
            raise operand_error(self.name, "x", f"needs a float dtype, got {dtypes.name(ins[0].dtype)}")
        return [ins[0]]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@register
class Swish(Unary):
    """x * sigmoid(scale * x); attr scale (default 1.0, which is SiLU)."""

    name = "Swish"
    aliases = ("SiLU", "Silu")

    def compute(self, ins, attrs):
        x = widen(ins[0])
        return [x * _sigmoid(float(attrs.get("scale", 1.0)) * x)]


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0: the Chebyshev fit of Numerical Recipes (erfcc),
# fractional error below 1.2e-7 everywhere, so GELU's far negative tail keeps its relative precision (numpy has
# no erf). Coefficients of P from t^0 up.
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
         -0.82215223, 0.17087277)  # fmt: skip


def _erfc(x: np.ndarray) -> np.ndarray:
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = np.zeros_like(t)
    for c in reversed(_ERFC):
        poly = poly * t + c
    tail = t * np.exp(poly - z * z)
    return np.where(x >= 0, tail, 2.0 - tail)


@register
class Gelu(Unary):
    """The tanh approximation, as Ascend's Gelu computes it."""

    name = "Gelu"

    def compute(self, ins, attrs):
        return [_gelu_tanh(widen(ins[0]))]


@register
class GeluV2(Unary):
    """attr approximate: "none" (default: x * Phi(x), the erf form) or "tanh". CANN GeluV2
    (github.com/hicann/ops-nn, activation/gelu_v2/op_host/gelu_v2_def.cpp)."""

    name = "GeluV2"
    forms = ("none", "tanh")

    def infer(self, ins, attrs, outs):
        if attrs.get("approximate", "none") not in self.forms:
            raise operand_error(self.name, "attr approximate", f"{attrs['approximate']!r} is not one of {self.forms}")
        return super().infer(ins, attrs, outs)

    def compute(self, ins, attrs):
        x = widen(ins[0])
        if attrs.get("approximate", "none") == "tanh":
            return [_gelu_tanh(x)]
        return [0.5 * x * _erfc(-x / np.sqrt(2.0).astype(x.dtype))]


@register
class Sigmoid(Unary):
    """1 / (1 + exp(-x)). CANN Sigmoid (nonlinear_fuc_ops.h)."""

    name = "Sigmoid"

    def compute(self, ins, attrs):
        return [_sigmoid(widen(ins[0]))]


@register
class LeakyRelu(Unary):
    """x where x > 0, else negative_slope * x; attr negative_slope (default 0.0). CANN LeakyRelu
    (nonlinear_fuc_ops.h)."""

    name = "LeakyRelu"

    def compute(self, ins, attrs):
        x = widen(ins[0])
        return [np.where(x > 0, x, x * float(attrs.get("negative_slope", 0.0)))]


class Numeric(Op):
    """Elementwise on any number dtype (bool has no order or scale); the output is x's spec."""

    def infer(self, ins, attrs, outs):
        if ins[0].dtype == np.bool_:
            raise operand_error(self.name, "x", "bool has no meaning here; cast to a number first")
        return [ins[0]]


@register
class Relu(Numeric):
    """max(x, 0). CANN Relu (nonlinear_fuc_ops.h)."""

    name = "Relu"

    def compute(self, ins, attrs):
        return [np.maximum(widen(ins[0]), 0)]


@register
class Relu6(Numeric):
    """min(max(x, 0), 6). CANN Relu6 (nonlinear_fuc_ops.h)."""

    name = "Relu6"

    def compute(self, ins, attrs):
        return [np.minimum(np.maximum(widen(ins[0]), 0), 6)]


@register
class ClipByValue(Numeric):
    """min(max(x, clip_value_min), clip_value_max). The bounds are CANN's two tensor inputs (x's dtype,
    broadcasting to x) or, without them, attrs clip_value_min and clip_value_max. CANN ClipByValue
    (elewise_calculation_ops.h)."""

    name = "ClipByValue"
    inputs = (1, 3)
    bounds = ("clip_value_min", "clip_value_max")

    def infer(self, ins, attrs, outs):
        x = super().infer(ins, attrs, outs)[0]
        if len(ins) == 3:
            for name, bound in zip(self.bounds, ins[1:], strict=True):
                try:
                    fits = bound.dtype == x.dtype and np.broadcast_shapes(x.shape, bound.shape) == x.shape
                except ValueError:
                    fits = False
                if not fits:
                    raise operand_error(self.name, name, f"{bound} must have x's dtype and broadcast to x's {x}")
        elif len(ins) == 2 or not set(self.bounds) <= attrs.keys():
            raise operand_error(
                self.name, "bounds", "pass clip_value_min and clip_value_max as two more inputs or as attrs"
            )
        return [x]

    def compute(self, ins, attrs):
        low, high = (widen(b) for b in ins[1:]) if len(ins) == 3 else (attrs[b] for b in self.bounds)
        return [np.minimum(np.maximum(widen(ins[0]), low), high)]


@register
class Muls(Numeric):
    """x * attr value (a float scalar). CANN Muls (elewise_calculation_ops.h)."""

    name = "Muls"

    def infer(self, ins, attrs, outs):
        if "value" not in attrs:
            raise operand_error(self.name, "attr value", "is required: the scalar to multiply by")
        return super().infer(ins, attrs, outs)

    def compute(self, ins, attrs):
        return [widen(ins[0]) * float(attrs["value"])]


@register
class SwiGlu(Op):
    """Split x in two halves along attr dim (default -1): silu(first) * second."""

    name = "SwiGlu"

    def infer(self, ins, attrs, outs):
        x = ins[0]
        if x.dtype not in dtypes.FLOATS:
            raise operand_error(self.name, "x", f"needs a float dtype, got {dtypes.name(x.dtype)}")
        dim = axis(self.name, int(attrs.get("dim", -1)), len(x.shape), "attr dim")
        if x.shape[dim] % 2:
            raise operand_error(self.name, "x", f"dim {dim} has odd size {x.shape[dim]}; it must split in two")
        shape = list(x.shape)
        shape[dim] //= 2
        return [TensorSpec(x.dtype, tuple(shape))]

    def compute(self, ins, attrs):
        x = widen(ins[0])
        a, b = np.split(x, 2, axis=int(attrs.get("dim", -1)))
        return [a * _sigmoid(a) * b]


@register
class SoftmaxV2(Unary):
    """Softmax over attr axes (default [-1])."""

    name = "SoftmaxV2"
    aliases = ("Softmax",)

    def infer(self, ins, attrs, outs):
        x = ins[0]
        for a in attrs.get("axes", [-1]):
            d = axis(self.name, int(a), len(x.shape), "attr axes")
            if x.shape[d] == 0:
                raise operand_error(self.name, "x", f"dimension {d} of {list(x.shape)} is empty: nothing to normalize")
        return super().infer(ins, attrs, outs)

    def compute(self, ins, attrs):
        x = widen(ins[0])
        axes = tuple(int(a) for a in attrs.get("axes", [-1]))
        e = np.exp(x - x.max(axis=axes, keepdims=True))
        return [e / e.sum(axis=axes, keepdims=True)]

    def cost(self, ins, outs, attrs):
        x = ins[0]
        row = math.prod(x.shape[int(a)] for a in attrs.get("axes", [-1]))
        return streaming_cost(x.nbytes + outs[0].nbytes, tiles=x.size // max(row, 1))
