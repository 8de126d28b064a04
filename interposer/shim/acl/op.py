"""acl.op: single-operator execution (aclopExecuteV2) with attributes, as pyACL spells it."""

from __future__ import annotations

import itertools

from acl._ret import code
from acl._tensors import BUFFERS, DESCS
from interposer.runtime import RUNTIME
from interposer.wire import AttrKind
from npu.errors import InvalidParam

_ids = itertools.count(0x7A_0000_0001)
ATTRS: dict[int, dict] = {}
_model_dir = {"path": ""}


def create_attr() -> int:
    handle = next(_ids)
    ATTRS[handle] = {}
    return handle


@code
def destroy_attr(attr: int) -> None:
    ATTRS.pop(attr, None)


def _setter(kind: AttrKind, convert):
    @code
    def set_attr(attr: int, name: str, value) -> None:
        if attr not in ATTRS:
            raise InvalidParam(f"set_attr: 0x{attr:x} is not an attr from acl.op.create_attr")
        ATTRS[attr][name] = (kind, convert(value))

    return set_attr


set_attr_int = _setter(AttrKind.INT, int)
set_attr_float = _setter(AttrKind.FLOAT, float)
set_attr_bool = _setter(AttrKind.BOOL, bool)
set_attr_string = _setter(AttrKind.STRING, str)
set_attr_list_int = _setter(AttrKind.LIST_INT, lambda v: [int(x) for x in v])
set_attr_list_float = _setter(AttrKind.LIST_FLOAT, lambda v: [float(x) for x in v])
set_attr_list_bool = _setter(AttrKind.LIST_BOOL, lambda v: [bool(x) for x in v])


@code
def set_model_dir(path: str) -> None:
    """Operators are built into the emulated device; the directory is recorded and not read."""
    _model_dir["path"] = path


def _operands(what: str, descs, buffers) -> list:
    if len(descs) != len(buffers):
        raise InvalidParam(f"execute_v2: {len(descs)} {what} descriptors but {len(buffers)} {what} buffers")
    operands = []
    for i, (d, b) in enumerate(zip(descs, buffers, strict=True)):
        desc, buf = DESCS.get(d), BUFFERS.get(b)
        if desc is None or buf is None:
            raise InvalidParam(f"execute_v2 {what} {i}: unknown tensor descriptor or data buffer")
        operands.append((desc.dtype, desc.format, desc.dims, buf.ptr))
    return operands


@code
def execute_v2(op_type: str, input_desc, inputs, output_desc, outputs, attr: int, stream: int) -> None:
    attrs = ATTRS.get(attr, {}) if attr else {}
    ins, outs = _operands("input", input_desc, inputs), _operands("output", output_desc, outputs)
    RUNTIME.launch(op_type, ins, outs, attrs, stream)
