"""One ONNX node -> CANN ops of the emulated op library (npu/emulated/ops): flexnpu-atc's lowering step.

ONNX semantics are those of opsets 13 to 20 (Softmax over one axis, Split's sizes as an input, Resize's inputs X,
roi, scales, sizes). Constant inputs that CANN ops take as attributes (Reshape's shape, Resize's scales, Clip's
bounds, Split's sizes) become attrs or declared output shapes: a Lowered op's inputs are only tensors the runtime
passes as device buffers. Every lowered op is checked against the op library (bind) with the static shapes, so
what the runtime would refuse is refused here, naming the node. Tensors a lowering introduces are named
"{node name}/{what}". An attribute or input combination not lowered is a LoweringError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from npu.emulated import dtypes
from npu.emulated.ops import TensorSpec, bind
from npu.errors import FlexNPUError

Spec = tuple[tuple[int, ...], np.dtype]
F32 = np.dtype(np.float32)


@dataclass(frozen=True)
class Lowered:
    """One CANN op of the .om graph: a type registered in npu.emulated.ops.REGISTRY, tensor names, and attrs as
    name -> (kind, value), kind one of interposer.wire.AttrKind's names in lower case."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, tuple[str, object]]


class LoweringError(Exception):
    """An ONNX node, attribute or input combination this lowering cannot express; the message names it."""


def attrs(**values) -> dict[str, tuple[str, object]]:
    """Lowered attrs, each kind read off its Python value (a list's from its first item; an empty one is ints)."""
    return {name: _attr(value) for name, value in values.items()}


def _attr(value) -> tuple[str, object]:
    if isinstance(value, bool | np.bool_):
        return "bool", bool(value)
    if isinstance(value, int | np.integer):
        return "int", int(value)
    if isinstance(value, float | np.floating):
        return "float", float(value)
    if isinstance(value, str):
        return "string", value
    items = [_attr(v) for v in value]
    return f"list_{items[0][0] if items else 'int'}", [v for _, v in items]


class _Node:
    """The node being lowered, with its tensors' specs and constants, and the new tensors its lowering makes."""

    def __init__(self, node: onnx.NodeProto, shapes: dict[str, Spec], constants: dict[str, np.ndarray]) -> None:
        self.node, self.shapes, self.constants = node, shapes, constants
        self.prefix = node.name or node.output[0]
        self.new: dict[str, Spec] = {}
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def error(self, message: str) -> LoweringError:
        return LoweringError(f"{self.node.op_type} node {self.node.name!r}: {message}")

    def known(self, *names: str) -> None:
        """Refuse an attribute this lowering does not read."""
        for name in self.attributes:
            if name not in names:
                raise self.error(f"attribute {name!r} is not supported (this lowering reads {list(names) or 'none'})")

    def attr(self, name: str, default=None):
        value = self.attributes.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def refuse(self, name: str, value, supported) -> None:
        raise self.error(f"attribute {name}={value!r} is not supported (supported: {supported})")

    def input(self, i: int) -> str | None:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def output(self, i: int = 0) -> str | None:
        return self.node.output[i] if i < len(self.node.output) and self.node.output[i] else None

    def spec(self, name: str) -> Spec:
        spec = self.shapes.get(name, self.new.get(name))
        if spec is None:
            raise self.error(f"tensor {name!r} has no static shape")
        return tuple(spec[0]), np.dtype(spec[1])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.spec(name)[0]

    def const(self, i: int) -> np.ndarray | None:
        """Input i's value (None when the input is left out): it must be a constant, the CANN op takes it as an
        attribute."""
        name = self.input(i)
        if name is None:
            return None
        if name not in self.constants:
            raise self.error(f"input {i} ({name!r}) must be a constant (an initializer, or folded from constants)")
        return np.asarray(self.constants[name])

    def tensor(self, what: str, shape, dtype) -> str:
        name = f"{self.prefix}/{what}"
        self.new[name] = (tuple(int(d) for d in shape), np.dtype(dtype))
        return name

    def reshaped(self, name: str, what: str, shape) -> tuple[str, Lowered]:
        """A new tensor holding `name` in `shape`, and the Reshape that makes it."""
        target = self.tensor(what, shape, self.spec(name)[1])
        return target, Lowered("Reshape", (name,), (target,), {})


_LOWERINGS: dict[str, Callable[[_Node], list[Lowered]]] = {}


def _lowers(*op_types: str):
    def register(fn: Callable[[_Node], list[Lowered]]):
        for op_type in op_types:
            _LOWERINGS[op_type] = fn
        return fn

    return register


def lower(
    node: onnx.NodeProto, shapes: dict[str, Spec], constants: dict[str, np.ndarray]
) -> tuple[list[Lowered], dict[str, Spec]]:
    """The CANN ops for `node` (usually one) and the specs of the tensors the lowering introduced."""
    n = _Node(node, shapes, constants)
    fn = _LOWERINGS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if fn is None:
        raise n.error(f"op {node.domain + '.' if node.domain else ''}{node.op_type} has no lowering to CANN ops")
    ops = fn(n)
    for op in ops:
        ins, outs = ([TensorSpec(n.spec(t)[1], n.spec(t)[0]) for t in names] for names in (op.inputs, op.outputs))
        try:
            bind(op.op, ins, outs, {name: value for name, (_, value) in op.attrs.items()})
        except FlexNPUError as exc:
            raise n.error(f"lowered to {op.op}, which does not take it: {exc}") from None
    return ops, n.new


# -- elementwise and activations ------------------------------------------------------------------------------

SAME_NAME = ("Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Identity")


@_lowers(*SAME_NAME)
def _same_name(n: _Node) -> list[Lowered]:
    n.known()
    return [Lowered(n.node.op_type, tuple(n.node.input), (n.output(),), {})]


@_lowers("LeakyRelu")
def _leaky_relu(n: _Node) -> list[Lowered]:
    n.known("alpha")
    return [Lowered("LeakyRelu", (n.input(0),), (n.output(),), attrs(negative_slope=float(n.attr("alpha", 0.01))))]


@_lowers("Gelu")
def _gelu(n: _Node) -> list[Lowered]:
    n.known("approximate")
    return [Lowered("GeluV2", (n.input(0),), (n.output(),), attrs(approximate=n.attr("approximate", "none")))]


@_lowers("Clip")
def _clip(n: _Node) -> list[Lowered]:
    """Relu6 for [0, 6], Relu for [0, inf), else ClipByValue with the bounds as attrs (a missing one is the
    dtype's extreme)."""
    n.known("min", "max")  # opset 6 took the bounds as attributes
    x, y = n.input(0), n.output()
    dtype = n.spec(x)[1]
    bounds = []
    for i, key in ((1, "min"), (2, "max")):
        value = n.attr(key) if key in n.attributes else n.const(i)
        bounds.append(None if value is None else np.asarray(value).item())
    low, high = bounds
    if low is None and high is None:
        return [Lowered("Identity", (x,), (y,), {})]
    if low == 0 and high in (6, None):
        return [Lowered("Relu6" if high == 6 else "Relu", (x,), (y,), {})]
    info = np.iinfo(dtype) if dtype.kind in "iu" else ml_dtypes.finfo(dtype)
    number = int if dtype.kind in "iu" else float
    low, high = (number(info.min if low is None else low), number(info.max if high is None else high))
    return [Lowered("ClipByValue", (x,), (y,), attrs(clip_value_min=low, clip_value_max=high))]


@_lowers("Softmax")
def _softmax(n: _Node) -> list[Lowered]:
    n.known("axis")
    return [Lowered("SoftmaxV2", (n.input(0),), (n.output(),), attrs(axes=[int(n.attr("axis", -1))]))]


@_lowers("Cast")
def _cast(n: _Node) -> list[Lowered]:
    n.known("to", "saturate")  # saturate concerns float8 only
    to = n.attr("to")
    code = dtypes.CODES.get(np.dtype(helper.tensor_dtype_to_np_dtype(to)))
    if code is None:
        n.refuse("to", helper.tensor_dtype_to_string(to), "types with an aclDataType, npu/emulated/dtypes.py")
    return [Lowered("Cast", (n.input(0),), (n.output(),), attrs(dst_type=code))]


# -- matrix multiplies ----------------------------------------------------------------------------------------


@_lowers("MatMul")
def _matmul(n: _Node) -> list[Lowered]:
    """MatMulV2 for 2-D operands, BatchMatMulV2 (broadcasting batch dims) otherwise; a 1-D operand is made a
    matrix first and its dim dropped from the result, as numpy's matmul does."""
    n.known()
    a, b, y = n.input(0), n.input(1), n.output()
    ops = []
    if len(n.shape(a)) == 1:
        a, op = n.reshaped(a, "x1", (1, *n.shape(a)))
        ops.append(op)
    if len(n.shape(b)) == 1:
        b, op = n.reshaped(b, "x2", (*n.shape(b), 1))
        ops.append(op)
    sa, sb = n.shape(a), n.shape(b)
    if min(len(sa), len(sb)) < 2:
        raise n.error(f"operands of shapes {list(sa)} and {list(sb)}: scalars do not multiply as matrices")
    op_type = "MatMulV2" if len(sa) == len(sb) == 2 else "BatchMatMulV2"
    product = (*np.broadcast_shapes(sa[:-2], sb[:-2]), sa[-2], sb[-1])
    if product == n.shape(y):
        return [*ops, Lowered(op_type, (a, b), (y,), {})]
    mid = n.tensor("matmul", product, n.spec(y)[1])
    return [*ops, Lowered(op_type, (a, b), (mid,), {}), Lowered("Reshape", (mid,), (y,), {})]


@_lowers("Gemm")
def _gemm(n: _Node) -> list[Lowered]:
    """alpha * A' @ B' + beta * C: one MatMulV2 (C as its bias when it is a row [N] and alpha = beta = 1), else
    Muls for alpha and beta and an Add for C."""
    n.known("alpha", "beta", "transA", "transB")
    a, b, c, y = n.input(0), n.input(1), n.input(2), n.output()
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    flags = attrs(transpose_x1=bool(n.attr("transA", 0)), transpose_x2=bool(n.attr("transB", 0)))
    shape, dtype = n.spec(y)
    as_bias = c is None or (beta == 1.0 and n.shape(c) in ((shape[1],), (1, shape[1])))
    if alpha == 1.0 and as_bias:
        return [Lowered("MatMulV2", tuple(t for t in (a, b, c) if t), (y,), flags)]
    product = n.tensor("matmul", shape, dtype)
    ops = [Lowered("MatMulV2", (a, b), (product,), flags)]
    if alpha != 1.0:
        scaled = y if c is None else n.tensor("alpha", shape, dtype)
        ops.append(Lowered("Muls", (product,), (scaled,), attrs(value=alpha)))
        product = scaled
    if c is not None:
        if beta != 1.0:
            ops.append(Lowered("Muls", (c,), (n.tensor("beta", *n.spec(c)),), attrs(value=beta)))
            c = ops[-1].outputs[0]
        ops.append(Lowered("Add", (product, c), (y,), {}))
    return ops


# -- convolution and pooling ----------------------------------------------------------------------------------

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _pads(n: _Node, sizes, kernel, strides, dilations) -> list[int]:
    """Explicit pads in CANN's order, (begin, end) per spatial axis, with auto_pad resolved as ONNX defines it."""
    auto = n.attr("auto_pad", "NOTSET")
    rank = len(sizes)
    if auto == "NOTSET":
        pads = list(n.attr("pads", [0] * 2 * rank))
        return [p for a in range(rank) for p in (pads[a], pads[a + rank])]
    if auto == "VALID":
        return [0] * 2 * rank
    if auto not in AUTO_PADS:
        n.refuse("auto_pad", auto, AUTO_PADS)
    out = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        half = total // 2  # the odd pixel goes at the end for SAME_UPPER, at the beginning for SAME_LOWER
        out += [half, total - half] if auto == "SAME_UPPER" else [total - half, half]
    return out


@_lowers("Conv")
def _conv(n: _Node) -> list[Lowered]:
    """Conv2D; a 1-D convolution runs as a 2-D one of height 1 (reshapes around it)."""
    n.known("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
    x, w, bias, y = n.input(0), n.input(1), n.input(2), n.output()
    sx, sw = n.shape(x), n.shape(w)
    if len(sx) not in (3, 4):
        raise n.error(f"X has shape {list(sx)}: only 1-D and 2-D convolutions (3-D or 4-D X) lower to Conv2D")
    rank = len(sx) - 2
    if list(n.attr("kernel_shape", sw[2:])) != list(sw[2:]):
        raise n.error(f"attribute kernel_shape={n.attr('kernel_shape')} differs from W's shape {list(sw)}")
    strides, dilations = list(n.attr("strides", [1] * rank)), list(n.attr("dilations", [1] * rank))
    pads = _pads(n, sx[2:], sw[2:], strides, dilations)
    ops = []
    if rank == 1:
        strides, dilations, pads = [1, *strides], [1, *dilations], [0, 0, *pads]
        x, op = n.reshaped(x, "x", (*sx[:2], 1, sx[2]))
        w, wop = n.reshaped(w, "filter", (*sw[:2], 1, sw[2]))
        ops += [op, wop]
    conv_attrs = attrs(
        strides=[1, 1, *strides],
        pads=pads,
        dilations=[1, 1, *dilations],
        groups=int(n.attr("group", 1)),
        data_format="NCHW",
    )
    inputs = tuple(t for t in (x, w, bias) if t)
    if rank == 2:
        return [Lowered("Conv2D", inputs, (y,), conv_attrs)]
    shape, dtype = n.spec(y)
    y4 = n.tensor("y", (*shape[:2], 1, shape[2]), dtype)
    return [*ops, Lowered("Conv2D", inputs, (y4,), conv_attrs), Lowered("Reshape", (y4,), (y,), {})]


POOL_ATTRIBUTES = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")


@_lowers("MaxPool", "AveragePool")
def _pool(n: _Node) -> list[Lowered]:
    """MaxPoolV3 / AvgPoolV2 over a 4-D X with explicit pads (auto_pad resolved)."""
    average = n.node.op_type == "AveragePool"
    n.known(*POOL_ATTRIBUTES, "count_include_pad" if average else "storage_order")
    x, y = n.input(0), n.output()
    sx = n.shape(x)
    if len(sx) != 4:
        raise n.error(f"X has shape {list(sx)}: only 2-D pooling (4-D X) lowers to CANN pools")
    if n.output(1):
        raise n.error("output Indices is not supported (MaxPoolV3 has the pooled values only)")
    if any(d != 1 for d in n.attr("dilations", [1, 1])):
        n.refuse("dilations", n.attr("dilations"), "[1, 1]")
    kernel = n.attr("kernel_shape")
    if kernel is None:
        raise n.error("attribute kernel_shape is required")
    strides = list(n.attr("strides", [1, 1]))
    pool_attrs = attrs(
        ksize=[1, 1, *kernel],
        strides=[1, 1, *strides],
        padding_mode="CALCULATED",
        pads=_pads(n, sx[2:], kernel, strides, [1, 1]),
        data_format="NCHW",
        ceil_mode=bool(n.attr("ceil_mode", 0)),
    )
    if average:
        pool_attrs |= attrs(exclusive=not n.attr("count_include_pad", 0))
    return [Lowered("AvgPoolV2" if average else "MaxPoolV3", (x,), (y,), pool_attrs)]


@_lowers("GlobalAveragePool")
def _global_average_pool(n: _Node) -> list[Lowered]:
    n.known()
    return [Lowered("GlobalAveragePool", (n.input(0),), (n.output(),), {})]


@_lowers("GlobalMaxPool")
def _global_max_pool(n: _Node) -> list[Lowered]:
    n.known()
    sx = n.shape(n.input(0))
    if len(sx) != 4:
        raise n.error(f"X has shape {list(sx)}: only 4-D X lowers to MaxPoolV3 (global_pooling)")
    pool_attrs = attrs(ksize=[1, 1, *sx[2:]], strides=[1, 1, 1, 1], data_format="NCHW", global_pooling=True)
    return [Lowered("MaxPoolV3", (n.input(0),), (n.output(),), pool_attrs)]


RESIZE_ATTRIBUTES = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside")
RESIZE_IGNORED = ("extrapolation_value", "antialias", "keep_aspect_ratio_policy")  # defaults only, checked below


@_lowers("Resize")
def _resize(n: _Node) -> list[Lowered]:
    """CANN Resize over H and W; scales (input 2) become attr scales, sizes the declared output's shape. The op
    refuses the modes it does not model (cubic, tf_crop_and_resize), naming the attribute."""
    n.known(*RESIZE_ATTRIBUTES, *RESIZE_IGNORED)
    x, y = n.input(0), n.output()
    for key, default in (("exclude_outside", 0), ("antialias", 0), ("keep_aspect_ratio_policy", "stretch")):
        if n.attr(key, default) != default:
            n.refuse(key, n.attr(key), repr(default))
    if len(n.shape(x)) != 4:
        raise n.error(f"X has shape {list(n.shape(x))}: only 4-D X [N, C, H, W] lowers to Resize")
    scales = n.const(2)
    size = {"scales": [float(s) for s in scales]} if scales is not None and scales.size else {"sizes": n.shape(y)}
    resize_attrs = attrs(
        mode=n.attr("mode", "nearest"),
        coordinate_transformation_mode=n.attr("coordinate_transformation_mode", "half_pixel"),
        nearest_mode=n.attr("nearest_mode", "round_prefer_floor"),
        **size,
    )
    return [Lowered("Resize", (x,), (y,), resize_attrs)]


# -- normalisation ----------------------------------------------------------------------------------------------


@_lowers("BatchNormalization")
def _batch_norm(n: _Node) -> list[Lowered]:
    """BNInfer: inference with the given statistics (a BatchNormalization after a Conv is folded before this)."""
    n.known("epsilon", "momentum", "training_mode")
    if n.attr("training_mode", 0) or any(n.output(i) for i in (1, 2)):
        raise n.error("training mode (running mean and variance outputs) is not supported: export for inference")
    epsilon = float(n.attr("epsilon", 1e-5))
    return [Lowered("BNInfer", tuple(n.node.input[:5]), (n.output(),), attrs(epsilon=epsilon))]


@_lowers("LayerNormalization")
def _layer_norm(n: _Node) -> list[Lowered]:
    """LayerNorm over dims from axis; its mean output is ONNX's Mean, its variance a new tensor."""
    n.known("axis", "epsilon", "stash_type")
    if n.attr("stash_type", 1) != 1:
        n.refuse("stash_type", n.attr("stash_type"), "1 (float32 statistics)")
    if n.output(2):
        raise n.error("output InvStdDev is not supported (LayerNorm gives the variance)")
    shape = n.shape(n.input(0))
    axis = int(n.attr("axis", -1))
    if not -len(shape) <= axis < len(shape):
        n.refuse("axis", axis, f"an axis of X's rank {len(shape)}")
    axis %= len(shape)
    stat = shape[:axis] + (1,) * (len(shape) - axis)
    mean = n.output(1) or n.tensor("mean", stat, F32)
    variance = n.tensor("variance", stat, F32)
    norm_attrs = attrs(begin_norm_axis=axis, begin_params_axis=axis, epsilon=float(n.attr("epsilon", 1e-5)))
    inputs = tuple(t for t in n.node.input[:3] if t)
    return [Lowered("LayerNorm", inputs, (n.output(), mean, variance), norm_attrs)]


# -- data movement ----------------------------------------------------------------------------------------------


@_lowers("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(n: _Node) -> list[Lowered]:
    """Reshape to the declared output shape (the shape or axes inputs are not read at run time)."""
    n.known({"Reshape": "allowzero", "Flatten": "axis"}.get(n.node.op_type, "axes"))
    return [Lowered("Reshape", (n.input(0),), (n.output(),), {})]


@_lowers("Transpose")
def _transpose(n: _Node) -> list[Lowered]:
    n.known("perm")
    perm = n.attr("perm", list(reversed(range(len(n.shape(n.input(0)))))))
    return [Lowered("Transpose", (n.input(0),), (n.output(),), attrs(perm=[int(p) for p in perm]))]


@_lowers("Concat")
def _concat(n: _Node) -> list[Lowered]:
    n.known("axis")
    if "axis" not in n.attributes:
        raise n.error("attribute axis is required")
    return [Lowered("ConcatD", tuple(n.node.input), (n.output(),), attrs(concat_dim=int(n.attr("axis"))))]


@_lowers("Split")
def _split(n: _Node) -> list[Lowered]:
    """SplitVD with the outputs' sizes along the axis (whether ONNX gave split, num_outputs or neither)."""
    n.known("axis", "num_outputs", "split")
    shape = n.shape(n.input(0))
    axis = int(n.attr("axis", 0)) % max(len(shape), 1)
    outputs = tuple(n.node.output)
    if not all(outputs):
        raise n.error("an output is left unnamed: SplitVD writes every piece")
    sizes = [n.shape(o)[axis] for o in outputs]
    split_attrs = attrs(size_splits=sizes, split_dim=axis, num_split=len(sizes))
    return [Lowered("SplitVD", (n.input(0),), outputs, split_attrs)]


SUPPORTED: frozenset[str] = frozenset(_LOWERINGS)
