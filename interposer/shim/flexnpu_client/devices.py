"""Which virtual NPUs a process sees, numbered from 0 as ASCEND_RT_VISIBLE_DEVICES renumbers them on a host.

FLEXNPU_DEVICES   comma-separated device files (set by `vdevctl run --devices`), or virtual NPU names
                  in direct mode;
otherwise         /dev/davinci<N> files that are FlexNPU nodes (a container with bound nodes), else the
                  davinci<N> files under FLEXNPU_MOUNT (default /dev/flexnpu).
"""

from __future__ import annotations

import glob
import os
import re
import stat

DEFAULT_MOUNT = "/dev/flexnpu"


def _numbered(paths: list[str]) -> list[str]:
    def key(path: str) -> int:
        return int(re.search(r"([0-9]+)$", path).group(1))

    return sorted((p for p in paths if re.search(r"/davinci[0-9]+$", p)), key=key)


def visible(devices: list[str], spec: str | None) -> list[str]:
    """Apply ASCEND_RT_VISIBLE_DEVICES: logical ids, parsing stops at the first invalid entry."""
    if spec is None:
        return devices
    chosen = []
    for item in spec.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) >= len(devices) or devices[int(item)] in chosen:
            break
        chosen.append(devices[int(item)])
    return chosen


def bound_nodes() -> list[str]:
    """/dev/davinci<N> files that are FlexNPU nodes: bound FlexNPU nodes are regular files; real driver nodes
    are character devices and are not ours."""
    return [p for p in _numbered(glob.glob("/dev/davinci*")) if stat.S_ISREG(os.stat(p).st_mode)]


def discover(direct_names: list[str] | None = None) -> list[str]:
    """Device files (or, in direct mode, virtual NPU names) this process sees, in logical order."""
    explicit = os.environ.get("FLEXNPU_DEVICES")
    if explicit:
        devices = [d.strip() for d in explicit.split(",") if d.strip()]
    elif direct_names is not None:
        devices = direct_names
    else:
        mount = os.environ.get("FLEXNPU_MOUNT", DEFAULT_MOUNT)
        devices = bound_nodes() or _numbered(glob.glob(os.path.join(mount, "davinci*")))
    return visible(devices, os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
