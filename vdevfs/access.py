"""Who may open a device node: the permission bits of its owner, group and others, as the kernel checks them."""

from __future__ import annotations

import json
import os
import pwd

from interposer.topology import VirtualNPU

READ_WRITE = 0o6  # a session needs both: frames go in by write(), replies come out by read()


def groups(uid: int, gid: int) -> set[int]:
    """The requester's groups: FUSE names only the primary one, the rest come from the user database."""
    try:
        return {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
    except KeyError:  # a uid with no passwd entry (common in containers) has its primary group only
        return {gid}


def may_open(vdev: VirtualNPU, uid: int, member_of: set[int]) -> bool:
    if uid == 0:
        return True
    if uid == vdev.uid:
        bits = vdev.mode >> 6
    elif vdev.gid in member_of:
        bits = vdev.mode >> 3
    else:
        bits = vdev.mode
    return bits & READ_WRITE == READ_WRITE


def visible_status(status: dict, visible: set[str]) -> dict:
    """The status as a user who may open only the virtual NPUs named in `visible` sees it."""
    virtual = [v for v in status["virtual"] if v["name"] in visible]
    backing = {v["physical"] for v in virtual}
    return status | {"virtual": virtual, "physical": [p for p in status["physical"] if p["name"] in backing]}


def status_file(status: dict, virtual: list[VirtualNPU], uid: int, gid: int) -> bytes:
    """The status file's bytes as `uid` sees them: only the virtual NPUs they may open, and their sessions."""
    if uid != 0:
        member_of = groups(uid, gid)
        status = visible_status(status, {v.name for v in virtual if may_open(v, uid, member_of)})
    return json.dumps(status, indent=1).encode() + b"\n"
