"""AscendCL error codes and the one exception hierarchy every layer raises.

The codes live at the bottom of the import graph (npu) because the emulated device reports them itself, the
scheduler and translator pass them on, and the shim returns them to applications. Each boundary translates
these exceptions once: into a reply code (translate), an errno (FUSE), or a return value (shim).
"""

from __future__ import annotations

import errno
from enum import IntEnum


class AclError(IntEnum):
    """aclError values (acl_base.h / rt_error_codes.h); see shared/ascend-reference.md."""

    SUCCESS = 0
    INVALID_PARAM = 100000
    UNINITIALIZE = 100001
    REPEAT_INITIALIZE = 100002
    INVALID_FILE = 100003
    INVALID_MODEL_ID = 100011
    PARSE_MODEL = 100013
    READ_MODEL_FAILURE = 100014
    MODEL_INPUT_NOT_MATCH = 100017
    MODEL_OUTPUT_NOT_MATCH = 100018
    MODEL_NOT_DYNAMIC = 100019
    OP_NOT_FOUND = 100024
    REPEAT_FINALIZE = 100037
    BAD_ALLOC = 200000
    API_NOT_SUPPORT = 200001
    MEMORY_ADDRESS_UNALIGNED = 200003
    RESOURCE_NOT_MATCH = 200004
    INVALID_RESOURCE_HANDLE = 200005
    FEATURE_UNSUPPORTED = 200006
    RT_PARAM_INVALID = 107000
    RT_INVALID_DEVICEID = 107001
    RT_CONTEXT_NULL = 107002
    RT_STREAM_CONTEXT = 107003
    RT_INVALID_HANDLE = 107017
    RT_INVALID_MALLOC_TYPE = 107018
    RT_WAIT_TIMEOUT = 107019
    RT_TASK_TIMEOUT = 107020
    RT_FEATURE_NOT_SUPPORT = 207000
    RT_MEMORY_ALLOCATION = 207001
    RT_MEMORY_FREE = 207002
    RT_NO_DEVICE = 207004
    RT_RESOURCE_ALLOC_FAIL = 207005
    RT_NO_PERMISSION = 207006
    RT_NO_EVENT_RESOURCE = 207007
    RT_NO_STREAM_RESOURCE = 207008
    RT_NO_MODEL_RESOURCE = 207010
    RT_OVER_LIMIT = 207012
    RT_DEVIDE_OOM = 207018
    INTERNAL_ERROR = 500000
    RT_FAILURE = 500003
    RT_INTERNAL_ERROR = 507000
    RT_STREAM_TASK_FULL = 507002
    RT_AICORE_EXCEPTION = 507015
    RT_STREAM_SYNC_TIMEOUT = 507046
    RT_SOCKET_CLOSE = 507901


class FlexNPUError(Exception):
    """An error a user can act on: an AscendCL code plus a message naming the thing, the value and what to do."""

    code: AclError = AclError.INTERNAL_ERROR
    errno: int = errno.EIO

    def __init__(self, message: str, code: AclError | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidParam(FlexNPUError):
    code = AclError.INVALID_PARAM
    errno = errno.EINVAL


class InvalidHandle(FlexNPUError):
    code = AclError.RT_INVALID_HANDLE
    errno = errno.EBADF


class OutOfMemory(FlexNPUError):
    code = AclError.RT_MEMORY_ALLOCATION
    errno = errno.ENOMEM


class NotSupported(FlexNPUError):
    code = AclError.API_NOT_SUPPORT
    errno = errno.ENOTSUP


class ProtocolError(FlexNPUError):
    """A frame the daemon cannot decode. Answered with EINVAL on the write() that carried it."""

    code = AclError.INVALID_PARAM
    errno = errno.EINVAL
