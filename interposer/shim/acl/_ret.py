"""pyACL's return conventions: `ret`, or a tuple with `ret` last; failures log the daemon's message."""

from __future__ import annotations

import functools
import logging
import sys

import structlog

from npu.errors import AclError, FlexNPUError

if not structlog.is_configured():
    # An interposed program's stdout is its own: our warnings go to stderr.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
log = structlog.get_logger("acl")

last_error = {"message": ""}


def _failed(name: str, exc: FlexNPUError) -> int:
    last_error["message"] = exc.message
    log.warning("acl_call_failed", call=name, code=int(exc.code), error=exc.message)
    return int(exc.code)


def code(fn):
    """Returns ret."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except FlexNPUError as exc:
            return _failed(fn.__name__, exc)
        return AclError.SUCCESS.value

    return wrapper


def value(*defaults):
    """Returns (*values, ret); on failure the values are `defaults`."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except FlexNPUError as exc:
                return (*defaults, _failed(fn.__name__, exc))
            return (*result, 0) if isinstance(result, tuple) else (result, 0)

        return wrapper

    return decorate
