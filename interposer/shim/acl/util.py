"""acl.util: conversions between Python objects and host pointers (real process addresses), and the threads
that process host callbacks. numpy is imported only by the calls that take or return numpy arrays."""

from __future__ import annotations

import ctypes
import weakref

from acl._ret import code, value
from flexnpu_client.runtime import RUNTIME

# ptr_to_numpy type codes (NumPy's type numbers, as pyACL takes them)
NPY_TYPES = {
    0: "bool", 1: "int8", 2: "uint8", 3: "int16", 4: "uint16", 5: "int32", 6: "uint32",
    7: "int64", 8: "uint64", 11: "float32", 12: "float64", 23: "float16",
}  # fmt: skip
_copies: dict[int, object] = {}  # contiguous copies, each kept until the array it was made from is gone


def bytes_to_ptr(data: bytes | bytearray) -> int:
    """The address of the object's own buffer (no copy), valid while the object lives."""
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    return ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))


def ptr_to_bytes(ptr: int, size: int) -> bytes:
    return ctypes.string_at(ptr, size)


def numpy_to_ptr(array) -> int:
    return array.ctypes.data


def numpy_contiguous_to_ptr(array) -> int:
    """The address of the array's data laid out C-contiguously: the array's own buffer when it already is,
    else a contiguous copy kept alive as long as the array."""
    if array.flags.c_contiguous:
        return array.ctypes.data
    import numpy as np

    copy = np.ascontiguousarray(array)
    _copies[id(copy)] = copy
    weakref.finalize(array, _copies.pop, id(copy), None)
    return copy.ctypes.data


def ptr_to_numpy(ptr: int, shape, npy_type: int):
    import numpy as np

    dtype = np.dtype(NPY_TYPES[npy_type])
    count = 1
    for n in shape:
        count *= int(n)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


@value(0)
def start_thread(fn, args_list) -> int:
    """A thread running fn(args_list), typically a loop around acl.rt.process_report; returns its id."""
    return RUNTIME.reports.start_thread(fn, args_list)


@code
def stop_thread(thread_id: int) -> None:
    """Waits for a thread start_thread started to return."""
    RUNTIME.reports.stop_thread(thread_id)
