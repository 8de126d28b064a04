"""Application logging as CANN does it: silent unless ASCEND_SLOG_PRINT_TO_STDOUT=1, then lines at or above
ASCEND_GLOBAL_LOG_LEVEL (0 debug, 1 info, 2 warning, 3 error, the default; 4 none) go to stdout.

The environment is read at each message, as a program may set it after `import acl`.
"""

from __future__ import annotations

import os
import sys
import time

ACL_DEBUG, ACL_INFO, ACL_WARNING, ACL_ERROR = 0, 1, 2, 3
LEVELS = {ACL_DEBUG: "DEBUG", ACL_INFO: "INFO", ACL_WARNING: "WARNING", ACL_ERROR: "ERROR"}


def _threshold() -> int:
    try:
        return int(os.environ.get("ASCEND_GLOBAL_LOG_LEVEL", ACL_ERROR))
    except ValueError:
        return ACL_ERROR


def emit(level: int, message: str, module: str = "ACL") -> None:
    if os.environ.get("ASCEND_SLOG_PRINT_TO_STDOUT") != "1" or level < _threshold():
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%d-%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    print(f"[{LEVELS.get(level, 'ERROR')}] {module}({os.getpid()},{name}):{stamp} {message}", flush=True)
