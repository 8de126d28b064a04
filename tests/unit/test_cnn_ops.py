"""The ONNX -> CANN lowering (tools/atc/lower.py) and the ops it lowers to (convolution, pools, resize,
activations, ...): each ONNX op as a one-node model, run by onnxruntime and, lowered, by the emulated op library
through its launch path (bind, device memory Regions, KernelTask), the outputs compared. Also what the lowering
refuses, and the costs of Conv2D and the pools.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from npu.emulated.ops import KernelTask, TensorSpec, bind
from npu.emulated.ops.matmul import CUBE_EFF_MAX
from npu.errors import InvalidParam
from npu.memory import DeviceMemory, Region
from npu.tasks import Unit
from tools.atc.lower import SUPPORTED, LoweringError, lower

RNG = np.random.default_rng(18)
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
I64 = np.dtype(np.int64)
KEEP_F32 = {"scales"}  # ONNX types Resize's scales float32 in a float16 model too


def r(*shape, low=-2.0, high=2.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(F32)


def i64(*values) -> np.ndarray:
    return np.array(values, I64)


def model(op_type, inputs, feeds, consts, outputs, opset, attributes) -> onnx.ModelProto:
    node = helper.make_node(op_type, list(inputs), list(outputs), name="node", **attributes)
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs if o],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run_onnxruntime(m: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def lowered(op_type, feeds, consts=None, *, inputs=None, outputs=("y",), opset=17, **attributes):
    """Lower the one-node model, its shapes inferred as the converter does: (ops, every tensor's spec)."""
    consts = consts or {}
    inputs = [*feeds, *consts] if inputs is None else inputs
    m = model(op_type, inputs, feeds, consts, outputs, opset, attributes)
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    specs = {k: (v.shape, v.dtype) for k, v in (*feeds.items(), *consts.items())}
    for value in m.graph.output:
        t = value.type.tensor_type
        specs[value.name] = (tuple(d.dim_value for d in t.shape.dim), helper.tensor_dtype_to_np_dtype(t.elem_type))
    ops, new = lower(m.graph.node[0], specs, consts)
    assert all(name.startswith("node/") for name in new)
    return ops, {**specs, **new}


def execute(ops, specs: dict, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run lowered ops as the runtime does: each bound, its operands in device memory, its KernelTask run."""
    memory = DeviceMemory(1 << 28, backed=True)
    env = dict(values)
    for op in ops:
        ins = [np.ascontiguousarray(env[t]) for t in op.inputs]
        outs = [TensorSpec(np.dtype(specs[t][1]), tuple(specs[t][0])) for t in op.outputs]
        kernel = bind(
            op.op, [TensorSpec(a.dtype, a.shape) for a in ins], outs, {k: v for k, (_, v) in op.attrs.items()}
        )
        regions = [Region(memory.alloc(max(t.nbytes, 1)), 0, t.nbytes) for t in (*kernel.ins, *outs)]
        for region, array in zip(regions, ins, strict=False):
            region.write(array.tobytes())
        KernelTask(kernel, tuple(regions[: len(ins)]), tuple(regions[len(ins) :])).run()
        for name, spec, region in zip(op.outputs, outs, regions[len(ins) :], strict=True):
            env[name] = np.frombuffer(region.read(), spec.dtype).reshape(spec.shape)
    return env


def check(op_type, feeds, consts=None, *, half=False, tol=1e-5, inputs=None, outputs=("y",), opset=17, **attributes):
    """onnxruntime's outputs against the lowered ops'. half: the model in float16 for the lowering, onnxruntime
    on the same (rounded) values in float32, compared at float16's precision. Returns the lowered ops."""
    consts = consts or {}
    inputs = [*feeds, *consts] if inputs is None else inputs

    def retyped(arrays, dtype):
        return {k: v.astype(dtype) if v.dtype in (F32, F16) and k not in KEEP_F32 else v for k, v in arrays.items()}

    if half:
        feeds, consts = retyped(feeds, F16), retyped(consts, F16)
    reference = model(op_type, inputs, retyped(feeds, F32), retyped(consts, F32), outputs, opset, attributes)
    names = [o for o in outputs if o]
    expected = run_onnxruntime(reference, names, retyped(feeds, F32))
    ops, specs = lowered(op_type, feeds, consts, inputs=inputs, outputs=outputs, opset=opset, **attributes)
    got = execute(ops, specs, {**feeds, **consts})
    for name, want in zip(names, expected, strict=True):
        assert got[name].shape == want.shape, name
        assert got[name].dtype == (F16 if half and want.dtype == F32 else want.dtype), name
        rtol, atol = (2e-3, tol * 100) if half else (tol, tol)
        np.testing.assert_allclose(got[name].astype(np.float64), want, rtol=rtol, atol=atol, err_msg=name)
    return ops


# -- each ONNX op against onnxruntime ---------------------------------------------------------------------------

CONV = {
    "3x3-pad1-bias": ({"x": r(2, 4, 9, 9)}, {"w": r(6, 4, 3, 3), "b": r(6)}, {"pads": [1, 1, 1, 1]}),
    "stride2-dilation-asymmetric-pads": (
        {"x": r(1, 3, 11, 10)},
        {"w": r(4, 3, 3, 2)},
        {"strides": [2, 2], "dilations": [2, 1], "pads": [0, 1, 2, 0]},
    ),
    "groups2-bias": ({"x": r(2, 4, 7, 7)}, {"w": r(6, 2, 3, 3), "b": r(6)}, {"group": 2, "pads": [1, 1, 1, 1]}),
    "depthwise-x2": ({"x": r(1, 4, 8, 8)}, {"w": r(8, 1, 3, 3)}, {"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 1]}),
    "same-upper-stride2": ({"x": r(1, 2, 9, 8)}, {"w": r(3, 2, 4, 3)}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "same-lower": ({"x": r(1, 2, 6, 6)}, {"w": r(3, 2, 2, 2)}, {"auto_pad": "SAME_LOWER"}),
    "valid-1x1": ({"x": r(2, 8, 5, 5)}, {"w": r(4, 8, 1, 1)}, {"auto_pad": "VALID"}),
    "conv1d": ({"x": r(2, 3, 16)}, {"w": r(5, 3, 3), "b": r(5)}, {"pads": [1, 2], "strides": [2]}),
}


@pytest.mark.parametrize("case", CONV, ids=list(CONV))
def test_conv_matches_onnxruntime(case):
    feeds, consts, attributes = CONV[case]
    ops = check("Conv", feeds, consts, tol=1e-4, **attributes)
    assert [op.op for op in ops].count("Conv2D") == 1


@pytest.mark.parametrize("case", ["3x3-pad1-bias", "depthwise-x2", "conv1d"])
def test_conv_in_float16(case):
    feeds, consts, attributes = CONV[case]
    check("Conv", feeds, consts, half=True, **attributes)


POOLS = {
    "max-3x3-s2-p1": ("MaxPool", (2, 3, 9, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "max-ceil": ("MaxPool", (1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    "max-same-upper": ("MaxPool", (1, 2, 7, 6), {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "avg-exclude-pad": ("AveragePool", (2, 3, 7, 7), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    "avg-include-pad": (
        "AveragePool",
        (2, 3, 7, 7),
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1], "count_include_pad": 1},
    ),
    "avg-ceil-include-pad": (
        "AveragePool",
        (1, 2, 8, 8),
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1},
    ),
    "avg-ceil-exclude-pad": ("AveragePool", (1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    "global-avg": ("GlobalAveragePool", (2, 3, 5, 4), {}),
    "global-avg-1d": ("GlobalAveragePool", (2, 3, 6), {}),
    "global-max": ("GlobalMaxPool", (2, 3, 5, 4), {}),
}


@pytest.mark.parametrize("case", POOLS, ids=list(POOLS))
def test_pools_match_onnxruntime(case):
    op_type, shape, attributes = POOLS[case]
    check(op_type, {"x": r(*shape)}, opset=19, **attributes)


@pytest.mark.parametrize("case", ["max-3x3-s2-p1", "avg-include-pad", "global-avg"])
def test_pools_in_float16(case):
    op_type, shape, attributes = POOLS[case]
    check(op_type, {"x": r(*shape)}, half=True, opset=19, **attributes)


@pytest.mark.parametrize("op_type", ["MaxPool", "AveragePool"])
def test_a_ceil_mode_window_starting_past_the_input_is_dropped(op_type):
    """9 wide, windows of 2 every 3: ceil mode gives a 4th window starting at 9, past the input; onnxruntime (as
    PyTorch) drops it, onnx's shape inference (1.23) keeps it. The ops follow onnxruntime; the declared output
    here is onnxruntime's."""
    x = r(1, 2, 9, 9)
    attributes = {"kernel_shape": [2, 2], "strides": [3, 3], "ceil_mode": 1}
    reference = model(op_type, ["x"], {"x": x}, {}, ["y"], 19, attributes)
    (want,) = run_onnxruntime(reference, ["y"], {"x": x})
    assert want.shape == (1, 2, 3, 3)
    specs = {"x": (x.shape, F32), "y": (want.shape, F32)}
    ops, _ = lower(reference.graph.node[0], specs, {})
    np.testing.assert_allclose(execute(ops, specs, {"x": x})["y"], want, rtol=1e-6)


ACTIVATIONS = {
    "relu": ("Relu", {}, {}),
    "sigmoid": ("Sigmoid", {}, {}),
    "leaky-relu": ("LeakyRelu", {}, {"alpha": 0.1}),
    "clip-relu6": ("Clip", {"min": np.float32(0), "max": np.float32(6)}, {}),
    "clip-min-0": ("Clip", {"min": np.float32(0)}, {}),
    "clip-min-only": ("Clip", {"min": np.float32(-1)}, {}),
    "clip-both": ("Clip", {"min": np.float32(-1.5), "max": np.float32(0.5)}, {}),
    "softmax-default-axis": ("Softmax", {}, {}),
    "softmax-axis1": ("Softmax", {}, {"axis": 1}),
    "gelu-erf": ("Gelu", {}, {"opset": 20}),
    "gelu-tanh": ("Gelu", {}, {"opset": 20, "approximate": "tanh"}),
    "identity": ("Identity", {}, {}),
}
EXPECTED_OP = {"clip-relu6": "Relu6", "clip-min-0": "Relu", "clip-min-only": "ClipByValue", "clip-both": "ClipByValue"}


@pytest.mark.parametrize("case", ACTIVATIONS, ids=list(ACTIVATIONS))
def test_activations_match_onnxruntime(case):
    op_type, consts, attributes = ACTIVATIONS[case]
    inputs = ["x", *(k if k in consts else "" for k in ("min", "max"))] if consts else None
    x = {"x": r(3, 5, 7, low=-8.0, high=8.0)}
    ops = check(op_type, x, {k: np.asarray(v) for k, v in consts.items()}, inputs=inputs, **attributes)
    assert ops[0].op == EXPECTED_OP.get(case, ops[0].op)


@pytest.mark.parametrize("case", ["sigmoid", "softmax-axis1", "gelu-erf", "clip-both"])
def test_activations_in_float16(case):
    op_type, consts, attributes = ACTIVATIONS[case]
    inputs = ["x", "min", "max"] if consts else None
    check(op_type, {"x": r(3, 5, 7, low=-8.0, high=8.0)}, consts, inputs=inputs, half=True, **attributes)


def test_clip_with_integer_bounds_keeps_integers():
    x = {"x": RNG.integers(-100, 100, size=(4, 6)).astype(np.int32)}
    ops = check("Clip", x, {"min": np.asarray(-10, np.int32)}, inputs=["x", "min"])
    assert ops[0].attrs == {"clip_value_min": ("int", -10), "clip_value_max": ("int", 2**31 - 1)}


BINARY = {
    "add-row": ("Add", {"a": r(2, 3, 4), "b": r(4)}, {}),
    "sub-broadcast-both": ("Sub", {"a": r(2, 1, 4), "b": r(3, 1)}, {}),
    "mul-by-weight": ("Mul", {"a": r(2, 3, 4)}, {"w": r(3, 4)}),
    "div": ("Div", {"a": r(2, 3)}, {"w": r(2, 3, low=0.5, high=2.0)}),
}


@pytest.mark.parametrize("case", BINARY, ids=list(BINARY))
def test_binary_ops_match_onnxruntime(case):
    op_type, feeds, consts = BINARY[case]
    check(op_type, feeds, consts)


MATMUL = {
    "2d": ({"a": r(5, 7)}, {"b": r(7, 3)}, "MatMulV2"),
    "3d-by-weight": ({"a": r(2, 5, 7)}, {"b": r(7, 3)}, "BatchMatMulV2"),
    "vector-by-matrix": ({"a": r(7)}, {"b": r(7, 3)}, "MatMulV2"),
    "batch-by-vector": ({"a": r(2, 5, 7), "b": r(7)}, {}, "BatchMatMulV2"),
    "broadcast-4d": ({"a": r(2, 1, 4, 6), "b": r(1, 3, 6, 5)}, {}, "BatchMatMulV2"),
}


@pytest.mark.parametrize("case", MATMUL, ids=list(MATMUL))
def test_matmul_matches_onnxruntime(case):
    feeds, consts, cann = MATMUL[case]
    ops = check("MatMul", feeds, consts, tol=1e-4)
    assert cann in [op.op for op in ops]


GEMM = {
    "transB-bias-row": ({"a": r(4, 6)}, {"b": r(5, 6), "c": r(5)}, {"transB": 1}, ["MatMulV2"]),
    "bias-1xN": ({"a": r(4, 6)}, {"b": r(6, 5), "c": r(1, 5)}, {}, ["MatMulV2"]),
    "alpha-beta-full-c": (
        {"a": r(6, 4)},
        {"b": r(6, 5), "c": r(4, 5)},
        {"transA": 1, "alpha": 0.5, "beta": 2.0},
        ["MatMulV2", "Muls", "Muls", "Add"],
    ),
    "column-c": ({"a": r(4, 6)}, {"b": r(6, 5), "c": r(4, 1)}, {}, ["MatMulV2", "Add"]),
    "alpha-no-c": ({"a": r(4, 6)}, {"b": r(6, 5)}, {"alpha": 2.0}, ["MatMulV2", "Muls"]),
}


@pytest.mark.parametrize("case", GEMM, ids=list(GEMM))
def test_gemm_matches_onnxruntime(case):
    feeds, consts, attributes, cann = GEMM[case]
    ops = check("Gemm", feeds, consts, tol=1e-4, **attributes)
    assert [op.op for op in ops] == cann


@pytest.mark.parametrize("op_type", ["Gemm", "MatMul"])
def test_matrix_ops_in_float16(op_type):
    check(op_type, {"a": r(8, 32)}, {"b": r(32, 16)}, half=True)


SHAPES = {
    "flatten": ("Flatten", {"x": r(2, 3, 4, 5)}, {}, {"axis": 2}),
    "reshape": ("Reshape", {"x": r(2, 3, 4)}, {"shape": i64(-1, 6)}, {}),
    "squeeze": ("Squeeze", {"x": r(2, 1, 4)}, {"axes": i64(1)}, {}),
    "unsqueeze": ("Unsqueeze", {"x": r(2, 4)}, {"axes": i64(0, 3)}, {}),
    "transpose": ("Transpose", {"x": r(2, 3, 4, 5)}, {}, {"perm": [0, 2, 3, 1]}),
    "transpose-reversed": ("Transpose", {"x": r(2, 3, 4)}, {}, {}),
    "concat": ("Concat", {"a": r(2, 1, 3), "b": r(2, 4, 3)}, {"w": r(2, 2, 3)}, {"axis": 1}),
    "cast-f16": ("Cast", {"x": r(3, 4)}, {}, {"to": onnx.TensorProto.FLOAT16}),
    "cast-i32": ("Cast", {"x": r(3, 4, low=-50, high=50)}, {}, {"to": onnx.TensorProto.INT32}),
}


@pytest.mark.parametrize("case", SHAPES, ids=list(SHAPES))
def test_data_movement_matches_onnxruntime(case):
    op_type, feeds, consts, attributes = SHAPES[case]
    check(op_type, feeds, consts, **attributes)


@pytest.mark.parametrize(
    ("consts", "attributes", "opset", "sizes"),
    [
        ({"split": i64(2, 3, 2)}, {}, 13, [2, 3, 2]),
        ({}, {"num_outputs": 3}, 18, [3, 3, 1]),
        ({}, {}, 13, None),
    ],
    ids=["split-input", "num-outputs", "equal"],
)
def test_split_matches_onnxruntime(consts, attributes, opset, sizes):
    outputs = ("y0", "y1", "y2")
    x = {"x": r(2, 7 if sizes else 6, 3)}
    ops = check("Split", x, consts, outputs=outputs, opset=opset, axis=-2, **attributes)
    assert ops[0].op == "SplitVD"
    assert ops[0].attrs["size_splits"] == ("list_int", sizes or [2, 2, 2])
    assert ops[0].attrs["split_dim"] == ("int", 1)


RESIZE = {
    "nearest-asymmetric-floor-x2": (
        (1, 2, 3, 4),
        {"scales": np.array([1, 1, 2, 2], F32)},
        {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    ),
    "nearest-half-pixel-sizes": ((1, 2, 5, 6), {"sizes": i64(1, 2, 7, 4)}, {}),
    "nearest-align-corners-ceil": (
        (2, 1, 4, 5),
        {"sizes": i64(2, 1, 7, 9)},
        {"coordinate_transformation_mode": "align_corners", "nearest_mode": "round_prefer_ceil"},
    ),
    "nearest-pytorch-half-pixel-down": (
        (1, 1, 6, 8),
        {"scales": np.array([1, 1, 0.5, 0.5], F32)},
        {"coordinate_transformation_mode": "pytorch_half_pixel", "nearest_mode": "ceil"},
    ),
    "linear-half-pixel-x2": ((1, 2, 4, 5), {"scales": np.array([1, 1, 2, 2], F32)}, {"mode": "linear"}),
    "linear-align-corners-sizes": (
        (1, 2, 4, 5),
        {"sizes": i64(1, 2, 5, 9)},
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    ),
    "linear-asymmetric-x1.5": (
        (1, 1, 4, 6),
        {"scales": np.array([1, 1, 1.5, 1.5], F32)},
        {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
    ),
    "linear-pytorch-half-pixel-down": (
        (2, 2, 6, 7),
        {"sizes": i64(2, 2, 1, 3)},
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
    ),
}


@pytest.mark.parametrize("case", RESIZE, ids=list(RESIZE))
def test_resize_matches_onnxruntime(case):
    shape, consts, attributes = RESIZE[case]
    inputs = ["x", "", "scales"] if "scales" in consts else ["x", "", "", "sizes"]
    ops = check("Resize", {"x": r(*shape)}, consts, inputs=inputs, opset=19, **attributes)
    assert set(ops[0].attrs) & {"scales", "sizes"} == set(consts)


def test_resize_in_float16():
    shape, consts, attributes = RESIZE["linear-half-pixel-x2"]
    check("Resize", {"x": r(*shape)}, consts, inputs=["x", "", "scales"], half=True, opset=19, **attributes)


def test_batch_normalization_matches_onnxruntime():
    params = {"scale": r(3), "bias": r(3), "mean": r(3), "var": r(3, low=0.1, high=2.0)}
    ops = check("BatchNormalization", {"x": r(2, 3, 4, 5)}, params, epsilon=1e-3)
    assert ops[0].op == "BNInfer"
    check("BatchNormalization", {"x": r(2, 3, 4, 5)}, params, half=True)


@pytest.mark.parametrize(
    ("shape", "axis", "bias", "outputs"),
    [((2, 5, 8), -1, True, ("y",)), ((2, 5, 8), -2, False, ("y",)), ((3, 16), 1, True, ("y", "mean"))],
    ids=["last-axis", "two-axes-no-bias", "mean-output"],
)
def test_layer_normalization_matches_onnxruntime(shape, axis, bias, outputs):
    params = {"scale": r(*shape[axis:]), **({"bias": r(*shape[axis:])} if bias else {})}
    check("LayerNormalization", {"x": r(*shape)}, params, outputs=outputs, axis=axis, epsilon=1e-4)


def test_layer_normalization_in_float16():
    check("LayerNormalization", {"x": r(4, 32)}, {"scale": r(32), "bias": r(32)}, half=True)


def test_every_listed_onnx_op_is_supported():
    listed = {
        *("Conv", "BatchNormalization", "Relu", "LeakyRelu", "Sigmoid", "Clip", "Add", "Sub", "Mul", "Div"),
        *("MatMul", "Gemm", "Softmax", "Flatten", "Reshape", "Transpose", "Concat", "Split", "MaxPool"),
        *("AveragePool", "GlobalAveragePool", "Resize", "LayerNormalization", "Gelu", "Identity", "Cast"),
    }
    assert listed <= SUPPORTED
    assert "Erf" not in SUPPORTED


# -- what the lowering refuses ------------------------------------------------------------------------------------

REFUSED = {
    "conv-3d": ("Conv", {"x": r(1, 2, 4, 4, 4)}, {"w": r(3, 2, 2, 2, 2)}, {}, "only 1-D and 2-D"),
    "conv-unknown-attribute": ("Conv", {"x": r(1, 2, 4, 4)}, {"w": r(3, 2, 2, 2)}, {"foo": 1}, "attribute 'foo'"),
    "resize-cubic": (
        "Resize",
        {"x": r(1, 1, 4, 4)},
        {"scales": np.array([1, 1, 2, 2], F32)},
        {"mode": "cubic", "inputs": ["x", "", "scales"]},
        "attr mode: 'cubic'",
    ),
    "resize-antialias": (
        "Resize",
        {"x": r(1, 1, 4, 4)},
        {"scales": np.array([1, 1, 0.5, 0.5], F32)},
        {"mode": "linear", "antialias": 1, "inputs": ["x", "", "scales"], "opset": 18},
        "attribute antialias=1",
    ),
    "resize-computed-scales": (
        "Resize",
        {"x": r(1, 1, 4, 4), "scales": np.array([1, 1, 2, 2], F32)},
        {},
        {"inputs": ["x", "", "scales"]},
        "input 2 ('scales') must be a constant",
    ),
    "maxpool-indices": (
        "MaxPool",
        {"x": r(1, 1, 4, 4)},
        {},
        {"kernel_shape": [2, 2], "outputs": ("y", "indices")},
        "output Indices",
    ),
    "maxpool-dilations": (
        "MaxPool",
        {"x": r(1, 1, 6, 6)},
        {},
        {"kernel_shape": [2, 2], "dilations": [2, 2]},
        "dilations",
    ),
    "batchnorm-training": (
        "BatchNormalization",
        {"x": r(2, 3, 4, 4)},
        {"scale": r(3), "bias": r(3), "mean": r(3), "var": r(3, low=0.5)},
        {"training_mode": 1, "outputs": ("y", "running_mean", "running_var"), "opset": 15},
        "training mode",
    ),
    "clip-bound-not-constant": ("Clip", {"x": r(3, 4), "lo": r()}, {}, {}, "input 1 ('lo') must be a constant"),
    "layernorm-invstddev": (
        "LayerNormalization",
        {"x": r(2, 8)},
        {"scale": r(8)},
        {"outputs": ("y", "mean", "inv_std")},
        "InvStdDev",
    ),
    "conv-bad-auto-pad": ("Conv", {"x": r(1, 2, 4, 4)}, {"w": r(3, 2, 2, 2)}, {"auto_pad": "BOGUS"}, "auto_pad"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_the_lowering_refuses_naming_node_and_attribute(case):
    op_type, feeds, consts, attributes, words = REFUSED[case]
    node = helper.make_node(
        op_type,
        attributes.pop("inputs", [*feeds, *consts]),
        list(attributes.pop("outputs", ("y",))),
        name="node",
        **{k: v for k, v in attributes.items() if k != "opset"},
    )
    specs = {k: (v.shape, v.dtype) for k, v in (*feeds.items(), *consts.items())}
    specs.update({o: ((1, 1, 8, 8), F32) for o in node.output})
    with pytest.raises(LoweringError) as caught:
        lower(node, specs, consts)
    assert str(caught.value).startswith(f"{op_type} node 'node': ")
    assert words in str(caught.value)


def test_an_op_without_lowering_is_refused_naming_it():
    for node in (helper.make_node("Erf", ["x"], ["y"], name="e"), helper.make_node("Relu", ["x"], ["y"], domain="x")):
        with pytest.raises(LoweringError, match="has no lowering to CANN ops"):
            lower(node, {"x": ((2,), F32), "y": ((2,), F32)}, {})


# -- the ops' own checks and costs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op_type", "ins", "attrs", "words"),
    [
        ("Conv2D", [(1, 2, 5, 5), (3, 2, 3, 3)], {}, "Conv2D attr strides: is required"),
        ("Conv2D", [(1, 4, 5, 5), (3, 3, 3, 3)], {"strides": [1, 1, 1, 1], "groups": 2}, "Conv2D filter"),
        ("Conv2D", [(1, 2, 5, 5), (3, 2, 7, 7)], {"strides": [1, 1, 1, 1]}, "has no room for a window of 7"),
        ("MaxPoolV3", [(1, 2, 5, 5)], {"ksize": [1, 1, 2, 2], "strides": [1, 1, 1, 1], "data_format": "NHWC"}, "NCHW"),
        ("AvgPoolV2", [(1, 2, 5, 5)], {"ksize": [1, 1, 2, 2], "strides": [1, 2, 1, 1]}, "N and C set to 1"),
        ("Resize", [(1, 2, 5, 5)], {"scales": [1, 1, 2, 2], "sizes": [1, 2, 10, 10]}, "exactly one of scales"),
        ("SplitVD", [(2, 6)], {"split_dim": 1, "size_splits": [2, 2], "num_split": 2}, "adding up to dim 1's 6"),
    ],
)
def test_ops_refuse_descriptions_naming_the_operand(op_type, ins, attrs, words):
    specs = [TensorSpec(F32, shape) for shape in ins]
    with pytest.raises(InvalidParam, match=words):
        bind(op_type, specs, [], attrs)


def conv_kernel(x, w, dtype=F16, groups=1):
    ins = [TensorSpec(dtype, x), TensorSpec(dtype, w)]
    attrs = {"strides": [1, 1, 1, 1], "pads": [1, 1, 1, 1], "groups": groups}
    return bind("Conv2D", ins, [TensorSpec(dtype, (x[0], w[0], x[2], x[3]))], attrs)


def test_conv2d_costs_its_flops_on_the_cube_and_moves_each_operand_once():
    n, cin, h, w, cout = 2, 16, 32, 32, 32
    kernel = conv_kernel((n, cin, h, w), (cout, cin, 3, 3))
    cost = kernel.cost
    assert cost.unit is Unit.CUBE
    assert cost.flops == 2 * n * h * w * cout * cin * 3 * 3
    assert cost.hbm_bytes == sum(t.nbytes for t in (*kernel.ins, *kernel.outs))
    assert cost.tiles >= 1
    assert 0 < cost.efficiency <= CUBE_EFF_MAX
    assert conv_kernel((n, cin, h, w), (cout, cin, 3, 3), F32).cost.efficiency < cost.efficiency


def test_a_depthwise_conv_fills_a_sliver_of_the_cube():
    dense = conv_kernel((2, 16, 32, 32), (16, 16, 3, 3)).cost
    depthwise = conv_kernel((2, 16, 32, 32), (16, 1, 3, 3), groups=16).cost
    assert depthwise.flops == 2 * 2 * 32 * 32 * 16 * 1 * 9 == dense.flops / 16
    # one useful row in 16 of K's fractal (9 of 16 taps) and of N's (1 of 16 output channels per group)
    assert depthwise.efficiency < dense.efficiency / 16


POOL_OUT = {"MaxPoolV3": (2, 8, 8, 8), "AvgPoolV2": (2, 8, 8, 8), "GlobalAveragePool": (2, 8, 1, 1)}


@pytest.mark.parametrize(
    ("op_type", "attrs"),
    [
        ("MaxPoolV3", {"ksize": [1, 1, 3, 3], "strides": [1, 1, 2, 2], "pads": [1, 1, 1, 1]}),
        ("AvgPoolV2", {"ksize": [1, 1, 2, 2], "strides": [1, 1, 2, 2]}),
        ("GlobalAveragePool", {}),
    ],
)
def test_pools_stream_their_input_and_output_once_on_the_vector_cores(op_type, attrs):
    x = TensorSpec(F16, (2, 8, 16, 16))
    out = POOL_OUT[op_type]
    cost = bind(op_type, [x], [TensorSpec(F16, out)], attrs).cost
    assert cost.unit is Unit.VECTOR and cost.flops == 0
    assert cost.hbm_bytes == x.nbytes + TensorSpec(F16, out).nbytes
    if op_type == "GlobalAveragePool":
        assert cost.tiles == 2 * 8  # one (n, c) plane a tile
