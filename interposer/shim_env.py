"""The environment of an interposed program: the pyACL shim first on its path, FlexNPU's libascendcl.so first on
its library path, and the virtual NPUs it sees."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import interposer.shim

SHIM_PATH = str(Path(interposer.shim.__file__).parent)  # holds acl/ and flexnpu_client/, standard library only
ROOT = Path(__file__).resolve().parent.parent
C_INCLUDE_PATH = str(ROOT / "include")  # acl/acl.h and the headers it includes
C_LIB_PATH = str(ROOT / "clib" / "build")  # libascendcl.so (and libflexnpu_direct.so), built by `make -C clib`
C_LIBRARY = "libascendcl.so"


def shim_env(
    devices: list[str] | None,
    mount: Path | None = None,
    direct: bool = False,
    config: str | None = None,
    phase: str | None = None,
    preload: bool = False,
) -> dict[str, str]:
    """The environment of an interposed program: the shim first on PYTHONPATH, FlexNPU's libascendcl.so first on
    LD_LIBRARY_PATH (and in LD_PRELOAD with `preload`, for a binary whose vendor library path is baked in), and
    which virtual NPUs it sees — device files through a daemon, or virtual NPU names of `config`'s topology in
    its own process (direct; a C program's embedded Python is this interpreter, FLEXNPU_PYTHON)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SHIM_PATH, env.get("PYTHONPATH")]))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [C_LIB_PATH, env.get("LD_LIBRARY_PATH")]))
    if preload:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(Path(C_LIB_PATH) / C_LIBRARY), env.get("LD_PRELOAD")]))
    for key in ("FLEXNPU_DEVICES", "FLEXNPU_DIRECT", "FLEXNPU_CONFIG", "FLEXNPU_PHASE", "FLEXNPU_PYTHON"):
        env.pop(key, None)
    if mount is not None:
        env["FLEXNPU_MOUNT"] = str(mount)
    if phase:
        env["FLEXNPU_PHASE"] = phase
    if direct:
        env["FLEXNPU_DIRECT"] = "1"
        env["FLEXNPU_PYTHON"] = sys.executable
        if config:
            env["FLEXNPU_CONFIG"] = str(Path(config).resolve())
    if devices:
        env["FLEXNPU_DEVICES"] = ",".join(devices)
    return env
