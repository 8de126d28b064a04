"""The `control` node: an operator changes the running daemon by writing a command and reading one reply line.

    policy <npu> <name>    switch a physical NPU's scheduling policy (made with its [policy.<name>] options)

A write() is one command (a trailing newline is optional); its reply, `ok: ...` or `error: ...` naming what
would be valid, is what the next read() returns. A command's reply replaces one nobody read, so an open node
holds one line at most. Only the daemon's user and root may open the node: a command here changes how every
tenant of an NPU is scheduled. No I/O here: vdevfs/fs.py hands writes in and reads out.
"""

from __future__ import annotations

import structlog

from interposer.topology import Topology
from scheduler.policies import POLICIES

USAGE = {"policy": "policy <npu> <name>"}
MAX_COMMAND = 1024  # bytes: a command is a few words


def execute(topology: Topology, line: str, log: structlog.typing.FilteringBoundLogger) -> str:
    """Run one command line; the reply line, without its newline."""
    words = line.split()
    commands = ", ".join(USAGE.values())
    if not words:
        return f"error: empty command (commands: {commands})"
    if words[0] not in USAGE:
        return f"error: {words[0]}: unknown command (commands: {commands})"
    if len(words) != 3:
        return f"error: usage: {USAGE[words[0]]}"
    return _policy(topology, words[1], words[2], log)


def _policy(topology: Topology, npu: str, name: str, log: structlog.typing.FilteringBoundLogger) -> str:
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


class Control:
    """One open() of the control node."""

    def __init__(self, topology: Topology, log: structlog.typing.FilteringBoundLogger) -> None:
        self.topology = topology
        self.log = log
        self.reply = b""

    def write(self, data: bytes) -> None:
        command = data.decode(errors="replace").removesuffix("\n")
        if len(data) > MAX_COMMAND:
            reply = f"error: a command is one line of at most {MAX_COMMAND} bytes (got {len(data)})"
        elif "\n" in command:
            reply = "error: one command per write (read its reply, then write the next)"
        else:
            reply = execute(self.topology, command, self.log)
        self.reply = reply.encode() + b"\n"

    def read(self, size: int) -> bytes:
        out, self.reply = self.reply[:size], self.reply[size:]
        return out
