"""acl.util: conversions between Python objects and host pointers (real process addresses)."""

from __future__ import annotations

import ctypes

import numpy as np

# ptr_to_numpy type codes (NumPy's type numbers, as pyACL takes them)
NPY_TYPES = {
    0: np.bool_, 1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16, 5: np.int32, 6: np.uint32,
    7: np.int64, 8: np.uint64, 11: np.float32, 12: np.float64, 23: np.float16,
}  # fmt: skip


def bytes_to_ptr(data: bytes | bytearray) -> int:
    """The address of the object's own buffer (no copy), valid while the object lives."""
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    return ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))


def ptr_to_bytes(ptr: int, size: int) -> bytes:
    return ctypes.string_at(ptr, size)


def numpy_to_ptr(array: np.ndarray) -> int:
    return array.ctypes.data


def ptr_to_numpy(ptr: int, shape, npy_type: int) -> np.ndarray:
    dtype = np.dtype(NPY_TYPES[npy_type])
    count = int(np.prod(shape)) if len(shape) else 1
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
