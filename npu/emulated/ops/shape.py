"""Data movement: gather (embeddings), concat, split, transpose, reshape, identity, argmax, scatter (KV-cache
writes).

Where Ascend passes an axis, permutation or shape as an input tensor, the emulated op takes the same value
as an attribute (its launch description must be checked before any data exists); a tensor input of the
same meaning is accepted and checked against it when the kernel runs.
"""

from __future__ import annotations

import math

import numpy as np

from npu.emulated.ops.base import Op, TensorSpec, axis, operand_error, register, streaming_cost
from npu.errors import InvalidParam
from npu.tasks import Cost, Unit

INDEX_TYPES = (np.dtype(np.int32), np.dtype(np.int64))


def _index(op: str, spec: TensorSpec, name: str) -> None:
    if spec.dtype not in INDEX_TYPES:
        raise operand_error(op, name, f"must be int32 or int64, got {spec.dtype.name}")


def _scalar_input(op: str, ins: list[np.ndarray], i: int, expected, what: str) -> None:
    """A value passed both as attr and as tensor input must agree."""
    if len(ins) > i and list(np.asarray(ins[i]).reshape(-1)) != list(np.atleast_1d(expected)):
        raise InvalidParam(f"{op} {what}: tensor input {ins[i].reshape(-1).tolist()} differs from attr {expected}")


@register
class GatherV2(Op):
    """Rows of x picked by indices along attr axis (default 0): the embedding lookup."""

    name = "GatherV2"
    aliases = ("Gather",)
    inputs = (2, 3)

    def infer(self, ins, attrs, outs):
        x, indices = ins[0], ins[1]
        _index(self.name, indices, "indices")
        a = axis(self.name, int(attrs.get("axis", 0)), len(x.shape), "attr axis")
        return [TensorSpec(x.dtype, x.shape[:a] + indices.shape + x.shape[a + 1 :])]

    def compute(self, ins, attrs):
        a = int(attrs.get("axis", 0))
        _scalar_input(self.name, ins, 2, a, "axis")
        x, indices = ins[0], ins[1]
        if indices.size and (indices.min() < 0 or indices.max() >= x.shape[a]):
            raise InvalidParam(f"{self.name} indices: values outside [0, {x.shape[a]}) on axis {a}")
        return [np.take(x, indices, axis=a)]

    def cost(self, ins, outs, attrs):
        a = axis(self.name, int(attrs.get("axis", 0)), len(ins[0].shape))
        rows = math.prod(ins[0].shape[:a]) * ins[1].size  # one tile per gathered row
        return streaming_cost(ins[1].nbytes + 2 * outs[0].nbytes, tiles=rows)  # only the gathered rows are read


@register
class ConcatD(Op):
    """Inputs joined along attr concat_dim (default 0)."""

    name = "ConcatD"
    aliases = ("Concat",)
    inputs = (1, 256)

    def infer(self, ins, attrs, outs):
        first = ins[0]
        d = axis(self.name, int(attrs.get("concat_dim", 0)), len(first.shape), "attr concat_dim")
        for i, t in enumerate(ins[1:], 1):
            if t.dtype != first.dtype or len(t.shape) != len(first.shape):
                raise operand_error(self.name, f"input {i}", f"{t} does not match input 0's {first}")
            if t.shape[:d] + t.shape[d + 1 :] != first.shape[:d] + first.shape[d + 1 :]:
                raise operand_error(self.name, f"input {i}", f"shape {list(t.shape)} differs off dim {d}")
        shape = list(first.shape)
        shape[d] = sum(t.shape[d] for t in ins)
        return [TensorSpec(first.dtype, tuple(shape))]

    def compute(self, ins, attrs):
        return [np.concatenate(ins, axis=int(attrs.get("concat_dim", 0)))]


@register
class SplitVD(Op):
    """x cut along attr split_dim into attr num_split pieces of attr size_splits (one entry may be -1: the rest);
    without size_splits, equal pieces (SplitD). CANN SplitVD; SplitV takes size_splits and split_dim as tensor
    inputs (split_combination_ops.h, github.com/mindspore-ai/graphengine 910/third_party/fwkacllib/inc/ops)."""

    name = "SplitVD"
    aliases = ("SplitV", "SplitD")
    inputs = (1, 3)

    def _sizes(self, x: TensorSpec, attrs) -> tuple[int, list[int]]:
        if "split_dim" not in attrs:
            raise operand_error(self.name, "attr split_dim", "is required: the dim to split along")
        d = axis(self.name, int(attrs["split_dim"]), len(x.shape), "attr split_dim")
        length = x.shape[d]
        count = int(attrs.get("num_split", len(attrs.get("size_splits", ())) or 1))
        sizes = [int(s) for s in attrs.get("size_splits", [])]
        if not sizes:
            if count < 1 or length % count:
                raise operand_error(self.name, "attr num_split", f"{count} does not divide dim {d} of size {length}")
            sizes = [length // count] * count
        if sizes.count(-1) == 1:
            sizes[sizes.index(-1)] = length - (sum(sizes) + 1)
        if len(sizes) != count or min(sizes) < 0 or sum(sizes) != length:
            raise operand_error(
                self.name, "attr size_splits", f"{sizes} are not {count} sizes adding up to dim {d}'s {length}"
            )
        return d, sizes

    def infer(self, ins, attrs, outs):
        x = ins[0]
        d, sizes = self._sizes(x, attrs)
        return [TensorSpec(x.dtype, x.shape[:d] + (s,) + x.shape[d + 1 :]) for s in sizes]

    def compute(self, ins, attrs):
        d, sizes = self._sizes(TensorSpec(ins[0].dtype, ins[0].shape), attrs)
        _scalar_input(self.name, ins, 1, [int(s) for s in attrs.get("size_splits", sizes)], "size_splits")
        _scalar_input(self.name, ins, 2, int(attrs["split_dim"]), "split_dim")
        return np.split(ins[0], np.cumsum(sizes)[:-1], axis=d)


@register
class Identity(Op):
    """y = x, a copy. CANN Identity (array_ops.h, github.com/mindspore-ai/graphengine
    910/third_party/fwkacllib/inc/ops)."""

    name = "Identity"

    def infer(self, ins, attrs, outs):
        return [ins[0]]

    def compute(self, ins, attrs):
        return [ins[0]]


@register
class Transpose(Op):
    """Permute x's dims by attr perm."""

    name = "Transpose"
    aliases = ("TransposeD",)
    inputs = (1, 2)

    def infer(self, ins, attrs, outs):
        x = ins[0]
        if "perm" not in attrs:
            raise operand_error(self.name, "attr perm", f"is required: the order of x's {len(x.shape)} dims")
        perm = [int(p) for p in attrs["perm"]]
        if sorted(perm) != list(range(len(x.shape))):
            raise operand_error(self.name, "attr perm", f"{perm} is not a permutation of {len(x.shape)} dims")
        return [TensorSpec(x.dtype, tuple(x.shape[p] for p in perm))]

    def compute(self, ins, attrs):
        perm = [int(p) for p in attrs["perm"]]
        _scalar_input(self.name, ins, 1, perm, "perm")
        return [np.transpose(ins[0], perm)]


@register
class Reshape(Op):
    """Metadata only: the declared output's shape, same dtype and element count. Costs nothing but its launch
    (one tile, no bytes); when the output is another buffer the bytes are copied in numeric mode (on the chip
    they would be aliased)."""

    name = "Reshape"
    inputs = (1, 2)

    def infer(self, ins, attrs, outs):
        x = ins[0]
        target = outs[0].shape if outs else x.shape
        out = TensorSpec(x.dtype, target)
        if out.size != x.size:
            raise operand_error(self.name, "output 0", f"{list(target)} holds {out.size} elements, x has {x.size}")
        return [out]

    def compute(self, ins, attrs):
        return [ins[0].reshape(-1)]

    def cost(self, ins, outs, attrs):
        return Cost(unit=Unit.VECTOR)


@register
class ArgMaxV2(Op):
    """Index of the maximum along attr dimension (default -1); attr dtype: 3 (int32, default) or 9 (int64)."""

    name = "ArgMaxV2"
    aliases = ("ArgMax",)
    inputs = (1, 2)

    def infer(self, ins, attrs, outs):
        x = ins[0]
        d = axis(self.name, int(attrs.get("dimension", -1)), len(x.shape), "attr dimension")
        if x.shape[d] == 0:
            raise operand_error(self.name, "x", f"dimension {d} of {list(x.shape)} is empty: it has no maximum")
        out_type = {3: np.int32, 9: np.int64}.get(int(attrs.get("dtype", 3)))
        if out_type is None:
            raise operand_error(self.name, "attr dtype", "must be 3 (int32) or 9 (int64)")
        return [TensorSpec(np.dtype(out_type), x.shape[:d] + x.shape[d + 1 :])]

    def compute(self, ins, attrs):
        d = int(attrs.get("dimension", -1))
        _scalar_input(self.name, ins, 1, d, "dimension")
        x = ins[0].astype(np.float32) if ins[0].dtype.kind == "V" or ins[0].dtype.itemsize == 2 else ins[0]
        return [np.argmax(x, axis=d)]

    def cost(self, ins, outs, attrs):
        return streaming_cost(ins[0].nbytes + outs[0].nbytes, tiles=outs[0].size)  # one tile per row reduced


@register
class ScatterUpdate(Op):
    """var[indices] = updates along dim 0; the output is the updated var (usually the same buffer)."""

    name = "ScatterUpdate"
    inputs = (3, 3)

    def infer(self, ins, attrs, outs):
        var, indices, updates = ins
        _index(self.name, indices, "indices")
        if not var.shape:
            raise operand_error(self.name, "var", "is a scalar; it needs a first dim to scatter rows into")
        expected = indices.shape + var.shape[1:]
        if updates.shape != expected or updates.dtype != var.dtype:
            raise operand_error(self.name, "updates", f"is {updates}, expected {TensorSpec(var.dtype, expected)}")
        return [var]

    def compute(self, ins, attrs):
        var, indices, updates = ins
        if indices.size and (indices.min() < 0 or indices.max() >= var.shape[0]):
            raise InvalidParam(f"{self.name} indices: values outside [0, {var.shape[0]})")
        var[indices] = updates
        return [var]

    def cost(self, ins, outs, attrs):
        # in place: only the updated rows move, one tile per row
        return streaming_cost(ins[1].nbytes + 2 * ins[2].nbytes, tiles=ins[1].size)
