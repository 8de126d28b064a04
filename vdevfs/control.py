"""The `control` node: an operator changes the running daemon by writing a command and reading one reply line.

    policy <npu> <name>                 switch a physical NPU's scheduling policy (with its [policy.<name>] options)
    vnpu create physical=NPU memory=SIZE [cores=N] [role=R] [owner=U:G] [mode=0660] [name=davinciN]
    vnpu resize <vnpu> [memory=SIZE] [cores=N]
    vnpu destroy <vnpu> [force]         refused while sessions are open; `force` ends them (device lost)

A write() is one command (a trailing newline is optional); its reply, `ok: ...` or `error: ...` naming what
would be valid, is what the next read() returns. A command's reply replaces one nobody read, so an open node
holds one line at most. Only the daemon's user and root may open the node: a command here changes how every
tenant of an NPU is scheduled. `vnpu` fields are a [[virtual]] table's keys, checked by the same code as the
config's. No I/O here: vdevfs/fs.py hands writes in and reads out, and makes and removes the device files.
"""

from __future__ import annotations

import re
from typing import Protocol

import structlog

from interposer import config
from interposer.topology import Topology, VirtualNPU
from scheduler.policies import POLICIES

USAGE = {
    "policy": "policy <npu> <name>",
    "vnpu create": "vnpu create physical=NPU memory=SIZE [cores=N] [role=R] [owner=U:G] [mode=0660] [name=davinciN]",
    "vnpu resize": "vnpu resize <vnpu> [memory=SIZE] [cores=N]",
    "vnpu destroy": "vnpu destroy <vnpu> [force]",
}
MAX_COMMAND = 1024  # bytes: a command is a few words
FIELD = re.compile(r"([a-z]+)=(\S+)")
CREATE_FIELDS = {"physical", "memory", "cores", "role", "owner", "mode", "name"}
INTERNAL = "index"  # the address span vdevfsd numbered for a virtual NPU it has an NPU process make

Log = structlog.typing.FilteringBoundLogger


class Nodes(Protocol):
    """The device files of virtual NPUs (the filesystem's side of a `vnpu` command)."""

    def add_node(self, vdev: VirtualNPU) -> None: ...

    def end_sessions(self, vdev: VirtualNPU) -> int:
        """End its sessions (their processes get the device-lost error); how many."""
        ...

    def remove_node(self, vdev: VirtualNPU) -> None: ...

    def changed(self) -> str | None:
        """Virtual NPUs changed: keep them for the next start; why they could not be kept, if so."""
        ...


def execute(topology: Topology, line: str, log: Log, nodes: Nodes | None = None) -> str:
    """Run one command line; the reply line, without its newline."""
    words = line.split()
    commands = f"{USAGE['policy']}, vnpu create|resize|destroy ..."
    if not words:
        return f"error: empty command (commands: {commands})"
    if words[0] == "vnpu":
        return _vnpu(topology, words[1:], log, nodes)
    if words[0] != "policy":
        return f"error: {words[0]}: unknown command (commands: {commands})"
    if len(words) != 3:
        return f"error: usage: {USAGE['policy']}"
    return _policy(topology, words[1], words[2], log)


def _policy(topology: Topology, npu: str, name: str, log: Log) -> str:
    units = {unit.name: unit for unit in topology.physical}
    unit = units.get(npu)
    if unit is None:
        return f"error: {npu}: no such physical NPU (have {', '.join(units)}; see vdevctl policy)"
    if name not in POLICIES:
        return f"error: {name}: no such policy (have {', '.join(POLICIES)})"
    was, options = unit.policy, topology.policy_options.get(name, {})
    try:
        unit.switch_policy(name, options)
    except ValueError as exc:  # its options do not fit this NPU's chip: it keeps its policy
        return f"error: {npu}: {exc}; its options are [policy.{name}] in the daemon's config"
    log.info("policy_switched", npu=npu, policy=name, was=was, options=options)
    return f"ok: {npu} policy {name} (was {was})"


def _vnpu(topology: Topology, words: list[str], log: Log, nodes: Nodes | None) -> str:
    verbs = {"create": _create, "resize": _resize, "destroy": _destroy}
    if not words or words[0] not in verbs:
        return f"error: usage: {' | '.join(u for k, u in USAGE.items() if k.startswith('vnpu'))}"
    if nodes is None:
        return "error: vnpu commands need the daemon's device files"
    try:
        return verbs[words[0]](topology, words[1:], log, nodes)
    except config.ConfigError as exc:
        return f"error: {exc.detail}"
    except ValueError as exc:
        return f"error: {exc}"


def _fields(words: list[str], allowed: set[str], usage: str, internal: str | None = None) -> dict[str, str]:
    fields = {}
    for word in words:
        match = FIELD.fullmatch(word)
        if match is None or match.group(1) not in allowed | {internal}:
            raise ValueError(f"{word}: not one of {', '.join(f'{k}=' for k in sorted(allowed))} (usage: {usage})")
        if match.group(1) in fields:  # the later one must not quietly win (a value with a space in it, say)
            raise ValueError(f"{match.group(1)}= given twice (usage: {usage})")
        fields[match.group(1)] = match.group(2)
    return fields


def _numbers(fields: dict[str, str]) -> dict[str, object]:
    """A command's words are strings; a table's sizes and cores may be integers (as TOML gives them)."""
    return {k: int(v) if k in ("memory", "cores", "index") and v.isdigit() else v for k, v in fields.items()}


def _find(topology: Topology, name: str) -> VirtualNPU:
    for vdev in topology.virtual:
        if vdev.name == name:
            return vdev
    raise ValueError(f"{name}: no such virtual NPU (have {', '.join(v.name for v in topology.virtual) or 'none'})")


def _create(topology: Topology, words: list[str], log: Log, nodes: Nodes) -> str:
    fields = _numbers(_fields(words, CREATE_FIELDS, USAGE["vnpu create"], internal=INTERNAL))
    for key in ("physical", "memory"):
        if key not in fields:
            raise ValueError(f"{key}= is needed (usage: {USAGE['vnpu create']})")
    taken = {v.name for v in topology.virtual}
    fields.setdefault("name", next(f"davinci{i}" for i in range(len(taken) + 1) if f"davinci{i}" not in taken))
    index = fields.pop("index", None)
    if index is not None and not isinstance(index, int):
        raise ValueError(f"index={index}: not a number")
    spec = config.virtual_spec(fields, {p.name for p in topology.physical})
    node = {"uid": spec.uid, "gid": spec.gid, "mode": spec.mode, "cores": spec.cores}
    vdev = topology.add(spec.name, spec.physical, spec.memory, spec.role, index, **node)
    nodes.add_node(vdev)
    log.info("vnpu_created", vnpu=vdev.name, physical=spec.physical, memory=spec.memory, cores=spec.cores)
    return _kept(f"ok: {vdev.name}", nodes)


def _resize(topology: Topology, words: list[str], log: Log, nodes: Nodes) -> str:
    if not words:
        raise ValueError(f"usage: {USAGE['vnpu resize']}")
    vdev = _find(topology, words[0])
    fields = _numbers(_fields(words[1:], {"memory", "cores"}, USAGE["vnpu resize"]))
    if not fields:
        raise ValueError(f"nothing to change: give memory= and/or cores= (usage: {USAGE['vnpu resize']})")
    spec = config.virtual_spec({"name": vdev.name, "physical": vdev.physical.name, **fields}, {vdev.physical.name})
    was = {"memory": vdev.quota, "cores": vdev.cores}
    vdev.resize(spec.memory, spec.cores)
    log.info("vnpu_resized", vnpu=vdev.name, memory=vdev.quota, cores=vdev.cores, was=was)
    cores = vdev.cores or vdev.physical.npu.profile.ai_cores
    return _kept(f"ok: {vdev.name} memory {vdev.quota} cores {cores}", nodes)


def _destroy(topology: Topology, words: list[str], log: Log, nodes: Nodes) -> str:
    if len(words) not in (1, 2) or words[1:] not in ([], ["force"]):
        raise ValueError(f"usage: {USAGE['vnpu destroy']}")
    vdev = _find(topology, words[0])
    if vdev.sessions and words[1:] != ["force"]:
        raise ValueError(
            f"{vdev.name}: {len(vdev.sessions)} session(s) open; close them, or add `force` to end them "
            "(their processes get the device-lost error)"
        )
    ended = nodes.end_sessions(vdev)
    if vdev.used:  # IPC memory it exported, still mapped by other virtual NPUs' sessions: it keeps paying
        return (
            f"error: {vdev.name}: {vdev.used} bytes it exported are still mapped by other virtual NPUs' sessions "
            f"(IPC); destroy it once they let go" + (f" ({ended} session(s) ended)" if ended else "")
        )
    nodes.remove_node(vdev)
    topology.remove(vdev)
    log.info("vnpu_destroyed", vnpu=vdev.name, sessions_ended=ended)
    return _kept(f"ok: {vdev.name} destroyed" + (f" ({ended} session(s) ended)" if ended else ""), nodes)


def _kept(reply: str, nodes: Nodes) -> str:
    why = nodes.changed()
    return reply if why is None else f"{reply} (not kept for the next start: {why}; see the daemon's log)"


class Control:
    """One open() of the control node."""

    def __init__(self, topology: Topology, log: Log, nodes: Nodes | None = None) -> None:
        self.topology = topology
        self.log = log
        self.nodes = nodes
        self.reply = b""

    def write(self, data: bytes) -> None:
        command = self.command(data)
        if command is not None:
            self.answer(execute(self.topology, command, self.log, self.nodes))

    def command(self, data: bytes) -> str | None:
        """The command a write holds; None, with the reply saying why, if it holds none."""
        command = data.decode(errors="replace").removesuffix("\n")
        if len(data) > MAX_COMMAND:
            self.answer(f"error: a command is one line of at most {MAX_COMMAND} bytes (got {len(data)})")
        elif "\n" in command:
            self.answer("error: one command per write (read its reply, then write the next)")
        else:
            return command
        return None

    def answer(self, reply: str) -> None:
        self.reply = reply.encode() + b"\n"

    def read(self, size: int) -> bytes:
        out, self.reply = self.reply[:size], self.reply[size:]
        return out
