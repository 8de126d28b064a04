"""Run-time changes kept across restarts: the virtual NPUs as `vdevctl vnpu` and chmod/chown left them.

The state file holds the whole list of virtual NPUs in the config's own [[virtual]] form (JSON), written after
every change (atomically and synced: a crash leaves the old file or the new one). At start it replaces the
config's list, checked by the same code, as long as the config's list is still the one it started from (a
fingerprint of it is kept): an operator who edits the config is told to delete the state file rather than have
the edit ignored. Deleting it starts from the config again. It lives beside the config, named for the config
and the mount point (`flexnpu.toml`, /dev/flexnpu -> `flexnpu.dev-flexnpu.state.json`: two daemons of one
config keep apart), or with the built-in config under /var/lib/flexnpu (root) or $XDG_STATE_HOME/flexnpu;
`vdevfsd mount --state FILE` chooses another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import structlog

from interposer import config
from interposer.topology import Topology

VERSION = 1
log = structlog.get_logger()


def default_path(config_path: Path | None, mountpoint: Path) -> Path:
    mount = str(mountpoint.absolute()).strip("/").replace("/", "-") or "root"
    if config_path is not None:
        return config_path.with_name(f"{config_path.stem}.{mount}.state.json")
    if os.geteuid() == 0:
        base = Path("/var/lib/flexnpu")
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "flexnpu"
    return base / f"{mount}.state.json"


def fingerprint(cfg: config.Config) -> str:
    """Of the config's own virtual NPUs (before a state file replaced them)."""
    return hashlib.sha256(repr([dataclasses.astuple(v) for v in cfg.virtual]).encode()).hexdigest()[:16]


def load(path: Path, cfg: config.Config) -> bool:
    """Replace `cfg`'s virtual NPUs with the state file's, if there is one; ConfigError naming the file if it is
    unreadable, was written from another config, or names a physical NPU the config lacks."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise config.ConfigError("state", str(path), f"unreadable ({exc}); delete it to start afresh") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION or not isinstance(raw.get("virtual"), list):
        raise config.ConfigError("state", str(path), f"not a version {VERSION} state file; delete it")
    if raw.get("config") != fingerprint(cfg):
        raise config.ConfigError(
            "state",
            str(path),
            "the config's [[virtual]] NPUs changed since this state was written; delete it to start from the "
            "config (the run-time changes it kept are then gone)",
        )
    physical = {p.name for p in cfg.physical}
    try:
        virtual = [config.virtual_spec(t, physical, f"{path}: virtual[{i}].") for i, t in enumerate(raw["virtual"])]
    except config.ConfigError as exc:
        raise config.ConfigError("state", str(path), f"{exc.detail}; delete it to start from the config") from None
    cfg.virtual = virtual
    return True


def save(path: Path, topology: Topology, basis: str) -> None:
    """Write the virtual NPUs; `basis`: the fingerprint of the config they started from."""
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
    with partial.open("w") as f:
        f.write(json.dumps({"version": VERSION, "config": basis, "virtual": virtual}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())  # or a power loss may leave an empty file under the new name
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclasses.dataclass(frozen=True)
class Keeper:
    """Where the daemon keeps its changes, and the fingerprint of the config they started from."""

    path: Path
    basis: str

    def save(self, topology: Topology) -> str | None:
        """Keep the virtual NPUs; why they could not be kept, if so (the change itself stands)."""
        try:
            save(self.path, topology, self.basis)
        except OSError as exc:
            log.error("state_not_saved", state=str(self.path), error=exc.strerror)
            return f"{self.path}: {exc.strerror}"
        return None
