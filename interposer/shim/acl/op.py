"""acl.op: single-operator execution (aclopExecuteV2, aclopCreateHandle/ExecWithHandle, aclopCast) with
attributes, as pyACL spells it."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from acl._ret import code, value
from acl._tensors import BUFFERS, DESCS
from flexnpu_client.codec import AttrKind
from flexnpu_client.errors import AclCallError, AclError
from flexnpu_client.runtime import RUNTIME

_ids = itertools.count(0x7A_0000_0001)
ATTRS: dict[int, dict] = {}
_model_dir = {"path": ""}


@dataclass(frozen=True)
class Handle:
    op_type: str
    input_desc: tuple
    output_desc: tuple
    attrs: dict


HANDLES: dict[int, Handle] = {}


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
            raise AclCallError(f"set_attr: 0x{attr:x} is not an attr from acl.op.create_attr")
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
def set_model_dir(model_dir: str) -> None:
    """Operators are built into the emulated device, so nothing is read from the directory; but as pyACL, which
    loads the *.om files under it (aclpythondevg "set_model_dir"), a directory that is not there is an error."""
    if not os.path.isdir(model_dir):
        raise AclCallError(
            f"set_model_dir: {model_dir!r} is not a directory (it should hold the single-operator *.om models)",
            AclError.INVALID_FILE,
        )
    _model_dir["path"] = model_dir


def _descs(what: str, descs) -> list:
    unknown = [i for i, d in enumerate(descs) if d not in DESCS]
    if unknown:
        raise AclCallError(f"{what} {unknown[0]}: 0x{descs[unknown[0]]:x} is not a tensor descriptor")
    return [DESCS[d] for d in descs]


def _operands(what: str, descs: list, buffers) -> list:
    if len(descs) != len(buffers):
        raise AclCallError(f"{len(descs)} {what} descriptors but {len(buffers)} {what} buffers")
    operands = []
    for i, (desc, b) in enumerate(zip(descs, buffers, strict=True)):
        buf = BUFFERS.get(b)
        if buf is None:
            raise AclCallError(f"{what} {i}: 0x{b:x} is not a data buffer from acl.create_data_buffer")
        ptr = RUNTIME.constant(desc.const) if desc.const is not None else buf.ptr
        operands.append((desc.dtype, desc.format, desc.dims, ptr))
    return operands


def _attrs(attr: int) -> dict:
    if attr and attr not in ATTRS:
        raise AclCallError(f"0x{attr:x} is not an attr from acl.op.create_attr")
    return dict(ATTRS[attr]) if attr else {}


@code
def execute_v2(op_type: str, input_desc, inputs, output_desc, outputs, attr: int, stream: int) -> None:
    ins = _operands("input", _descs("input", input_desc), inputs)
    outs = _operands("output", _descs("output", output_desc), outputs)
    RUNTIME.launch(op_type, ins, outs, _attrs(attr), stream)


@value(0)
def create_handle(op_type: str, input_desc, output_desc, op_attr: int) -> int:
    """aclopCreateHandle: the operator's type, descriptors and attributes, fixed for every later execution."""
    handle = next(_ids)
    ins, outs = _descs("input", input_desc), _descs("output", output_desc)
    HANDLES[handle] = Handle(op_type, tuple(ins), tuple(outs), _attrs(op_attr))
    return handle


@code
def execute_with_handle(handle: int, inputs, outputs, stream: int) -> None:
    op = HANDLES.get(handle)
    if op is None:
        raise AclCallError(f"execute_with_handle: 0x{handle:x} is not a handle from acl.op.create_handle")
    ins = _operands("input", list(op.input_desc), inputs)
    outs = _operands("output", list(op.output_desc), outputs)
    RUNTIME.launch(op.op_type, ins, outs, op.attrs, stream)


def destroy_handle(handle: int) -> None:
    HANDLES.pop(handle, None)


@code
def cast(src_desc: int, src_buffer: int, dst_desc: int, dst_buffer: int, truncate: int, stream: int) -> None:
    """aclopCast: the emulated Cast operator, to the destination descriptor's data type."""
    ins = _operands("input", _descs("input", [src_desc]), [src_buffer])
    outs = _operands("output", _descs("output", [dst_desc]), [dst_buffer])
    RUNTIME.launch("Cast", ins, outs, {"dst_type": (AttrKind.INT, outs[0][0])}, stream)
