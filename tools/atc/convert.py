"""ONNX model -> FlexNPU offline model (om.Model), what CANN's ATC does for `--framework=5`, in the steps ATC takes:

1. check the model (onnx.checker) and fix every graph input's shape (--input_shape, or the model's static dims;
   with --dynamic_batch_size one graph per gear, the batch dimension set to the gear's size);
2. fold (`fold`): Identity and Dropout removed, constant subgraphs evaluated (Shape of a static tensor is a
   constant too), BatchNormalization merged into the Conv before it, dead nodes dropped; shapes inferred;
3. precision (--precision_mode): which nodes compute in float16, with Cast nodes where a tensor crosses between
   float32 and float16 (the model's inputs and outputs keep the dtypes the ONNX model declares);
4. lower every node to CANN ops (tools.atc.lower), and pack the constants the ops read into the weight blob.

Errors are ConversionError, with a message that names the input, node or option at fault.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from interposer.shim.flexnpu_client import om
from npu.emulated.dtypes import CODES
from tools.atc import lower as lowering

# precision_mode -> which ONNX nodes compute in float16 ("all", "cube" or "none"). ATC: force_fp16 picks float16
# for every op that has it; allow_fp32_to_fp16 runs matrix (cube) ops in float16 and keeps vector ops in float32
# when they support it (all emulated ops do); force_fp32 / must_keep_origin_dtype keep float32.
PRECISION_MODES = {
    "force_fp16": "all",
    "allow_fp32_to_fp16": "cube",
    "force_fp32": "none",
    "must_keep_origin_dtype": "none",
}
DEFAULT_PRECISION = "force_fp16"  # ATC's default for inference
CUBE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})  # ONNX ops ATC maps to the cube unit
MIN_OPSET = 13
INPUT_FORMATS = {"NCHW": 0, "ND": 2, "NCDHW": 30}  # what ATC takes for ONNX models, as aclFormat codes
MAX_GEARS = 100  # ATC's limit on --dynamic_batch_size
WEIGHT_ALIGN = 64
# Ops never evaluated at conversion time even when their inputs are constants: their outputs differ per run.
RANDOM_OPS = frozenset(
    {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
)

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


class ConversionError(Exception):
    """The model cannot be converted; the message names what is wrong and what to do."""


@dataclass(frozen=True)
class Options:
    soc: str = "Ascend910B2"
    input_shapes: dict[str, tuple[int, ...]] | None = None  # -1 marks the dimension --dynamic_batch_size sets
    input_format: str | None = None  # NCHW, ND or NCDHW; default by rank
    precision_mode: str = DEFAULT_PRECISION
    dynamic_batch: tuple[int, ...] = ()


def parse_input_shape(text: str) -> dict[str, tuple[int, ...]]:
    """ATC's --input_shape: "name:d0,d1,...;name2:..." (-1 marks the batch dimension of --dynamic_batch_size)."""
    shapes = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, dims = item.rpartition(":")
        try:
            if not (sep and name):
                raise ValueError
            shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
        except ValueError:
            raise ConversionError(
                f'--input_shape entry {item!r}: expected "name:d0,d1,..." with integer dims'
            ) from None
        if any(d < -1 for d in shape):
            raise ConversionError(f"--input_shape entry {item!r}: dimensions are sizes, or -1 for the batch")
        shapes[name] = shape
    return shapes


def parse_batches(text: str) -> tuple[int, ...]:
    """ATC's --dynamic_batch_size: "1,2,4,8" -> the gears in ascending order."""
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise ConversionError(f"--dynamic_batch_size {text!r}: expected positive integers like 1,2,4,8") from None
    if any(b <= 0 for b in batches) or len(set(batches)) != len(batches):
        raise ConversionError(f"--dynamic_batch_size {text!r}: the batch sizes must be positive and distinct")
    if len(batches) > MAX_GEARS:
        raise ConversionError(f"--dynamic_batch_size has {len(batches)} gears, at most {MAX_GEARS}")
    return tuple(sorted(batches))


def convert(model: onnx.ModelProto, options: Options) -> om.Model:
    if options.precision_mode not in PRECISION_MODES:
        raise ConversionError(
            f"--precision_mode={options.precision_mode} is not supported (have {', '.join(PRECISION_MODES)})"
        )
    if options.input_format is not None and options.input_format not in INPUT_FORMATS:
        raise ConversionError(
            f"--input_format={options.input_format} is not supported for ONNX models (have {', '.join(INPUT_FORMATS)})"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the ONNX model is invalid: {exc}") from None
    if _opset(model) < MIN_OPSET:  # the lowering follows opset 13's semantics (Softmax's axis, Split's sizes)
        raise ConversionError(
            f"the model's opset is {_opset(model)}; flexnpu-atc converts opset {MIN_OPSET} and later: upgrade it "
            f"with onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )
    weights: dict[str, np.ndarray] = {}
    graphs = []
    for gear in options.dynamic_batch or (0,):
        folded = fold(model, input_shapes(model, options, gear))
        graphs.append(_Lowering(folded, options, weights).graph(gear))
    offsets, blob = _pack(weights)
    inputs = tuple(i.name for i in _graph_inputs(model.graph))
    return om.Model(
        soc=options.soc,
        inputs=inputs,
        outputs=tuple(o.name for o in model.graph.output),
        weights=offsets,
        blob=blob,
        graphs=tuple(graphs),
        source={
            "framework": "onnx",
            "producer": "flexnpu-atc",
            "onnx_producer": f"{model.producer_name} {model.producer_version}".strip(),
            "opset": _opset(model),
            "precision_mode": options.precision_mode,
            "input_format": options.input_format,
            "input_shape": {name: list(shape) for name, shape in (options.input_shapes or {}).items()},
        },
    )


def input_shapes(model: onnx.ModelProto, options: Options, gear: int) -> dict[str, tuple[int, ...]]:
    """Every graph input's static shape for this gear (0: the static model)."""
    given = options.input_shapes or {}
    inputs = {i.name: i for i in _graph_inputs(model.graph)}
    unknown = set(given) - set(inputs)
    if unknown:
        raise ConversionError(f"--input_shape names {sorted(unknown)}, not inputs of the model (have {list(inputs)})")
    shapes, free = {}, False
    for name, value in inputs.items():
        declared = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in declared.shape.dim]
        if name in given:
            if declared.HasField("shape") and len(given[name]) != len(dims):
                raise ConversionError(f"--input_shape gives input {name!r} {len(given[name])} dims, it has {len(dims)}")
            if -1 in given[name] and not gear:
                raise ConversionError(f"--input_shape of {name!r} has -1: a dynamic batch needs --dynamic_batch_size")
            if -1 in given[name][1:]:  # ATC's -1 marks the batch: gears of other dimensions are --dynamic_dims
                raise ConversionError(
                    f"--input_shape of {name!r} has -1 past its first dimension: --dynamic_batch_size sets the batch "
                    "(the first dimension) only"
                )
            free = free or -1 in given[name]
            dims = [gear if d == -1 else d for d in given[name]]
        elif gear and dims and dims[0] is None:
            dims[0] = gear  # the model's own dynamic batch dimension
            free = True
        if None in dims or not (name in given or declared.HasField("shape")):
            symbolic = [d.dim_param or d.dim_value for d in declared.shape.dim] if declared.HasField("shape") else "?"
            raise ConversionError(
                f'input {name!r} has a dynamic shape {symbolic}: give it with --input_shape="{name}:'
                f'{",".join("1" if d is None else str(d) for d in dims)}" (or -1 for the batch with '
                "--dynamic_batch_size)"
            )
        shapes[name] = tuple(dims)
    if gear and not free:
        raise ConversionError(
            "--dynamic_batch_size needs a batch dimension to set: -1 in --input_shape, or a dynamic first dimension "
            "in the model"
        )
    return shapes


# -- folding -------------------------------------------------------------------------------------------------


def fold(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The model with these input shapes, folded as ATC folds it, every tensor's shape inferred. It is a valid ONNX
    model computing the same function (onnxruntime runs it), with unique node names."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    real_inputs = _graph_inputs(g)
    del g.input[:]
    g.input.extend(real_inputs)
    for value in g.input:
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for d in shapes[value.name]:
            shape.dim.add().dim_value = d
    del g.value_info[:]
    _name_nodes(g.node)
    opset = _opset(m)
    constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    outputs = {o.name for o in g.output}
    nodes = _remove_identities(list(g.node), {i.name for i in g.input}, outputs, set(constants))
    while True:
        infer = _infer(m, nodes, constants)
        static = {v.name: _static_shape(v) for v in (*infer.graph.value_info, *infer.graph.input)}
        kept = []
        for node in nodes:
            value = _evaluate(node, constants, static, opset)
            if value is None:
                kept.append(node)
            else:
                constants.update(value)
        if len(kept) == len(nodes):
            break
        nodes = kept
    nodes = _fold_batchnorm(nodes, constants, outputs)
    nodes = _live(nodes, outputs)
    return _infer(m, nodes, constants)


def _name_nodes(nodes) -> None:
    seen = set()
    for i, node in enumerate(nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _remove_identities(nodes: list, inputs: set[str], outputs: set[str], constants: set[str]) -> list:
    """Drop Identity and (inference-mode) Dropout nodes: consumers read their input instead, or, where the
    output is a graph output, the producer writes the output directly. Where neither can be (a graph input or a
    constant copied to a graph output), a CANN Identity stays."""
    kept, rename = [], {}
    for node in nodes:
        if node.op_type not in ("Identity", "Dropout"):
            kept.append(node)
            continue
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            raise ConversionError(f"Dropout node {node.name!r}: its mask output is used; inference has no mask")
        src, dst = rename.get(node.input[0], node.input[0]), node.output[0]
        if dst not in outputs:
            rename[dst] = src
        elif src in inputs or src in outputs or src in constants:
            kept.append(helper.make_node("Identity", [src], [dst], name=node.name))
        else:  # the producer (already in kept) and earlier consumers write/read the output's name instead
            for k in kept:
                _rename(k, {src: dst})
            rename = {a: (dst if b == src else b) for a, b in rename.items()}
            rename[src] = dst
    for node in kept:
        _rename(node, rename)
    return kept


def _rename(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    for i, name in enumerate(node.input):
        node.input[i] = mapping.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = mapping.get(name, name)


def _evaluate(node, constants: dict, static: dict, opset: int) -> dict[str, np.ndarray] | None:
    """The node's outputs if they are known at conversion time, else None."""
    if node.op_type == "Shape" and static.get(node.input[0]) is not None:
        dims = static[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        return {node.output[0]: np.array(dims[attrs.get("start", 0) : attrs.get("end", len(dims))], np.int64)}
    if node.op_type in RANDOM_OPS or not all(name in constants for name in node.input if name):
        return None
    try:
        results = ReferenceEvaluator(node, opsets={"": opset}).run(
            None, {name: constants[name] for name in node.input if name}
        )
    except Exception as exc:  # the reference evaluator raises whatever numpy does
        raise ConversionError(f"{node.op_type} node {node.name!r}: folding its constant inputs failed: {exc}") from None
    return {name: np.asarray(value) for name, value in zip(node.output, results, strict=True) if name}


def _fold_batchnorm(nodes: list, constants: dict, outputs: set[str]) -> list:
    """Merge each BatchNormalization into the Conv that feeds it (and only it): W' = W * s, b' = (b - mean) * s + B
    with s = scale / sqrt(var + epsilon) per output channel."""
    producer = {out: node for node in nodes for out in node.output}
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    kept, position = [], {}
    for node in nodes:
        conv = producer.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if (
            conv is None
            or conv.op_type != "Conv"
            or uses[node.input[0]] != 1
            or node.input[0] in outputs
            or len([o for o in node.output if o]) != 1
            or not all(name in constants for name in (*conv.input[1:], *node.input[1:]) if name)
        ):
            position[node.output[0]] = len(kept)
            kept.append(node)
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (constants[name].astype(np.float64) for name in node.input[1:5])
        weight = constants[conv.input[1]]
        b = constants[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        s = scale / np.sqrt(var + epsilon)
        w_name, b_name = f"{conv.name}/weight", f"{conv.name}/bias"
        constants[w_name] = (weight * s.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
        constants[b_name] = ((b - mean) * s + bias).astype(weight.dtype)
        merged = helper.make_node("Conv", [conv.input[0], w_name, b_name], [node.output[0]], name=conv.name)
        merged.attribute.extend(conv.attribute)
        kept[position[conv.output[0]]] = merged
    return kept


def _live(nodes: list, outputs: set[str]) -> list:
    """The nodes whose outputs something reads, graph outputs counted."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def _infer(m: onnx.ModelProto, nodes: list, constants: dict) -> onnx.ModelProto:
    used = {name for node in nodes for name in node.input} | {o.name for o in m.graph.output}
    out = onnx.ModelProto()
    out.CopyFrom(m)  # the original's initializers are copied too, then replaced: small next to inference itself
    g = out.graph
    del g.node[:], g.initializer[:], g.value_info[:]
    g.node.extend(nodes)
    g.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items() if name in used)
    try:
        return onnx.shape_inference.infer_shapes(out, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ConversionError(f"shape inference failed (check --input_shape against the model): {exc}") from None


def _static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    t = value.type.tensor_type
    if not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
        return None
    return tuple(d.dim_value for d in t.shape.dim)


# -- precision and lowering ----------------------------------------------------------------------------------


class _Lowering:
    """One gear's graph: each folded ONNX node retyped for the precision mode and lowered to CANN ops."""

    def __init__(self, folded: onnx.ModelProto, options: Options, weights: dict[str, np.ndarray]) -> None:
        self.options = options
        self.region = PRECISION_MODES[options.precision_mode]
        self.weights = weights  # shared by all gears: name -> the array in the blob
        g = folded.graph
        self.graph_proto = g
        self.constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for value in (*g.input, *g.value_info, *g.output):
            if value.name not in self.constants:
                self.specs[value.name] = self._spec(value)
        for name, array in self.constants.items():
            self.specs[name] = (array.shape, array.dtype)
        self.inputs = [v.name for v in _graph_inputs(g)]
        self.outputs = [v.name for v in g.output]
        self.home = {name: name for name in self.inputs}  # tensor -> the name its producer writes it under
        self.variants = {(name, self.specs[name][1]): name for name in self.inputs}  # (tensor, dtype) -> holder
        self.nodes: list[om.Node] = []

    @staticmethod
    def _spec(value: onnx.ValueInfoProto) -> tuple[tuple[int, ...], np.dtype]:
        shape = _static_shape(value)
        if shape is None:
            raise ConversionError(
                f"tensor {value.name!r}: shape inference left its shape unknown; fix the inputs' "
                "shapes with --input_shape"
            )
        return shape, helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)

    def graph(self, gear: int) -> om.Graph:
        for node in self.graph_proto.node:
            if node.op_type not in lowering.SUPPORTED:
                supported = ", ".join(sorted(lowering.SUPPORTED))
                raise ConversionError(f"unsupported op {node.op_type} in node {node.name} (supported: {supported})")
        for name in self.outputs:
            if name in self.constants:
                raise ConversionError(f"graph output {name!r} is a constant: there is nothing to run for it")
        for node in self.graph_proto.node:
            self._node(node)
        rename = self._keep_weights(gear)
        tensors = {}
        for name in (*self.inputs, *self.outputs, *(t for n in self.nodes for t in (*n.inputs, *n.outputs))):
            shape, dtype = self.specs[name]
            final = rename.get(name, name)
            tensors[final] = om.Tensor(final, _code(name, dtype), tuple(shape), self._format(name, len(shape)))
        nodes = tuple(om.Node(n.op, tuple(rename.get(t, t) for t in n.inputs), n.outputs, n.attrs) for n in self.nodes)
        return om.Graph(gear, tensors, nodes)

    def _node(self, node: onnx.NodeProto) -> None:
        low = self.region == "all" or (self.region == "cube" and node.op_type in CUBE_OPS)
        want = (lambda dtype: F16 if dtype == F32 else dtype) if low else (lambda dtype: dtype)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(node.input):
            if name and not (node.op_type == "Resize" and i > 0):  # roi and scales are parameters, not data
                copy.input[i] = self._as(name, want(self.specs[name][1]))
        finals = []
        for i, name in enumerate(node.output):
            if not name:
                continue
            shape, dtype = self.specs[name]
            holder = name
            if want(dtype) != dtype:
                holder = f"{name}:{want(dtype).name}"
                self.specs[holder] = (shape, want(dtype))
                if name in self.outputs:  # the graph output keeps its declared dtype: a Cast writes it
                    finals.append((holder, name))
                    self.variants[(name, dtype)] = name
            self.variants[(name, want(dtype))] = self.home[name] = holder
            copy.output[i] = holder
        if low and node.op_type == "Cast":
            for a in copy.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
        try:
            lowered, new = lowering.lower(copy, self.specs, self.constants)
        except lowering.LoweringError as exc:
            raise ConversionError(str(exc)) from None
        self.specs.update(new)
        self.nodes.extend(om.Node(op.op, tuple(op.inputs), tuple(op.outputs), _plain_attrs(op.attrs)) for op in lowered)
        for holder, name in finals:
            self._cast(holder, name, self.specs[name][1])

    def _as(self, name: str, dtype: np.dtype) -> str:
        """The tensor holding `name`'s value in `dtype`: itself, a converted constant, or a Cast's output."""
        if name in self.constants:
            array = self.constants[name]
            if array.dtype == dtype:
                return name
            variant = f"{name}:{dtype.name}"
            self.constants.setdefault(variant, array.astype(dtype))
            self.specs[variant] = (array.shape, dtype)
            return variant
        holder = self.variants.get((name, dtype))
        if holder is None:
            holder = f"{name}:{dtype.name}"
            self.specs[holder] = (self.specs[name][0], dtype)
            self._cast(self.home[name], holder, dtype)
            self.variants[(name, dtype)] = holder
        return holder

    def _cast(self, source: str, target: str, dtype: np.dtype) -> None:
        self.nodes.append(om.Node("Cast", (source,), (target,), {"dst_type": ("int", CODES[dtype])}))

    def _keep_weights(self, gear: int) -> dict[str, str]:
        """Put the constants the ops read into the shared weights; one a gear computed differently (a shape the
        batch changed) gets a name of its own. Returns those renames."""
        rename = {}
        for name in dict.fromkeys(t for n in self.nodes for t in n.inputs if t in self.constants):
            array = self.constants[name]
            if array.dtype not in CODES:
                raise ConversionError(f"constant {name!r} has dtype {array.dtype}, which no NPU op takes")
            have = self.weights.get(name)
            if have is not None and not (have.dtype == array.dtype and np.array_equal(have, array)):
                rename[name] = f"{name}@batch{gear}"
                self.specs[rename[name]] = self.specs[name]
            self.weights.setdefault(rename.get(name, name), array)
        return rename

    def _format(self, name: str, rank: int) -> int:
        if name in self.inputs and self.options.input_format:
            return INPUT_FORMATS[self.options.input_format]
        # NCHW for images, ND for the rest: a 5-D tensor is NCDHW only where the user says so (a YOLO head's
        # anchors reshape is 5-D and no volume)
        return INPUT_FORMATS["NCHW"] if rank == 4 else INPUT_FORMATS["ND"]


def _plain_attrs(attrs: dict) -> dict[str, tuple[str, object]]:
    """Attribute values as JSON-ready Python values (lowering may hand numpy scalars, lists for tuples)."""
    scalar = {"int": int, "float": float, "bool": bool, "string": str}
    out = {}
    for name, (kind, value) in attrs.items():
        convert_one = scalar[kind.removeprefix("list_")]
        out[name] = (kind, tuple(convert_one(v) for v in value) if kind.startswith("list_") else convert_one(value))
    return out


def _pack(weights: dict[str, np.ndarray]) -> tuple[dict[str, tuple[int, int]], bytes]:
    offsets, chunks, end = {}, [], 0
    for name, array in weights.items():
        start = -(-end // WEIGHT_ALIGN) * WEIGHT_ALIGN
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        chunks.append(b"\0" * (start - end) + data)
        offsets[name] = (start, len(data))
        end = start + len(data)
    return offsets, b"".join(chunks)


def _code(name: str, dtype: np.dtype) -> int:
    try:
        return CODES[dtype]
    except KeyError:
        raise ConversionError(f"tensor {name!r} has dtype {dtype}, which has no aclDataType") from None


def _graph_inputs(g: onnx.GraphProto) -> Iterable[onnx.ValueInfoProto]:
    """The graph's real inputs (IR < 4 models also list their initializers as inputs)."""
    initializers = {t.name for t in g.initializer}
    return [v for v in g.input if v.name not in initializers]


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
