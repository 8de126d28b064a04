"""aclDataType codes <-> numpy dtypes (bfloat16 from ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from npu.errors import InvalidParam

ACL_DTYPES: dict[int, np.dtype] = {
    0: np.dtype(np.float32),
    1: np.dtype(np.float16),
    2: np.dtype(np.int8),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    6: np.dtype(np.int16),
    7: np.dtype(np.uint16),
    8: np.dtype(np.uint32),
    9: np.dtype(np.int64),
    10: np.dtype(np.uint64),
    11: np.dtype(np.float64),
    12: np.dtype(np.bool_),
    27: np.dtype(ml_dtypes.bfloat16),
}
CODES = {dtype: code for code, dtype in ACL_DTYPES.items()}
FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)}


def from_acl(code: int, what: str) -> np.dtype:
    try:
        return ACL_DTYPES[code]
    except KeyError:
        raise InvalidParam(f"{what}: aclDataType {code} is not supported (have {sorted(ACL_DTYPES)})") from None


def name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.name
