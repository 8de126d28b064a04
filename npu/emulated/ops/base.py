"""The operator framework: what an op declares (shape/dtype inference, numpy kernel, cost), how a launch
description is checked against it, and the task that runs a checked kernel on device memory.

Numerics: float inputs are computed in float32 (float64 stays float64) and cast to the declared output
dtype, as Ascend kernels accumulate fp16/bf16 in fp32. Costs count cube FLOPs (matrix multiplies and
attention) and HBM bytes read plus written; vector arithmetic is bandwidth-bound on the chip and is carried
by its bytes. Cost functions are O(1) in the data: they see shapes only, and run once per bind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from npu.emulated import dtypes
from npu.errors import AclError, FlexNPUError, InvalidParam
from npu.memory import Region
from npu.tasks import Cost, Unit

# A vector kernel streams its data through the 192 KiB unified buffer of its AIV core (CANN platform_config
# ub_size = 196608 on 910B2/B3/B4), double buffered: one half is being computed while the other is loaded or
# stored. So one tile moves at most VECTOR_TILE_BYTES of HBM traffic (reads plus writes) — this model's
# choice, not a measurement.
VECTOR_TILE_BYTES = 96 << 10


@dataclass(frozen=True)
class TensorSpec:
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{dtypes.name(self.dtype)}{list(self.shape)}"


class Op:
    """One operator type. Subclasses set `name`, the input count range, and implement infer/compute;
    the default cost is every input read and every output written once."""

    name = ""
    aliases: tuple[str, ...] = ()
    inputs: tuple[int, int] = (1, 1)  # min, max

    def infer(self, ins: list[TensorSpec], attrs: dict, outs: list[TensorSpec]) -> list[TensorSpec]:
        """The outputs this op produces from these inputs (`outs`, the declared ones, only for ops such as
        Reshape whose output shape is the caller's choice). Raises InvalidParam naming the operand."""
        raise NotImplementedError

    def compute(self, ins: list[np.ndarray], attrs: dict) -> list[np.ndarray]:
        raise NotImplementedError

    def cost(self, ins: list[TensorSpec], outs: list[TensorSpec], attrs: dict) -> Cost:
        return streaming_cost(sum(t.nbytes for t in ins) + sum(t.nbytes for t in outs))


def streaming_cost(hbm_bytes: int, tiles: int | None = None) -> Cost:
    """A vector kernel moving `hbm_bytes`, cut into `tiles` pieces (default: unified-buffer tiles)."""
    if tiles is None:
        tiles = -(-hbm_bytes // VECTOR_TILE_BYTES)
    return Cost(hbm_bytes=hbm_bytes, unit=Unit.VECTOR, tiles=max(tiles, 1))


REGISTRY: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    op = cls()
    for name in (cls.name, *cls.aliases):
        REGISTRY[name] = op
    return cls


class OpNotFound(FlexNPUError):
    code = AclError.OP_NOT_FOUND


def operand_error(op: str, which: str, message: str) -> InvalidParam:
    return InvalidParam(f"{op} {which}: {message}")


# What numpy and the ops' own arithmetic raise on operands an op's checks did not foresee. Such an input is the
# caller's error (ACL_ERROR_INVALID_PARAM naming the op and its operands), never a daemon traceback.
UNFORESEEN = (ArithmeticError, IndexError, KeyError, TypeError, ValueError)


def _unforeseen(op_type: str, what: str, exc: Exception, ins, attrs: dict) -> InvalidParam:
    operands = ", ".join(str(t) for t in ins)
    return InvalidParam(
        f"{op_type}: {what} on inputs [{operands}] with attrs {sorted(attrs)} ({exc!r}); check the operands' "
        "shapes and dtypes and the attrs against the operator's definition"
    )


@dataclass(frozen=True)
class Kernel:
    """A checked launch description: op, operand specs, attributes, and its cost (computed once)."""

    op_type: str
    op: Op
    ins: tuple[TensorSpec, ...]
    outs: tuple[TensorSpec, ...]
    attrs: dict = field(hash=False)
    cost: Cost = field(hash=False, default=Cost())


def bind(op_type: str, ins: list[TensorSpec], outs: list[TensorSpec], attrs: dict) -> Kernel:
    """Check a description against its op; errors name the op and the operand."""
    op = REGISTRY.get(op_type)
    if op is None:
        raise OpNotFound(f"operator {op_type!r} not found in the emulated op library (see npu/emulated/ops)")
    low, high = op.inputs
    if not low <= len(ins) <= high:
        want = str(low) if low == high else f"{low}-{high}"
        raise operand_error(op_type, "inputs", f"takes {want} inputs, got {len(ins)}")
    try:
        expected = op.infer(list(ins), attrs, list(outs))
        if len(outs) != len(expected):
            raise operand_error(op_type, "outputs", f"produces {len(expected)} outputs, {len(outs)} were declared")
        for i, (declared, produced) in enumerate(zip(outs, expected, strict=True)):
            if declared.shape != produced.shape or declared.dtype != produced.dtype:
                raise operand_error(op_type, f"output {i}", f"declared {declared}, the op produces {produced}")
        cost = op.cost(list(ins), list(outs), attrs)
    except UNFORESEEN as exc:
        raise _unforeseen(
            op_type, "the description does not fit the operator (an attribute is wrong, or an operand)", exc, ins, attrs
        ) from None
    return Kernel(op_type, op, tuple(ins), tuple(outs), attrs, cost)


@dataclass(frozen=True, slots=True)
class KernelTask:
    """A kernel launch on physical memory: numerics in numeric mode, cost always."""

    kernel: Kernel
    inputs: tuple[Region, ...]
    outputs: tuple[Region, ...]

    @property
    def name(self) -> str:
        return self.kernel.op_type

    def cost(self) -> Cost:
        return self.kernel.cost

    def run(self) -> None:
        views = [r.view() for r in (*self.inputs, *self.outputs)]
        if any(v is None for v in views):
            return  # timing mode (or freed memory): shapes only
        ins = [_array(v, t) for v, t in zip(views, self.kernel.ins, strict=False)]
        kernel = self.kernel
        with np.errstate(all="ignore"):  # as on the chip: x/0 is inf, 0/0 NaN, and nothing stops
            try:
                results = kernel.op.compute([a.copy() for a in ins], kernel.attrs)
            except UNFORESEEN as exc:
                raise _unforeseen(kernel.op_type, "cannot compute", exc, kernel.ins, kernel.attrs) from None
        for view, spec, result in zip(views[len(ins) :], self.kernel.outs, results, strict=True):
            _array(view, spec)[...] = np.asarray(result).astype(spec.dtype, copy=False).reshape(spec.shape)


def _array(view: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return view[: spec.nbytes].view(spec.dtype).reshape(spec.shape)


# -- helpers for op definitions --------------------------------------------------------------------------


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """Floats compute in float32 (float64 stays); integers and bools as they are."""
    if dtype in dtypes.FLOATS:
        return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    return dtype


def widen(array: np.ndarray) -> np.ndarray:
    return array.astype(compute_dtype(array.dtype), copy=False)


def same_dtype(op: str, ins: list[TensorSpec], names: tuple[str, ...]) -> np.dtype:
    dtype = ins[0].dtype
    for spec, name in zip(ins, names, strict=False):
        if spec.dtype != dtype:
            raise operand_error(op, name, f"dtype {dtypes.name(spec.dtype)} differs from {dtypes.name(dtype)}")
    return dtype


def broadcast(op: str, a: TensorSpec, b: TensorSpec) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(a.shape, b.shape))
    except ValueError:
        raise operand_error(op, "x2", f"shape {list(b.shape)} does not broadcast with x1 {list(a.shape)}") from None


def axis(op: str, value: int, rank: int, what: str = "axis") -> int:
    if not -rank <= value < rank:
        raise operand_error(op, what, f"{value} is out of range for rank {rank}")
    return value % rank
