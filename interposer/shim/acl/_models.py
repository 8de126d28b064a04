"""Offline models in the shim: a `.om` made by flexnpu-atc (flexnpu_client/om.py) loaded onto the current device
and run as its operators' launches.

Loading puts the weights in device memory (one allocation, counted against the virtual NPU's quota: two
processes that load one model each pay for it, as on CANN) and reserves a workspace for the intermediate tensors
of the largest gear. Executing launches every node of the chosen gear's graph on one stream, with the dataset
buffers as the model's inputs and outputs: the launches are asynchronous records that the client sends together
and the daemon runs in stream order — one submission, no round trip per node; `execute` then synchronizes.

One model's executions never overlap, as on CANN where a model instance runs one execution at a time: its
intermediates share one workspace. A lock orders them among the process's threads, and an event orders them on
the device across streams (each execution's launches wait for the previous execution's last record).

A model with gears (`--dynamic_batch_size`) has an extra last input, ACL_DYNAMIC_TENSOR_NAME, as ATC's models
do; `set_dynamic_batch_size` picks the gear for the input dataset it is given.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from dataclasses import dataclass, field

from acl._tensors import BUFFERS
from flexnpu_client import om
from flexnpu_client.codec import AttrKind, Op
from flexnpu_client.errors import AclCallError, AclError
from flexnpu_client.runtime import HOST_TO_DEVICE, RUNTIME

ACL_DYNAMIC_TENSOR_NAME = "ascend_mbatch_shape_data"
DYNAMIC_TENSOR_SIZE = 8  # bytes of that input: the batch size, as an int64
ALIGN = 512  # intermediate tensors start at this alignment in the workspace

INVALID_ID = AclError.INVALID_MODEL_ID
_ids = itertools.count(1)


@dataclass
class Dataset:
    buffers: list[int] = field(default_factory=list)  # data buffer handles (acl.create_data_buffer)
    batch: int | None = None  # the gear chosen by set_dynamic_batch_size


@dataclass
class Loaded:
    model: om.Model
    device: int
    weights: int  # device address of the blob
    workspace: int  # device address of the intermediates
    layouts: list[dict[str, int]]  # per gear: intermediate tensor -> offset in the workspace
    current: int | None = None  # the gear set_dynamic_batch_size chose last (get_cur_output_dims reports it)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int | None = None  # an event recorded after the last execution's launches

    @property
    def dynamic(self) -> bool:
        return len(self.model.graphs) > 1 or self.model.graphs[0].batch > 0


MODELS: dict[int, Loaded] = {}
DATASETS: dict[int, Dataset] = {}


def _layout(model: om.Model, graph: om.Graph) -> tuple[dict[str, int], int]:
    """Offsets of the intermediates (tensors neither inputs, outputs nor weights) and the workspace size."""
    offsets, end = {}, 0
    io = {*model.inputs, *model.outputs, *model.weights}
    for name, tensor in graph.tensors.items():
        if name not in io:
            offsets[name] = end
            end += -(-tensor.nbytes // ALIGN) * ALIGN
    return offsets, end


def load(data: bytes) -> int:
    try:
        model = om.loads(data)
    except om.OmError as exc:
        raise AclCallError(str(exc), AclError.PARSE_MODEL) from None
    chip = RUNTIME.chip()
    if model.soc.removeprefix("Ascend") != chip.removeprefix("Ascend"):
        raise AclCallError(
            f"the model was built for {model.soc} (flexnpu-atc --soc_version), this device is {chip}: convert it "
            f"again with --soc_version={chip if chip.startswith('Ascend') else 'Ascend' + chip}",
            AclError.PARSE_MODEL,
        )
    layouts = [_layout(model, graph) for graph in model.graphs]
    workspace_size = max(size for _, size in layouts)
    weights = RUNTIME.malloc(max(len(model.blob), 1), 0)
    try:
        workspace = RUNTIME.malloc(max(workspace_size, 1), 0)
    except AclCallError:
        RUNTIME.free(weights)
        raise
    if model.blob:
        host = ctypes.create_string_buffer(model.blob, len(model.blob))
        RUNTIME.memcpy(weights, len(model.blob), ctypes.addressof(host), len(model.blob), HOST_TO_DEVICE)
    model_id = next(_ids)
    MODELS[model_id] = Loaded(model, RUNTIME.current_device(), weights, workspace, [o for o, _ in layouts])
    return model_id


def loaded(model_id: int) -> Loaded:
    found = MODELS.get(model_id)
    if found is None:
        raise AclCallError(f"model id {model_id} is not loaded (acl.mdl.load_from_file gives one)", INVALID_ID)
    return found


def unload(model_id: int) -> None:
    found = loaded(model_id)
    del MODELS[model_id]
    RUNTIME.free(found.weights)
    RUNTIME.free(found.workspace)
    if found.done is not None:
        RUNTIME.destroy(Op.EVENT_DESTROY, found.done)


def _gear(found: Loaded, inputs: Dataset) -> int:
    graphs = found.model.graphs
    if not found.dynamic:
        return 0
    if inputs.batch is None:
        batches = [g.batch for g in graphs]
        raise AclCallError(
            f"the model has dynamic batch sizes {batches}: choose one with acl.mdl.set_dynamic_batch_size first",
            AclError.INVALID_PARAM,
        )
    return next(i for i, g in enumerate(graphs) if g.batch == inputs.batch)


def _bound(what: str, dataset: Dataset, names: tuple[str, ...], graph: om.Graph) -> dict[str, int]:
    """Device addresses of the model's inputs (or outputs) from the dataset, each buffer checked for size."""
    if len(dataset.buffers) < len(names):
        raise AclCallError(f"the {what} dataset has {len(dataset.buffers)} buffers; the model has {len(names)} {what}s")
    addresses = {}
    for i, (name, handle) in enumerate(zip(names, dataset.buffers, strict=False)):
        buf = BUFFERS.get(handle)
        if buf is None:
            raise AclCallError(f"{what} {i}: 0x{handle:x} is not a data buffer from acl.create_data_buffer")
        need = graph.tensors[name].nbytes
        if buf.size < need:
            raise AclCallError(f"{what} {i} ({name}): its buffer holds {buf.size} bytes, the tensor needs {need}")
        addresses[name] = buf.ptr
    return addresses


def execute(model_id: int, inputs: int, outputs: int, stream: int) -> None:
    found = loaded(model_id)
    ins, outs = dataset(inputs), dataset(outputs)
    gear = _gear(found, ins)
    graph = found.model.graphs[gear]
    model = found.model
    where = _bound("input", ins, model.inputs, graph) | _bound("output", outs, model.outputs, graph)
    where |= {name: found.weights + offset for name, (offset, _) in model.weights.items()}
    where |= {name: found.workspace + offset for name, offset in found.layouts[gear].items()}

    def operands(names: tuple[str, ...]) -> list:
        return [(t.dtype, t.format, t.shape, where[t.name]) for t in (graph.tensors[n] for n in names)]

    with found.lock:
        if found.done is None:
            found.done = RUNTIME.create(Op.EVENT_CREATE)
        else:  # after the previous execution, whichever stream it went on
            RUNTIME.submit(Op.EVENT_WAIT, found.done, event=found.done, stream=stream)
        for node in graph.nodes:
            attrs = {name: (AttrKind[kind.upper()], value) for name, (kind, value) in node.attrs.items()}
            RUNTIME.launch(node.op, operands(node.inputs), operands(node.outputs), attrs, stream)
        RUNTIME.submit(Op.EVENT_RECORD, found.done, event=found.done, stream=stream)


def dataset(handle: int) -> Dataset:
    found = DATASETS.get(handle)
    if found is None:
        raise AclCallError(f"0x{handle:x} is not a dataset from acl.mdl.create_dataset")
    return found
