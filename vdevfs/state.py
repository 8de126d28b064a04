"""Run-time changes kept across restarts: the virtual NPUs as `vdevctl vnpu` and chmod/chown left them.

The state file holds the whole list of virtual NPUs in the config's own [[virtual]] form (JSON), written after
every change (atomically: a crash leaves the old file or the new one). At start it replaces the config's list,
checked by the same code; deleting it starts from the config again. It lives beside the config
(`flexnpu.toml` -> `flexnpu.state.json`), or with the built-in config under /var/lib/flexnpu (root) or
$XDG_STATE_HOME/flexnpu, named for the mount point; `vdevfsd mount --state FILE` chooses another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from interposer import config
from interposer.topology import Topology

VERSION = 1


def default_path(config_path: Path | None, mountpoint: Path) -> Path:
    if config_path is not None:
        return config_path.with_name(config_path.stem + ".state.json")
    if os.geteuid() == 0:
        base = Path("/var/lib/flexnpu")
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "flexnpu"
    name = str(mountpoint.absolute()).strip("/").replace("/", "-") or "root"
    return base / f"{name}.state.json"


def load(path: Path, cfg: config.Config) -> bool:
    """Replace `cfg`'s virtual NPUs with the state file's, if there is one; ConfigError naming the file if it is
    unreadable or no longer fits the config (a physical NPU it names is gone)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise config.ConfigError("state", str(path), f"unreadable ({exc}); delete it to start afresh") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION or not isinstance(raw.get("virtual"), list):
        raise config.ConfigError("state", str(path), f"not a version {VERSION} state file; delete it")
    physical = {p.name for p in cfg.physical}
    try:
        virtual = [config.virtual_spec(t, physical, f"{path}: virtual[{i}].") for i, t in enumerate(raw["virtual"])]
    except config.ConfigError as exc:
        raise config.ConfigError("state", str(path), f"{exc.detail}; delete it to start from the config") from None
    cfg.virtual = virtual
    return True


def save(path: Path, topology: Topology) -> None:
    roles = {phase: name for name, phase in config.ROLES.items()}
    virtual = [
        {
            "name": v.name,
            "physical": v.physical.name,
            "memory": v.quota,
            "role": roles[v.role],
            "owner": f"{v.uid}:{v.gid}",
            "mode": f"{v.mode:04o}",
        }
        | ({} if v.cores is None else {"cores": v.cores})
        for v in topology.virtual
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"version": VERSION, "virtual": virtual}, indent=1) + "\n")
    os.replace(partial, path)
