"""flexnpu-atc and the .om format: the file's round trip and every way loads refuses a file, the converter's
folding (numerics checked with onnxruntime), gears, precision modes, and the command line's options and errors."""

from __future__ import annotations

import contextlib
import json
import re
import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from interposer.shim.flexnpu_client import om
from npu.emulated.dtypes import from_acl
from npu.emulated.ops import TensorSpec, bind
from tools.atc import lower as lowering
from tools.atc.cli import main
from tools.atc.convert import ConversionError, Options, convert, fold, parse_batches, parse_input_shape
from workloads import onnx_models

# -- the format -------------------------------------------------------------------------------------------------


def small_model() -> om.Model:
    weight = np.arange(3, dtype=np.float16).tobytes()
    tensors = lambda n: {  # noqa: E731
        "x": om.Tensor("x", 0, (n, 3), 2),
        "w": om.Tensor("w", 1, (3,), 2),
        "x16": om.Tensor("x16", 1, (n, 3), 2),
        "y": om.Tensor("y", 1, (n, 3), 2),
    }
    nodes = (
        om.Node("Cast", ("x",), ("x16",), {"dst_type": ("int", 1)}),
        om.Node(
            "Mul",
            ("x16", "w"),
            ("y",),
            {
                "f": ("float", 0.5),
                "b": ("bool", True),
                "s": ("string", "NCHW"),
                "li": ("list_int", (1, -2)),
                "lf": ("list_float", (1.5, float("inf"))),
                "lb": ("list_bool", (True, False)),
            },
        ),
    )
    return om.Model(
        soc="Ascend910B2",
        inputs=("x",),
        outputs=("y",),
        weights={"w": (64, 6)},
        blob=bytes(64) + weight,
        graphs=(om.Graph(1, tensors(1), nodes), om.Graph(4, tensors(4), nodes)),
        source={"framework": "onnx"},
    )


def test_round_trip():
    model = small_model()
    data = om.dumps(model)
    assert data.startswith(om.MAGIC)
    assert om.loads(data) == model
    assert om.dumps(om.loads(data)) == data


def rebuilt(edit=None, blob: bytes | None = None, version: int = om.VERSION) -> bytes:
    """The small model's file with its header JSON edited by `edit(header)`."""
    data = om.dumps(small_model())
    _, _, length = struct.unpack_from("<8sIQ", data)
    header = json.loads(data[20 : 20 + length])
    if edit:
        edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<8sIQ", om.MAGIC, version, len(text)) + text + (data[20 + length :] if blob is None else blob)


def _set(path: str, value):
    def edit(header):
        *keys, last = path.split(".")
        target = header
        for key in keys:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value

    return edit


GOOD = om.dumps(small_model())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (GOOD[:10], "truncated: 10 bytes"),
        (GOOD[:40], "truncated: the header needs"),
        (GOOD[:-1], "truncated: the weight blob has 69 bytes, the header says 70"),
        (b"GGUF" + GOOD[4:], "not a FlexNPU .om"),
        (rebuilt(version=2), "format version 2 is not supported"),
        (GOOD[:20] + b"}" + GOOD[21:], "the header is not valid JSON"),
        (rebuilt(_set("weights.w", [64, 64]), blob=bytes(70)), "outside the 70-byte blob"),
        (rebuilt(_set("weights.w", [64, 4]), blob=bytes(70)), "weight 'w' has 4 bytes in the blob, its tensor needs 6"),
        (rebuilt(_set("graphs.0.tensors.1.dtype", 99)), "unknown aclDataType 99"),
        (rebuilt(_set("graphs.0.tensors.1.format", 77)), "unknown aclFormat 77"),
        (rebuilt(_set("graphs.0.tensors.1.shape", [-3])), "not a list of non-negative integers"),
        (rebuilt(_set("graphs.0.nodes.1.inputs", ["x16", "nope"])), "tensor 'nope' is not among the graph's tensors"),
        (rebuilt(_set("graphs.0.nodes.1.attrs.li", ["list_int", [1.5]])), "is not of kind list_int"),
        (rebuilt(_set("graphs.0.nodes.1.attrs.li", ["complex", 1])), "expected [kind, value]"),
        (rebuilt(_set("graphs.1.batch", 1)), "gears must have distinct positive batch sizes"),
        (rebuilt(_set("outputs", ["z"])), "model tensor 'z' is not among its tensors"),
        (rebuilt(lambda h: h.pop("soc")), "field 'soc' is missing"),
        (rebuilt(_set("graphs", [])), "has no graph"),
        (rebuilt(_set("graphs", [[]])), "graph 0: expected a JSON dict"),
        (rebuilt(_set("graphs.0.tensors.1.shape", [1 << 40, 1 << 40])), "is larger than any device"),
        (rebuilt(_set("graphs.0.tensors.1.shape", [1] * 129)), "(at most 128)"),
        (rebuilt(_set("graphs.0.nodes.0.inputs", ["x16"])), "node 0 (Cast): reads 'x16' before any node writes it"),
        (rebuilt(_set("graphs.0.nodes.1.outputs", ["w"])), "node 1 (Mul): writes 'w', a model input or weight"),
        (rebuilt(_set("graphs.0.nodes.1.outputs", ["x16"])), "output 'y' is written by no node"),
    ],
)
def test_malformed_files_raise_om_error_naming_the_problem(data: bytes, message: str):
    with pytest.raises(om.OmError, match=re.escape(message)):
        om.loads(data)


def test_any_corruption_is_an_om_error():
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = bytearray(GOOD)
        for i in rng.integers(0, len(data), rng.integers(1, 4)):
            data[i] = rng.integers(0, 256)
        with contextlib.suppress(om.OmError):  # loads either reads it or says what is wrong
            om.loads(bytes(data))
    deep = b"[" * 100_000
    with pytest.raises(om.OmError, match="not valid JSON"):
        om.loads(struct.pack("<8sIQ", om.MAGIC, om.VERSION, len(deep)) + deep)


def test_vendor_om_is_recognized():
    # CANN's ModelFileHeader: magic 0x444F4D49, headsize 256, version, ... (ge inc/framework/executor_c/types.h)
    vendor = struct.pack("<III", 0x444F4D49, 256, 0x10000000) + bytes(244)
    with pytest.raises(om.OmError, match="vendor .om made by CANN's ATC.*pyacl backend"):
        om.loads(vendor)
    with pytest.raises(om.OmError, match="zip archive.*OM2"):
        om.loads(b"PK\x03\x04" + bytes(60))


def test_dumps_refuses_what_loads_would():
    model = small_model()
    bad = om.Model(model.soc, model.inputs, model.outputs, {"w": (64, 60)}, model.blob, model.graphs, {})
    with pytest.raises(om.OmError, match="outside"):
        om.dumps(bad)


# -- the converter ----------------------------------------------------------------------------------------------

SMALL_RESNET = {"image_size": 32, "width": 8, "classes": 10}


@pytest.fixture(scope="module")
def resnet():
    return onnx_models.resnet18(**SMALL_RESNET)


def run(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=True)})


def test_batchnorm_folds_into_conv_without_changing_numerics(resnet):
    folded = fold(resnet, {"images": (2, 3, 32, 32)})
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == [n.op_type for n in resnet.graph.node].count("Conv")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (want,), (got,) = run(resnet, x), run(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def shape_subgraph_model() -> onnx.ModelProto:
    """What exporters write for x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape, plus
    a Constant node, an Identity and a Dropout, all foldable."""
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("Shape", ["x_id"], ["shape"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x_id", "target"], ["flat"]),
        helper.make_node("Dropout", ["flat"], ["dropped"]),
        helper.make_node("Relu", ["dropped"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "view",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 20])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(np.array([-1]), "minus_one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = onnx_models.IR_VERSION
    return model


def test_constant_subgraphs_identity_and_dropout_fold_away():
    model = shape_subgraph_model()
    folded = fold(model, {"x": (3, 4, 5)})
    assert [n.op_type for n in folded.graph.node] == ["Reshape", "Relu"]
    target = next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1])
    assert numpy_helper.to_array(target).tolist() == [3, -1]
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(run(folded, x)[0], run(model, x)[0])


def test_identity_to_a_graph_output_is_removed():
    folded = fold(onnx_models.bert_encoder(layers=1, hidden=32, heads=2, seq=8), {"hidden_states": (1, 8, 32)})
    assert "Identity" not in [n.op_type for n in folded.graph.node]
    assert folded.graph.node[-1].output[0] == "last_hidden_state"


def test_an_identity_from_input_to_output_stays_a_cann_identity():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3]) for name in ("y", "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = onnx_models.IR_VERSION
    converted = convert(model, Options(precision_mode="force_fp32"))
    assert [(n.op, n.inputs, n.outputs) for n in converted.graphs[0].nodes] == [
        ("Identity", ("x",), ("y",)),
        ("Relu", ("x",), ("z",)),
    ]


def test_gears_share_the_weights(resnet):
    static = convert(resnet, Options(input_shapes={"images": (1, 3, 32, 32)}, precision_mode="force_fp32"))
    geared = convert(resnet, Options(precision_mode="force_fp32", dynamic_batch=(1, 2, 8)))
    assert [g.batch for g in geared.graphs] == [1, 2, 8]
    assert [g.tensors["images"].shape for g in geared.graphs] == [(1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32)]
    assert [g.tensors["logits"].shape for g in geared.graphs] == [(1, 10), (2, 10), (8, 10)]
    assert static.graphs[0].batch == 0 and len(static.graphs) == 1
    assert geared.weights == static.weights and geared.blob == static.blob
    with_minus_one = convert(resnet, Options(input_shapes={"images": (-1, 3, 32, 32)}, dynamic_batch=(2, 4)))
    assert [g.tensors["images"].shape[0] for g in with_minus_one.graphs] == [2, 4]


def test_weights_are_aligned_and_hold_the_folded_values(resnet):
    shapes = {"images": (1, 3, 32, 32)}
    model = convert(resnet, Options(input_shapes=shapes, precision_mode="force_fp16"))
    folded = {t.name: numpy_helper.to_array(t) for t in fold(resnet, shapes).graph.initializer}
    assert all(offset % 64 == 0 for offset, _ in model.weights.values())
    conv = next(n for n in model.graphs[0].nodes if n.op.startswith("Conv"))
    weight = next(name for name in conv.inputs if name in model.weights)
    offset, size = model.weights[weight]
    stored = np.frombuffer(model.blob, np.float16, size // 2, offset)
    np.testing.assert_array_equal(stored, folded[weight.removesuffix(":float16")].astype(np.float16).ravel())


def float_dtypes(model: om.Model, names) -> set[int]:
    g = model.graphs[0]
    return {g.tensors[n].dtype for n in names if g.tensors[n].dtype in (0, 1)}


@pytest.fixture(scope="module")
def bert():
    return onnx_models.bert_encoder(layers=1, hidden=32, heads=2, seq=8, batch=2)


def test_force_fp32_keeps_float32(bert):
    model = convert(bert, Options(precision_mode="force_fp32"))
    assert float_dtypes(model, model.graphs[0].tensors) == {0}
    assert not [n for n in model.graphs[0].nodes if n.op == "Cast"]


def test_force_fp16_computes_in_float16_with_casts_at_the_model_io(bert):
    model = convert(bert, Options(precision_mode="force_fp16"))
    g = model.graphs[0]
    io = {*model.inputs, *model.outputs}
    assert float_dtypes(model, io) == {0}
    statistics = {t for n in g.nodes if n.op == "LayerNorm" for t in n.outputs[1:]}  # LayerNorm keeps them fp32
    assert float_dtypes(model, set(g.tensors) - io - statistics) == {1}
    casts = [n for n in g.nodes if n.op == "Cast"]
    assert [(n.inputs[0] in io or n.outputs[0] in io) for n in casts] == [True, True]
    assert g.nodes[-1].outputs == ("last_hidden_state",)


def test_allow_fp32_to_fp16_runs_only_the_matrix_ops_in_float16(bert):
    model = convert(bert, Options(precision_mode="allow_fp32_to_fp16"))
    g = model.graphs[0]
    cube = [n for n in g.nodes if n.op.startswith(("MatMul", "BatchMatMul"))]
    vector = [n for n in g.nodes if n.op not in ("Cast",) and n not in cube]
    assert cube and vector
    assert float_dtypes(model, {t for n in cube for t in (*n.inputs, *n.outputs)}) == {1}
    assert float_dtypes(model, {t for n in vector for t in (*n.inputs, *n.outputs)}) == {0}
    assert float_dtypes(model, [*model.inputs, *model.outputs]) == {0}


def test_a_gear_dependent_constant_is_stored_per_gear():
    """x * size(x, 0): the folded batch size is an operand, so each gear has its own weight."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], end=1),
        helper.make_node("Cast", ["shape"], ["n"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "n"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = onnx_models.IR_VERSION
    converted = convert(model, Options(precision_mode="force_fp32", dynamic_batch=(1, 2)))
    assert sorted(converted.weights) == ["n", "n@batch2"]
    assert om.loads(om.dumps(converted)) == converted


def run_om(model: om.Model, graph: om.Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a gear's graph with the emulated op library's kernels, each node checked by bind as the daemon does."""

    def spec(name: str) -> TensorSpec:
        return TensorSpec(from_acl(graph.tensors[name].dtype, name), graph.tensors[name].shape)

    values = dict(feeds)
    for name, (offset, size) in model.weights.items():
        if name in graph.tensors:
            dtype, shape = spec(name).dtype, spec(name).shape
            values[name] = np.frombuffer(model.blob, dtype, size // dtype.itemsize, offset).reshape(shape)
    for node in graph.nodes:
        attrs = {k: v for k, (_, v) in node.attrs.items()}
        outs = [spec(n) for n in node.outputs]
        kernel = bind(node.op, [spec(n) for n in node.inputs], outs, attrs)
        results = kernel.op.compute([values[n] for n in node.inputs], attrs)
        for name, out, result in zip(node.outputs, outs, results, strict=True):
            values[name] = np.asarray(result).astype(out.dtype).reshape(out.shape)
    return [values[n] for n in model.outputs]


@pytest.mark.parametrize("mode", ["force_fp32", "force_fp16", "allow_fp32_to_fp16"])
@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: onnx_models.resnet18(**SMALL_RESNET), (2, 3, 32, 32)),
        (lambda: onnx_models.yolo_head(image_size=64), (2, 3, 64, 64)),
        (lambda: onnx_models.bert_encoder(layers=1, hidden=32, heads=2, seq=8), (2, 8, 32)),
    ],
    ids=["resnet18", "yolo_head", "bert_encoder"],
)
def test_the_converted_model_computes_what_onnxruntime_does(build, shape, mode):
    model = build()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    converted = om.loads(om.dumps(convert(model, Options(precision_mode=mode, dynamic_batch=(1, 2)))))
    got = run_om(converted, converted.graphs[1], {converted.inputs[0]: x})
    tolerance = 1e-5 if mode == "force_fp32" else 1e-2  # relative to the output's largest magnitude
    for g, want in zip(got, run(model, x), strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, want, rtol=0, atol=tolerance * np.abs(want).max())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Options(), r"input 'images' has a dynamic shape \['batch', 3, 32, 32\]: give it with --input_shape"),
        (Options(input_shapes={"image": (1, 3, 32, 32)}), r"names \['image'\], not inputs of the model"),
        (Options(input_shapes={"images": (1, 3, 32)}), "gives input 'images' 3 dims, it has 4"),
        (Options(input_shapes={"images": (-1, 3, 32, 32)}), "a dynamic batch needs --dynamic_batch_size"),
        (Options(input_shapes={"images": (1, 3, 32, 32)}, dynamic_batch=(1, 2)), "needs a batch dimension to set"),
        (Options(input_shapes={"images": (1, 3, 32, 32)}, precision_mode="fp8"), "--precision_mode=fp8"),
        (Options(input_shapes={"images": (1, 3, 32, 32)}, input_format="NHWC"), "--input_format=NHWC"),
    ],
)
def test_conversion_errors_name_the_cause(resnet, options, message):
    with pytest.raises(ConversionError, match=message):
        convert(resnet, options)


def test_a_dynamic_dim_other_than_the_batch_needs_input_shape_even_with_gears():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = onnx_models.IR_VERSION
    with pytest.raises(ConversionError, match=r"input 'x' has a dynamic shape \['batch', 'seq'\]"):
        convert(model, Options(dynamic_batch=(1, 2)))
    geared = convert(model, Options(input_shapes={"x": (-1, 16)}, dynamic_batch=(1, 2)))
    assert [g.tensors["y"].shape for g in geared.graphs] == [(1, 16), (2, 16)]


def test_option_parsing():
    assert parse_input_shape("images:1,3,224,224; ids:-1,32") == {"images": (1, 3, 224, 224), "ids": (-1, 32)}
    assert parse_input_shape("a:b:1,2") == {"a:b": (1, 2)}  # ATC splits at the last colon
    assert parse_batches("8,1,4") == (1, 4, 8)
    for bad in ("images", "images:1,x", "images:-2,3"):
        with pytest.raises(ConversionError, match="--input_shape entry"):
            parse_input_shape(bad)
    for bad in ("1,1", "0,2", "a"):
        with pytest.raises(ConversionError, match="--dynamic_batch_size"):
            parse_batches(bad)


# -- the command line -------------------------------------------------------------------------------------------


@pytest.fixture
def onnx_file(tmp_path, resnet):
    path = tmp_path / "net.onnx"
    onnx.save(resnet, path)
    return path


def atc(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_converts_with_atc_options(tmp_path, onnx_file):
    out = tmp_path / "net"
    result = atc(
        f"--model={onnx_file}",
        "--framework=5",
        f"--output={out}",
        "--soc_version=Ascend910B4",
        "--input_shape=images:-1,3,32,32",
        "--dynamic_batch_size=1,4",
        "--precision_mode=force_fp32",
    )
    assert result.exit_code == 0, result.output
    assert "ATC run success" in result.output
    model = om.loads((tmp_path / "net.om").read_bytes())
    assert model.soc == "Ascend910B4" and [g.batch for g in model.graphs] == [1, 4]
    assert model.source["precision_mode"] == "force_fp32"
    # click's spelling with a space works too, and the default precision is ATC's: force_fp16
    result = atc(
        "--model",
        str(onnx_file),
        "--framework",
        "5",
        "--output",
        str(out),
        "--soc_version",
        "Ascend910B2",
        "--input_shape",
        "images:1,3,32,32",
    )
    assert result.exit_code == 0, result.output
    assert om.loads((tmp_path / "net.om").read_bytes()).source["precision_mode"] == "force_fp16"


def unsupported_model(tmp_path):
    op = next(op for op in ("Hardmax", "Det", "Einsum", "NonZero") if op not in lowering.SUPPORTED)
    node = helper.make_node(op, ["x"], ["y"], name="the_node")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4] if op == "Hardmax" else None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = onnx_models.IR_VERSION
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    return path, op


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("framework", "--framework=3 (TensorFlow) is not supported: flexnpu-atc converts ONNX models, --framework=5"),
        ("soc", "--soc_version=Ascend310P3 is not an emulated chip (have Ascend910B2"),
        ("dynamic", "input 'images' has a dynamic shape"),
        ("unsupported", "unsupported op {op} in node the_node (supported: "),
        ("missing", "cannot read the ONNX model"),
        ("garbage", "is not an ONNX model"),
    ],
)
def test_cli_errors(tmp_path, onnx_file, case, message):
    args = {"framework": "5", "soc_version": "Ascend910B2", "model": str(onnx_file), "input_shape": "images:1,3,32,32"}
    op = ""
    if case == "framework":
        args["framework"] = "3"
    elif case == "soc":
        args["soc_version"] = "Ascend310P3"
    elif case == "dynamic":
        del args["input_shape"]
    elif case == "unsupported":
        path, op = unsupported_model(tmp_path)
        args.update(model=str(path), input_shape="x:4,4")
    elif case == "missing":
        args["model"] = str(tmp_path / "absent.onnx")
    else:
        (tmp_path / "garbage.onnx").write_bytes(b"\xff" * 64)
        args["model"] = str(tmp_path / "garbage.onnx")
    result = atc(*(f"--{k}={v}" for k, v in args.items()), f"--output={tmp_path / 'out'}")
    assert result.exit_code == 1
    assert "ATC run failed: " in result.stderr
    assert message.format(op=op) in result.stderr
    assert not (tmp_path / "out.om").exists()
