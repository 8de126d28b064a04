"""The environment of an interposed program: the pyACL shim first on its path, and the virtual NPUs it sees."""

from __future__ import annotations

import os
from pathlib import Path

import interposer.shim

SHIM_PATH = str(Path(interposer.shim.__file__).parent)  # holds acl/ and flexnpu_client/, standard library only


def shim_env(
    devices: list[str] | None,
    mount: Path | None = None,
    direct: bool = False,
    config: str | None = None,
    phase: str | None = None,
) -> dict[str, str]:
    """The environment of an interposed program: the shim first on PYTHONPATH, and which virtual NPUs it sees —
    device files through a daemon, or virtual NPU names of `config`'s topology in its own process (direct)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SHIM_PATH, env.get("PYTHONPATH")]))
    for key in ("FLEXNPU_DEVICES", "FLEXNPU_DIRECT", "FLEXNPU_CONFIG", "FLEXNPU_PHASE"):
        env.pop(key, None)
    if mount is not None:
        env["FLEXNPU_MOUNT"] = str(mount)
    if phase:
        env["FLEXNPU_PHASE"] = phase
    if direct:
        env["FLEXNPU_DIRECT"] = "1"
        if config:
            env["FLEXNPU_CONFIG"] = str(Path(config).resolve())
    if devices:
        env["FLEXNPU_DEVICES"] = ",".join(devices)
    return env
