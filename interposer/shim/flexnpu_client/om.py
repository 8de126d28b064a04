"""FlexNPU's offline model file (`.om`, made by flexnpu-atc), in the standard library: the shim reads it in any
container's bare python3. The format is described in docs/om-format.md.

Layout: MAGIC, u32 version, u64 header length (little-endian), the header as UTF-8 JSON (everything but the
weights), then the weight blob. `loads` checks everything it reads, so a model that loads can be run without
further checks on its structure: every node names tensors of its graph, every weight lies inside the blob and
matches its tensor's size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from .layouts import ATTR_KINDS

MAGIC = b"FLEXOM\x00\x01"
MAX_DIMS = 128  # ACL_MAX_DIM_CNT (acl_base.h)
MAX_TENSOR_BYTES = 1 << 40  # a tensor past this fits no device: refused here, not at a malloc's wire field
VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length

# aclDataType -> bytes per element (the codes CANN's ge/executor_c/types.h DataType and acl_base.h share)
DTYPE_SIZES = {0: 4, 1: 2, 2: 1, 3: 4, 4: 1, 6: 2, 7: 2, 8: 4, 9: 8, 10: 8, 11: 8, 12: 1, 27: 2}
# aclFormat codes: NCHW, NHWC, ND, NC1HWC0, FRACTAL_Z, NDHWC, FRACTAL_NZ, NCDHW
FORMATS = {0, 1, 2, 3, 4, 27, 29, 30}

# A vendor model made by CANN's ATC starts with ModelFileHeader, whose first field is MODEL_FILE_MAGIC_NUM
# 0x444F4D49, little-endian the bytes "IMOD" (CANN ge: inc/framework/executor_c/types.h).
VENDOR_MAGIC = b"IMOD"

ATTR_KIND_NAMES = frozenset(name.lower() for name in ATTR_KINDS)


class OmError(Exception):
    """A file that is not a FlexNPU .om, or a malformed one; the message says what is wrong."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: int  # aclDataType
    shape: tuple[int, ...]
    format: int  # aclFormat

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class Node:
    op: str  # a CANN op type
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, tuple[str, object]]  # name -> (kind, value); kind an AttrKind name in lower case


@dataclass(frozen=True)
class Graph:
    batch: int  # the gear's batch size; 0 for a static model
    tensors: dict[str, Tensor]  # every tensor of this gear: inputs, outputs, weights, intermediates
    nodes: tuple[Node, ...]  # in topological order


@dataclass(frozen=True)
class Model:
    soc: str  # the --soc_version it was built for, e.g. "Ascend910B2"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: dict[str, tuple[int, int]]  # name -> (offset, nbytes) in blob
    blob: bytes
    graphs: tuple[Graph, ...]  # gears by ascending batch; one if static
    source: dict  # informational: framework, precision_mode, producer, ...


def dumps(model: Model) -> bytes:
    header = {
        "soc": model.soc,
        "inputs": list(model.inputs),
        "outputs": list(model.outputs),
        "weights": {name: list(span) for name, span in model.weights.items()},
        "blob_bytes": len(model.blob),
        "graphs": [
            {
                "batch": g.batch,
                "tensors": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "format": t.format}
                    for t in g.tensors.values()
                ],
                "nodes": [
                    {
                        "op": n.op,
                        "inputs": list(n.inputs),
                        "outputs": list(n.outputs),
                        "attrs": {k: [kind, value] for k, (kind, value) in n.attrs.items()},
                    }
                    for n in g.nodes
                ],
            }
            for g in model.graphs
        ],
        "source": model.source,
    }
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    except (TypeError, ValueError) as exc:
        raise OmError(f"the model holds a value JSON cannot store: {exc}") from None
    _model(json.loads(text), model.blob)  # what loads would refuse is refused here, where the bug is
    return _PREAMBLE.pack(MAGIC, VERSION, len(text)) + text + model.blob


def loads(data: bytes) -> Model:
    data = bytes(data)
    if data[:4] == VENDOR_MAGIC:
        raise OmError(
            "this is a vendor .om made by CANN's ATC (its header starts with 'IMOD'): such models run on real "
            "NPUs through the pyacl backend, not on the emulated chip; convert the source model with flexnpu-atc"
        )
    if data[:4] == b"PK\x03\x04":
        raise OmError(
            "this is a zip archive, not a FlexNPU .om (CANN's newer OM2 packages are zip archives: those run on "
            "real NPUs through the pyacl backend); convert the source model with flexnpu-atc"
        )
    if len(data) < _PREAMBLE.size:
        raise OmError(f"truncated: {len(data)} bytes, shorter than the {_PREAMBLE.size}-byte preamble")
    magic, version, header_len = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise OmError(f"not a FlexNPU .om: it starts with {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise OmError(
            f"format version {version} is not supported (this reader knows version {VERSION}); "
            "convert the model again with this release's flexnpu-atc"
        )
    end = _PREAMBLE.size + header_len
    if len(data) < end:
        raise OmError(f"truncated: the header needs {header_len} bytes, the file has {len(data) - _PREAMBLE.size}")
    try:
        header = json.loads(data[_PREAMBLE.size : end].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise OmError(f"the header is not valid JSON: {exc!r}") from None
    return _model(header, data[end:])


def _model(header: object, blob: bytes) -> Model:
    h = _fields(
        header,
        "header",
        dict,
        soc=str,
        inputs=list,
        outputs=list,
        weights=dict,
        blob_bytes=int,
        graphs=list,
        source=dict,
    )
    if h["blob_bytes"] != len(blob):
        raise OmError(f"truncated: the weight blob has {len(blob)} bytes, the header says {h['blob_bytes']}")
    inputs = _names(h["inputs"], "inputs")
    outputs = _names(h["outputs"], "outputs")
    weights = {}
    for name, span in h["weights"].items():
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(v) and v >= 0 for v in span)):
            raise OmError(f"weight {name!r}: expected [offset, nbytes], got {span!r}")
        offset, size = span
        if offset + size > len(blob):
            raise OmError(f"weight {name!r}: bytes {offset}..{offset + size} lie outside the {len(blob)}-byte blob")
        weights[name] = (offset, size)
    if not h["graphs"]:
        raise OmError("the model has no graph")
    graphs = tuple(_graph(g, i) for i, g in enumerate(h["graphs"]))
    batches = [g.batch for g in graphs]
    if len(graphs) > 1 and (0 in batches or batches != sorted(set(batches))):
        raise OmError(f"gears must have distinct positive batch sizes in ascending order, got {batches}")
    for g in graphs:
        where = f"graph of batch {g.batch}"
        for name in (*inputs, *outputs):
            if name not in g.tensors:
                raise OmError(f"{where}: model tensor {name!r} is not among its tensors")
        for name, (_, size) in weights.items():  # a weight one gear computed differently is in that gear only
            if name in g.tensors and g.tensors[name].nbytes != size:
                raise OmError(
                    f"{where}: weight {name!r} has {size} bytes in the blob, its tensor needs {g.tensors[name].nbytes}"
                )
        _check_order(g, where, set(inputs), set(weights) & set(g.tensors), outputs)
    return Model(h["soc"], inputs, outputs, weights, blob, graphs, h["source"])


def _graph(raw: object, index: int) -> Graph:
    where = f"graph {index}"
    g = _fields(raw, where, dict, batch=int, tensors=list, nodes=list)
    if g["batch"] < 0:
        raise OmError(f"{where}: negative batch {g['batch']}")
    tensors = {}
    for t in g["tensors"]:
        t = _fields(t, f"{where} tensor", dict, name=str, dtype=int, shape=list, format=int)
        name = t["name"]
        if t["dtype"] not in DTYPE_SIZES:
            raise OmError(f"{where} tensor {name!r}: unknown aclDataType {t['dtype']} (have {sorted(DTYPE_SIZES)})")
        if t["format"] not in FORMATS:
            raise OmError(f"{where} tensor {name!r}: unknown aclFormat {t['format']} (have {sorted(FORMATS)})")
        if not all(_is_int(d) and d >= 0 for d in t["shape"]) or len(t["shape"]) > MAX_DIMS:
            raise OmError(
                f"{where} tensor {name!r}: shape {t['shape']} is not a list of non-negative integers "
                f"(at most {MAX_DIMS})"
            )
        if math.prod(t["shape"]) * DTYPE_SIZES[t["dtype"]] > MAX_TENSOR_BYTES:
            raise OmError(
                f"{where} tensor {name!r}: shape {t['shape']} is larger than any device ({MAX_TENSOR_BYTES} bytes)"
            )
        if name in tensors:
            raise OmError(f"{where}: tensor {name!r} is listed twice")
        tensors[name] = Tensor(name, t["dtype"], tuple(t["shape"]), t["format"])
    nodes = []
    for i, n in enumerate(g["nodes"]):
        n = _fields(n, f"{where} node {i}", dict, op=str, inputs=list, outputs=list, attrs=dict)
        what = f"{where} node {i} ({n['op']})"
        ins, outs = _names(n["inputs"], f"{what} inputs"), _names(n["outputs"], f"{what} outputs")
        for name in (*ins, *outs):
            if name not in tensors:
                raise OmError(f"{what}: tensor {name!r} is not among the graph's tensors")
        nodes.append(Node(n["op"], ins, outs, {k: _attr(v, f"{what} attr {k!r}") for k, v in n["attrs"].items()}))
    return Graph(g["batch"], tensors, tuple(nodes))


def _check_order(g: Graph, where: str, inputs: set[str], weights: set[str], outputs: tuple[str, ...]) -> None:
    """Nodes read only what exists by then (the model's inputs, weights, earlier nodes' outputs), never write an
    input or a weight, and write every output: else a run would read memory nobody wrote."""
    written = inputs | weights
    for i, node in enumerate(g.nodes):
        for name in node.inputs:
            if name not in written:
                raise OmError(f"{where} node {i} ({node.op}): reads {name!r} before any node writes it")
        for name in node.outputs:
            if name in inputs or name in weights:
                raise OmError(f"{where} node {i} ({node.op}): writes {name!r}, a model input or weight")
            written.add(name)
    for name in outputs:
        if name not in written:
            raise OmError(f"{where}: output {name!r} is written by no node")


def _attr(raw: object, where: str) -> tuple[str, object]:
    if not (isinstance(raw, list) and len(raw) == 2 and raw[0] in ATTR_KIND_NAMES):
        raise OmError(f"{where}: expected [kind, value] with kind one of {sorted(ATTR_KIND_NAMES)}, got {raw!r}")
    kind, value = raw
    check = _SCALAR_CHECKS[kind.removeprefix("list_")]
    if kind.startswith("list_"):
        if not (isinstance(value, list) and all(map(check, value))):
            raise OmError(f"{where}: value {value!r} is not of kind {kind}")
        return kind, tuple(value)
    if not check(value):
        raise OmError(f"{where}: value {value!r} is not of kind {kind}")
    return kind, value


def _fields(raw: object, where: str, kind: type, **types: type) -> dict:
    if not isinstance(raw, kind):
        raise OmError(f"{where}: expected a JSON {kind.__name__}, got {type(raw).__name__}")
    for name, expected in types.items():
        if name not in raw:
            raise OmError(f"{where}: field {name!r} is missing")
        value = raw[name]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise OmError(f"{where}: field {name!r} should be a {expected.__name__}, got {value!r}")
    return raw


def _names(raw: list, where: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in raw):
        raise OmError(f"{where}: expected tensor names, got {raw!r}")
    return tuple(raw)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


_SCALAR_CHECKS = {"int": _is_int, "float": _is_number, "bool": _is_bool, "string": _is_str}
