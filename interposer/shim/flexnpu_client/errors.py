"""The AscendCL codes the client returns (generated from npu/errors.py) and the one exception it raises."""

from __future__ import annotations

from enum import IntEnum

from .layouts import ACL_ERRORS

AclError = IntEnum("AclError", ACL_ERRORS)


class AclCallError(Exception):
    """A failed call: an AscendCL code plus a message naming the thing, the value and what to do."""

    def __init__(self, message: str, code: int = AclError.INVALID_PARAM) -> None:
        super().__init__(message)
        self.code = AclError(code) if code in AclError._value2member_map_ else code

    @property
    def message(self) -> str:
        return str(self.args[0])
