"""Drop-in pyACL (`import acl`) for FlexNPU: the same calls and return conventions, forwarded to a virtual NPU.

Only processes that ask for it get this module (`vdevctl run`, or a container's PYTHONPATH), so a real pyACL
on an Ascend host is never shadowed. Standard library only: it runs in a container's bare `python3`.
"""

from __future__ import annotations

from acl import mdl, media, op, rt, util  # noqa: F401  (pyACL exposes these as attributes)
from acl._log import emit
from acl._ret import code, last_error, value
from acl._tensors import (  # noqa: F401
    DTYPE_SIZES,
    create_data_buffer,
    create_tensor_desc,
    destroy_data_buffer,
    destroy_tensor_desc,
    get_data_buffer_addr,
    get_data_buffer_size,
    get_data_buffer_size_v2,
    get_tensor_desc_dim,
    get_tensor_desc_dim_v2,
    get_tensor_desc_element_count,
    get_tensor_desc_format,
    get_tensor_desc_num_dims,
    get_tensor_desc_size,
    get_tensor_desc_type,
    set_tensor_const,
    update_data_buffer,
)
from flexnpu_client.errors import AclCallError
from flexnpu_client.runtime import RUNTIME

VERSION = (1, 0, 0)  # the AscendCL interface version FlexNPU follows, as aclrtGetVersion reports it


@code
def init(config_path: str | None = None) -> None:
    RUNTIME.init()


@code
def finalize() -> None:
    RUNTIME.finalize()


def get_recent_err_msg() -> str:
    """The message of the last failed call, naming what was wrong (aclGetRecentErrMsg)."""
    return last_error["message"]


def app_log(log_level: int, message: str) -> None:
    """aclAppLog: an application's own line in the CANN log (printed only as _log.py describes)."""
    emit(int(log_level), str(message), module="APP")


def get_soc_name() -> str | None:
    """aclrtGetSocName: the emulated chip's SoC name, e.g. Ascend910B2; None when no device is reachable."""
    try:
        return "Ascend" + RUNTIME.chip()
    except AclCallError:  # pyACL answers NULL, it never raises
        return None


def data_type_size(data_type: int) -> int:
    """aclDataTypeSize: bytes per element of an aclDataType; 0 for an unknown type."""
    return DTYPE_SIZES.get(int(data_type), 0)


@value(0, 0, 0)
def get_version() -> tuple[int, int, int]:
    return VERSION
