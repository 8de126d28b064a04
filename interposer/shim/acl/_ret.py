"""pyACL's return conventions: `ret`, or a tuple with `ret` last. A failure prints nothing by default, as
with pyACL: its message is kept for get_recent_err_msg() and goes to the CANN-style log (_log.py)."""

from __future__ import annotations

import functools

from acl import _log
from flexnpu_client.errors import AclCallError, AclError

last_error = {"message": ""}


def failed(name: str, exc: AclCallError) -> int:
    last_error["message"] = exc.message
    _log.emit(_log.ACL_ERROR, f"[{name}] {exc.message} (error code {int(exc.code)})")
    return int(exc.code)


def code(fn):
    """Returns ret."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except AclCallError as exc:
            return failed(fn.__name__, exc)
        return AclError.SUCCESS.value

    return wrapper


def value(*defaults):
    """Returns (*values, ret); on failure the values are `defaults`."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except AclCallError as exc:
                return (*defaults, failed(fn.__name__, exc))
            return (*result, 0) if isinstance(result, tuple) else (result, 0)

        return wrapper

    return decorate


def refused(*defaults):
    """A call whose feature FlexNPU does not emulate yet: ACL_ERROR_FEATURE_UNSUPPORTED with a message (after
    `defaults` where pyACL returns a tuple). Marked so that the API coverage table lists it as refused."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            message = f"acl.{fn.__module__.removeprefix('acl.')}.{fn.__name__}: {fn.__doc__}"
            ret = failed(fn.__name__, AclCallError(message, AclError.FEATURE_UNSUPPORTED))
            return (*defaults, ret) if defaults else ret

        wrapper.refused = True
        return wrapper

    return decorate
