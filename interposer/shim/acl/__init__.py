"""Drop-in pyACL (`import acl`) for FlexNPU: the same calls and return conventions, forwarded to a virtual NPU.

Only processes that ask for it get this module (`vdevctl run`, or a container's PYTHONPATH), so a real pyACL
on an Ascend host is never shadowed.
"""

from __future__ import annotations

from acl import mdl, op, rt, util  # noqa: F401  (pyACL exposes these as attributes)
from acl._ret import code, last_error
from acl._tensors import (  # noqa: F401
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
)
from interposer.runtime import RUNTIME


@code
def init(config_path: str | None = None) -> None:
    RUNTIME.init()


@code
def finalize() -> None:
    RUNTIME.finalize()


def get_recent_err_msg() -> str:
    """The message of the last failed call, naming what was wrong (aclGetRecentErrMsg)."""
    return last_error["message"]
