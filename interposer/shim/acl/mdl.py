"""acl.mdl: offline models (`.om` files made by flexnpu-atc: load, describe, datasets, execute; acl/_models.py
runs them) and stream capture into a replayable graph (aclmdlRICapture*, aclmdlRIExecuteAsync, aclmdlRIDestroy).

The spellings follow pyACL's rule for the C names (drop `aclmdl`, snake_case the rest); return shapes are the
pyACL reference's (hiascend.com pyACL API pages "load_from_file", "get_desc", "get_input_dims",
"add_dataset_buffer", "set_dynamic_batch_size", "get_dynamic_batch", checked against Ascend/samples'
resnet50_imagenet_classification): `(value, ret)` where pyACL returns a status, a bare value where it does not.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass

from acl import _models
from acl._models import ACL_DYNAMIC_TENSOR_NAME, DATASETS, DYNAMIC_TENSOR_SIZE, Dataset, Loaded
from acl._ret import code, failed, value
from flexnpu_client.codec import COMMANDS, Op
from flexnpu_client.errors import AclCallError, AclError
from flexnpu_client.runtime import RUNTIME

ACL_MODEL_RI_CAPTURE_MODE_GLOBAL, ACL_MODEL_RI_CAPTURE_MODE_THREAD_LOCAL, ACL_MODEL_RI_CAPTURE_MODE_RELAXED = 0, 1, 2


@code
def ri_capture_begin(stream: int, mode: int = ACL_MODEL_RI_CAPTURE_MODE_GLOBAL) -> None:
    RUNTIME.call(Op.GRAPH_CAPTURE_BEGIN, stream, stream=stream, mode=mode)


@value(0)
def ri_capture_end(stream: int) -> int:
    handle = COMMANDS[Op.GRAPH_CAPTURE_END].reply.parse(RUNTIME.call(Op.GRAPH_CAPTURE_END, stream, stream=stream))
    RUNTIME.adopt(handle.handle, stream)
    return handle.handle


@code
def ri_execute_async(model_ri: int, stream: int) -> None:
    RUNTIME.submit(Op.GRAPH_LAUNCH, model_ri, graph=model_ri, stream=stream)


@code
def ri_destroy(model_ri: int) -> None:
    RUNTIME.destroy(Op.GRAPH_DESTROY, model_ri)


# Task groups: operators of a capture that a later update replaces (aclmdlRICaptureTaskGrpBegin/End,
# aclmdlRICaptureTaskUpdateBegin/End: the same operators in the same order, on new parameters).


@code
def ri_capture_task_grp_begin(stream: int) -> None:
    RUNTIME.call(Op.GRAPH_GROUP_BEGIN, stream, stream=stream)


@value(0)
def ri_capture_task_grp_end(stream: int) -> int:
    reply = COMMANDS[Op.GRAPH_GROUP_END].reply.parse(RUNTIME.call(Op.GRAPH_GROUP_END, stream, stream=stream))
    RUNTIME.adopt(reply.handle, stream)
    return reply.handle


# An update travels with the stream's asynchronous work (no round trip per update, as a decode step updates
# every layer's attention): a refused one is reported by the stream's next synchronisation.


@code
def ri_capture_task_update_begin(stream: int, handle: int) -> None:
    RUNTIME.submit(Op.GRAPH_UPDATE_BEGIN, stream, stream=stream, group=handle)


@code
def ri_capture_task_update_end(stream: int) -> None:
    RUNTIME.submit(Op.GRAPH_UPDATE_END, stream, stream=stream)


# -- offline models ----------------------------------------------------------------------------------------

ACL_FORMAT_ND, ACL_INT64 = 2, 9  # the dynamic-batch input's format and type, as ATC's models give it


@value(0)
def load_from_file(model_path: str) -> int:
    try:
        with open(model_path, "rb") as f:
            data = f.read()
    except OSError as exc:
        why = f"{model_path}: cannot read the model ({exc.strerror})"
        raise AclCallError(why, AclError.READ_MODEL_FAILURE) from None
    return _models.load(data)


@value(0)
def load_from_mem(model: int, model_size: int) -> int:
    """The model's bytes at host address `model`."""
    if not model or model_size <= 0:
        raise AclCallError(f"load_from_mem: needs host data and a size > 0, got 0x{model:x}, {model_size}")
    return _models.load(ctypes.string_at(model, model_size))


@code
def unload(model_id: int) -> None:
    _models.unload(model_id)


@dataclass
class _Desc:
    model_id: int | None = None


_descs: dict[int, _Desc] = {}
_ids = itertools.count(0x7D_0000_0001)


def create_desc() -> int:
    handle = next(_ids)
    _descs[handle] = _Desc()
    return handle


@code
def get_desc(model_desc: int, model_id: int) -> None:
    _models.loaded(model_id)
    _desc_of(model_desc).model_id = model_id


@code
def destroy_desc(model_desc: int) -> None:
    _desc_of(model_desc)
    del _descs[model_desc]


def _desc_of(handle: int) -> _Desc:
    desc = _descs.get(handle)
    if desc is None:
        raise AclCallError(f"0x{handle:x} is not a model description from acl.mdl.create_desc")
    return desc


def _described(handle: int) -> Loaded:
    desc = _desc_of(handle)
    if desc.model_id is None:
        raise AclCallError("the model description is empty: fill it with acl.mdl.get_desc(desc, model_id)")
    return _models.loaded(desc.model_id)


class _Dynamic:
    """The dynamic-batch input ATC adds after a model's own inputs."""

    name, dtype, format, dims = ACL_DYNAMIC_TENSOR_NAME, ACL_INT64, ACL_FORMAT_ND, (1,)


def _io(handle: int, what: str, index: int):
    """The input or output tensor `index` of the described model (its largest gear), or the dynamic input."""
    found = _described(handle)
    names = found.model.inputs if what == "input" else found.model.outputs
    if what == "input" and found.dynamic and index == len(names):
        return _Dynamic
    if not 0 <= index < len(names):
        count = len(names) + (found.dynamic and what == "input")
        raise AclCallError(f"{what} index {index} is out of range: the model has {count} {what}s")
    return found.model.graphs[-1].tensors[names[index]]


def _safe(default, fn, *args):
    """pyACL's bare-value getters answer a neutral value on a bad argument (0, -1, ""), keeping the message."""
    try:
        return fn(*args)
    except AclCallError as exc:
        failed(getattr(fn, "__name__", "acl.mdl"), exc)
        return default


def get_num_inputs(model_desc: int) -> int:
    return _safe(0, lambda d: len(_described(d).model.inputs) + _described(d).dynamic, model_desc)


def get_num_outputs(model_desc: int) -> int:
    return _safe(0, lambda d: len(_described(d).model.outputs), model_desc)


def _size(tensor) -> int:
    return DYNAMIC_TENSOR_SIZE if tensor is _Dynamic else tensor.nbytes


def get_input_size_by_index(model_desc: int, index: int) -> int:
    return _safe(0, lambda: _size(_io(model_desc, "input", index)))


def get_output_size_by_index(model_desc: int, index: int) -> int:
    return _safe(0, lambda: _size(_io(model_desc, "output", index)))


def _dims(tensor, free_batch: bool) -> dict:
    dims = list(tensor.dims if tensor is _Dynamic else tensor.shape)
    if free_batch and dims and tensor is not _Dynamic:
        dims[0] = -1
    return {"name": tensor.name, "dimCount": len(dims), "dims": dims}


@value({"name": "", "dimCount": 0, "dims": []})
def get_input_dims(model_desc: int, index: int) -> dict:
    return _dims(_io(model_desc, "input", index), _described(model_desc).dynamic)


@value({"name": "", "dimCount": 0, "dims": []})
def get_output_dims(model_desc: int, index: int) -> dict:
    return _dims(_io(model_desc, "output", index), False)


@value({"name": "", "dimCount": 0, "dims": []})
def get_cur_output_dims(model_desc: int, index: int) -> dict:
    """After set_dynamic_batch_size, the chosen gear's dims; else the largest gear's."""
    found = _described(model_desc)
    tensor = _io(model_desc, "output", index)
    if found.current is not None:
        tensor = found.model.graphs[found.current].tensors[tensor.name]
    return _dims(tensor, False)


def get_input_name_by_index(model_desc: int, index: int) -> str:
    return _safe("", lambda: _io(model_desc, "input", index).name)


def get_output_name_by_index(model_desc: int, index: int) -> str:
    return _safe("", lambda: _io(model_desc, "output", index).name)


@value(-1)
def get_input_index_by_name(model_desc: int, name: str) -> int:
    found = _described(model_desc)
    names = [*found.model.inputs, *([ACL_DYNAMIC_TENSOR_NAME] if found.dynamic else [])]
    if name not in names:
        raise AclCallError(f"the model has no input {name!r} (inputs: {', '.join(names)})")
    return names.index(name)


def get_input_data_type(model_desc: int, index: int) -> int:
    return _safe(-1, lambda: _io(model_desc, "input", index).dtype)


def get_output_data_type(model_desc: int, index: int) -> int:
    return _safe(-1, lambda: _io(model_desc, "output", index).dtype)


def get_input_format(model_desc: int, index: int) -> int:
    return _safe(-1, lambda: _io(model_desc, "input", index).format)


def get_output_format(model_desc: int, index: int) -> int:
    return _safe(-1, lambda: _io(model_desc, "output", index).format)


@value({"batchCount": 0, "batch": []})
def get_dynamic_batch(model_desc: int) -> dict:
    found = _described(model_desc)
    batches = [g.batch for g in found.model.graphs] if found.dynamic else []
    return {"batchCount": len(batches), "batch": batches}


@value(0)
def get_input_dynamic_gear_count(model_desc: int, index: int) -> int:
    """Gears of --dynamic_dims, which flexnpu-atc does not make: always 0 (batch gears: get_dynamic_batch)."""
    _described(model_desc)
    return 0


@code
def set_dynamic_batch_size(model_id: int, dataset: int, index: int, batch_size: int) -> None:
    found = _models.loaded(model_id)
    if not found.dynamic:
        why = "the model has no dynamic batch (flexnpu-atc --dynamic_batch_size makes one)"
        raise AclCallError(why, AclError.MODEL_NOT_DYNAMIC)
    if index != len(found.model.inputs):
        raise AclCallError(
            f"index {index} is not the dynamic-batch input ({len(found.model.inputs)}: "
            f"acl.mdl.get_input_index_by_name(desc, {ACL_DYNAMIC_TENSOR_NAME!r}))"
        )
    batches = [g.batch for g in found.model.graphs]
    if batch_size not in batches:
        raise AclCallError(f"batch size {batch_size} is not one of the model's gears {batches}")
    _models.dataset(dataset).batch = batch_size
    found.current = batches.index(batch_size)


# -- datasets -------------------------------------------------------------------------------------------


def create_dataset() -> int:
    handle = next(_ids)
    DATASETS[handle] = Dataset()
    return handle


@code
def destroy_dataset(dataset: int) -> None:
    _models.dataset(dataset)
    del DATASETS[dataset]


@value(0)
def add_dataset_buffer(dataset: int, data_buffer: int) -> int:
    """Returns (dataset, ret), as pyACL does."""
    _models.dataset(dataset).buffers.append(data_buffer)
    return dataset


def get_dataset_buffer(dataset: int, index: int) -> int:
    found = DATASETS.get(dataset)
    return found.buffers[index] if found is not None and 0 <= index < len(found.buffers) else 0


def get_dataset_num_buffers(dataset: int) -> int:
    found = DATASETS.get(dataset)
    return 0 if found is None else len(found.buffers)


@code
def execute(model_id: int, input: int, output: int) -> None:
    _models.execute(model_id, input, output, 0)
    RUNTIME.synchronize_stream(0)


@code
def execute_async(model_id: int, input: int, output: int, stream: int) -> None:
    _models.execute(model_id, input, output, stream)
