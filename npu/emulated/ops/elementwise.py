"""Elementwise and row-wise vector ops: arithmetic, casts, activations, softmax.

Elementwise kernels stream their bytes through the unified buffer (base.VECTOR_TILE_BYTES a tile, Op's default
cost); softmax gives each vector core whole rows."""

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


@register
class Gelu(Unary):
    """The tanh approximation, as Ascend's Gelu computes it."""

    name = "Gelu"

    def compute(self, ins, attrs):
        x = widen(ins[0])
        return [0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))]


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
