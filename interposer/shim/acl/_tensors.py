"""Tensor descriptors and data buffers: host-side objects, as in the real pyACL; operators read them."""

from __future__ import annotations

import ctypes
import itertools
import math
from dataclasses import dataclass

from acl._ret import code
from flexnpu_client.errors import AclCallError
from flexnpu_client.om import DTYPE_SIZES


@dataclass
class TensorDesc:
    dtype: int
    dims: tuple[int, ...]
    format: int
    const: bytes | None = None  # set_tensor_const: the operand's value, uploaded when an operator runs


@dataclass
class DataBuffer:
    ptr: int
    size: int


_ids = itertools.count(0x7E_0000_0001)
DESCS: dict[int, TensorDesc] = {}
BUFFERS: dict[int, DataBuffer] = {}


def create_tensor_desc(dtype: int, dims, format: int) -> int:
    handle = next(_ids)
    DESCS[handle] = TensorDesc(int(dtype), tuple(int(d) for d in dims), int(format))
    return handle


def destroy_tensor_desc(desc: int) -> None:
    DESCS.pop(desc, None)


def get_tensor_desc_size(desc: int) -> int:
    d = DESCS.get(desc)
    return 0 if d is None else math.prod(d.dims) * DTYPE_SIZES.get(d.dtype, 0)


def get_tensor_desc_element_count(desc: int) -> int:
    d = DESCS.get(desc)
    return 0 if d is None else math.prod(d.dims)


def get_tensor_desc_num_dims(desc: int) -> int:
    d = DESCS.get(desc)
    return 0 if d is None else len(d.dims)


def get_tensor_desc_dim_v2(desc: int, index: int) -> tuple[int, int]:
    d = DESCS.get(desc)
    if d is None or not 0 <= index < len(d.dims):
        return -1, 100000
    return d.dims[index], 0


def get_tensor_desc_dim(desc: int, index: int) -> int:
    return get_tensor_desc_dim_v2(desc, index)[0]


def get_tensor_desc_type(desc: int) -> int:
    d = DESCS.get(desc)
    return -1 if d is None else d.dtype


def get_tensor_desc_format(desc: int) -> int:
    d = DESCS.get(desc)
    return -1 if d is None else d.format


def create_data_buffer(ptr: int, size: int) -> int:
    handle = next(_ids)
    BUFFERS[handle] = DataBuffer(int(ptr), int(size))
    return handle


def destroy_data_buffer(buffer: int) -> int:
    return 0 if BUFFERS.pop(buffer, None) is not None else 100000


def get_data_buffer_addr(buffer: int) -> int:
    b = BUFFERS.get(buffer)
    return 0 if b is None else b.ptr


def get_data_buffer_size_v2(buffer: int) -> int:
    b = BUFFERS.get(buffer)
    return 0 if b is None else b.size


get_data_buffer_size = get_data_buffer_size_v2


def update_data_buffer(buffer: int, data: int, size: int) -> int:
    """aclUpdateDataBuffer: point the buffer at other memory (a model's dataset keeps the buffer)."""
    b = BUFFERS.get(buffer)
    if b is None:
        return 100000
    b.ptr, b.size = int(data), int(size)
    return 0


@code
def set_tensor_const(desc: int, data_ptr: int, length: int) -> None:
    """aclSetTensorConst: the operand is a constant; its bytes are copied now from host memory."""
    d = DESCS.get(desc)
    if d is None:
        raise AclCallError(f"set_tensor_const: 0x{desc:x} is not a tensor descriptor")
    if not data_ptr or length <= 0:
        raise AclCallError(f"set_tensor_const: needs host data and a length > 0, got 0x{data_ptr:x}, {length}")
    d.const = ctypes.string_at(data_ptr, length)
