"""ONNX models for the converter's and the offline-model runtime's tests, built with onnx.helper from seeded
random weights (nothing is downloaded). Each one is what an exporter writes for its kind of network: ResNets
with BatchNormalization after every Conv, a YOLO-style detector, a BERT encoder.

`batch=None` leaves the batch dimension symbolic ("batch"), as exported models have it; an int fixes it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20  # Gelu is in opset 20
IR_VERSION = 10  # what onnxruntime releases of the last two years all load


class _Builder:
    """A graph under construction: nodes, initializers, unique names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def const(self, kind: str, value: np.ndarray) -> str:
        name = self.name(kind)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self.name(op_type.lower())
        outputs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs if n_out > 1 else outputs[0]

    def weight(self, kind: str, shape: tuple[int, ...], fan_in: int) -> str:
        return self.const(kind, (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def conv_bn(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, gamma: float = 1.0) -> str:
        """Conv (no bias, as torchvision's) then BatchNormalization with non-trivial running statistics."""
        w = self.weight("conv_w", (c_out, c_in, k, k), c_in * k * k)
        y = self.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        scale = self.const("bn_scale", (gamma * self.rng.uniform(0.5, 1.5, c_out)).astype(np.float32))
        bias = self.const("bn_bias", self.rng.uniform(-0.1, 0.1, c_out).astype(np.float32))
        mean = self.const("bn_mean", self.rng.uniform(-0.1, 0.1, c_out).astype(np.float32))
        var = self.const("bn_var", self.rng.uniform(0.5, 1.5, c_out).astype(np.float32))
        return self.op("BatchNormalization", [y, scale, bias, mean, var], epsilon=1e-5)

    def linear(self, x: str, n_in: int, n_out: int) -> str:
        w = self.weight("fc_w", (n_in, n_out), n_in)
        b = self.const("fc_b", self.rng.uniform(-0.1, 0.1, n_out).astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="flexnpu-tests")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _batch(batch: int | None) -> int | str:
    return "batch" if batch is None else batch


def _resnet(name: str, blocks: list[int], bottleneck: bool, batch, seed, image_size, width, classes):
    b = _Builder(seed)
    x = b.op("Relu", [b.conv_bn("images", 3, width, 7, stride=2)])
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in, expansion = width, 4 if bottleneck else 1
    for stage, count in enumerate(blocks):
        mid = width << stage
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            c_out = mid * expansion
            # the last BN of a residual branch starts small, as zero-init-residual training leaves it: the
            # activations stay O(1) through 50 layers, so fp16 runs neither overflow nor lose everything
            if bottleneck:
                y = b.op("Relu", [b.conv_bn(x, c_in, mid, 1)])
                y = b.op("Relu", [b.conv_bn(y, mid, mid, 3, stride)])
                y = b.conv_bn(y, mid, c_out, 1, gamma=0.2)
            else:
                y = b.op("Relu", [b.conv_bn(x, c_in, mid, 3, stride)])
                y = b.conv_bn(y, mid, c_out, 3, gamma=0.2)
            shortcut = b.conv_bn(x, c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else x
            x = b.op("Relu", [b.op("Add", [y, shortcut])])
            c_in = c_out
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    w = b.weight("fc_w", (classes, c_in), c_in)
    bias = b.const("fc_b", np.zeros(classes, np.float32))
    b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["logits"], name="fc", transB=1))
    n = _batch(batch)
    return b.model(
        name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [n, 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, classes])],
    )


def resnet50(batch: int | None = None, seed: int = 0, image_size: int = 224, width: int = 64, classes: int = 1000):
    """ResNet-50 v1.5 (bottleneck blocks 3-4-6-3, stride in the 3x3 conv), input "images", output "logits"."""
    return _resnet("resnet50", [3, 4, 6, 3], True, batch, seed, image_size, width, classes)


def resnet18(batch: int | None = None, seed: int = 0, image_size: int = 224, width: int = 64, classes: int = 1000):
    """ResNet-18 (basic blocks 2-2-2-2); `width` and `image_size` shrink it for fast tests."""
    return _resnet("resnet18", [2, 2, 2, 2], False, batch, seed, image_size, width, classes)


def yolo_head(batch: int | None = None, seed: int = 0, image_size: int = 128, classes: int = 4, anchors: int = 3):
    """A small YOLO-style detector: a Conv-BN-SiLU backbone to strides 8 and 16, an FPN step (Resize upsample
    of the stride-16 map, Concat with the stride-8 map), and one head per stride whose Sigmoid predictions are
    laid out as YOLOv5 exports them, (batch, anchors, H, W, 5 + classes). Outputs "p8" and "p16"."""
    b = _Builder(seed)

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int = 1) -> str:
        y = b.conv_bn(x, c_in, c_out, k, stride)
        return b.op("Mul", [y, b.op("Sigmoid", [y])])  # SiLU as exporters write it

    def head(x: str, c_in: int, out: str, size: int) -> None:
        per = 5 + classes
        w = b.weight("head_w", (anchors * per, c_in, 1, 1), c_in)
        bias = b.const("head_b", b.rng.uniform(-0.5, 0.5, anchors * per).astype(np.float32))
        y = b.op("Conv", [x, w, bias], kernel_shape=[1, 1])
        y = b.op("Reshape", [y, b.const("head_shape", np.array([0, anchors, per, size, size], np.int64))])
        y = b.op("Transpose", [y], perm=[0, 1, 3, 4, 2])
        b.nodes.append(helper.make_node("Sigmoid", [y], [out], name=b.name("sigmoid")))

    x = conv("images", 3, 16, 3, 2)
    x = conv(x, 16, 32, 3, 2)
    p8 = conv(x, 32, 64, 3, 2)
    p16 = conv(p8, 64, 128, 3, 2)
    lateral = conv(p16, 128, 64, 1)
    scales = b.const("up_scales", np.array([1, 1, 2, 2], np.float32))
    up = b.op("Resize", [lateral, "", scales], mode="nearest")
    fused = conv(b.op("Concat", [up, p8], axis=1), 128, 64, 3)
    head(fused, 64, "p8", image_size // 8)
    head(p16, 128, "p16", image_size // 16)
    n, per = _batch(batch), 5 + classes
    return b.model(
        "yolo_head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [n, 3, image_size, image_size])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, anchors, image_size // s, image_size // s, per])
            for name, s in (("p8", 8), ("p16", 16))
        ],
    )


def bert_encoder(
    layers: int = 2, hidden: int = 128, heads: int = 4, seq: int = 32, batch: int | None = None, seed: int = 0
):
    """A BERT encoder stack (post-LayerNorm, Gelu FFN of 4x hidden) on embeddings: input "hidden_states"
    (batch, seq, hidden), output "last_hidden_state" of the same shape."""
    b = _Builder(seed)
    head_dim = hidden // heads
    split = b.const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge = b.const("merge_heads", np.array([0, 0, hidden], np.int64))
    inv_sqrt = b.const("inv_sqrt_d", np.array(1.0 / np.sqrt(head_dim), np.float32))

    def layer_norm(x: str) -> str:
        gamma = b.const("ln_gamma", b.rng.uniform(0.8, 1.2, hidden).astype(np.float32))
        beta = b.const("ln_beta", b.rng.uniform(-0.1, 0.1, hidden).astype(np.float32))
        return b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-12)

    def heads_of(x: str, perm: list[int]) -> str:
        return b.op("Transpose", [b.op("Reshape", [b.linear(x, hidden, hidden), split])], perm=perm)

    x = "hidden_states"
    for _ in range(layers):
        q = heads_of(x, [0, 2, 1, 3])
        k = heads_of(x, [0, 2, 3, 1])  # already transposed for q @ k^T
        v = heads_of(x, [0, 2, 1, 3])
        probs = b.op("Softmax", [b.op("Mul", [b.op("MatMul", [q, k]), inv_sqrt])], axis=-1)
        context = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(b.op("Add", [x, b.linear(context, hidden, hidden)]))
        ffn = b.linear(b.op("Gelu", [b.linear(x, hidden, 4 * hidden)]), 4 * hidden, hidden)
        x = layer_norm(b.op("Add", [x, ffn]))
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    n = _batch(batch)
    return b.model(
        "bert_encoder",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [n, seq, hidden])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [n, seq, hidden])],
    )
