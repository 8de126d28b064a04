"""vdevfsd's NPU processes: one per physical NPU, started, watched and restarted here (the paper's per-device daemons).

Each NPU process (vdevfs/npu_process.py) serves its NPU's device files on a mount of its own; vdevfsd keeps the one
tree users see (vdevfs/front.py), the registry of IPC keys across processes (vdevfs/exchange.py), and a mirror of
the topology: the virtual NPUs as configured and changed at run time, from which a restarted process is built again
and which the state file keeps. Live figures (sessions, memory, queues) are the processes' own, asked for when the
status is read.

Failures: a process that exits or is killed is restarted after a back-off (0.5 s, doubling to 30 s; back to 0.5 s
once one has run a minute); its sessions end with it — their clients get the device-lost error, the kernel having
aborted its FUSE connection — and the keys its sessions held are let go. One that answers nothing for
`[daemon] watchdog_s` (default 30 s: a numeric kernel can hold its loop for seconds) is killed, and so is one whose
resident memory passes `[daemon] process_memory`. Clients of every other NPU notice nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from interposer import config as configuration
from interposer.topology import Topology
from vdevfs import control, state
from vdevfs.exchange import Exchange
from vdevfs.link import LinkClosed, Peer

log = structlog.get_logger()

POLL_S = 1.0  # how often each process is asked for its status (the watchdog's heartbeat)
START_S = 60.0  # a new process must have mounted its device files within this
STATUS_WAIT_S = 2.0  # reading the status file waits this long for a process, then shows its last answer
FIRST_BACKOFF_S, MAX_BACKOFF_S, STABLE_S = 0.5, 30.0, 60.0
STOP_S = 5.0  # a process asked to stop (vdevfsd stopping) gets this long to unmount before SIGKILL


class NpuDown(Exception):
    """The NPU's process is not serving (restarting, or slow to answer)."""


@dataclass
class NpuSpec:
    """What vdevfsd tells a new NPU process: its share of the config, and where to serve."""

    npu: str
    config: configuration.Config  # this physical NPU and its virtual NPUs only
    indices: dict[str, int]  # each virtual NPU's address span, numbered across the daemon
    mountpoint: str
    log_level: str
    log_json: bool | None


@dataclass(eq=False)
class NpuProcess:
    name: str
    mountpoint: Path
    pid: int | None = None
    up: bool = False
    restarts: int = 0
    last: dict | None = None  # its latest status
    peer: Peer | None = None
    answers: dict[int, trio.MemorySendChannel] = field(default_factory=dict)
    numbers: itertools.count = field(default_factory=itertools.count)
    ready: trio.Event = field(default_factory=trio.Event)  # set once it first serves (or first fails)
    child: trio.Process | None = None
    stopped: trio.Event = field(default_factory=trio.Event)  # set once vdevfsd stopped it for good

    async def request(self, *message: object, timeout: float) -> object:
        if not self.up or self.peer is None:
            raise NpuDown(f"{self.name}: its process is restarting")
        number = next(self.numbers)
        send, receive = trio.open_memory_channel(1)
        self.answers[number] = send
        try:
            await self.peer.send((number, *message))
            with trio.move_on_after(timeout):
                return await receive.receive()
            raise NpuDown(f"{self.name}: its process did not answer within {timeout:g} s")
        except LinkClosed:
            raise NpuDown(f"{self.name}: its process is gone") from None
        finally:
            self.answers.pop(number, None)


class Npus:
    def __init__(
        self,
        cfg: configuration.Config,
        topology: Topology,
        mountpoint: Path,
        keeper: state.Keeper | None,
        log_settings: tuple[str, bool | None],
    ) -> None:
        self.cfg = cfg
        self.topology = topology  # the mirror: virtual NPUs as configured and changed; no engine of it runs here
        self.keeper = keeper
        self.log_settings = log_settings
        self.exchange = Exchange()
        self.processes = {p.name: NpuProcess(p.name, mountpoint / ".npu" / p.name) for p in topology.physical}
        self.on_nodes_changed = lambda: None  # the front's: a device file came or went
        self.stopping = False

    # -- supervision ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for process in self.processes.values():
                nursery.start_soon(self._supervise, process)

    async def stop(self) -> None:
        """Stop every NPU process (SIGTERM: each unmounts and exits) and restart none; SIGKILL after STOP_S."""
        self.stopping = True
        for process in self.processes.values():
            if process.child is not None and process.child.returncode is None:
                process.child.terminate()
        with trio.move_on_after(STOP_S):
            for process in self.processes.values():
                await process.stopped.wait()

    async def started(self, npu: str | None = None) -> None:
        """Once `npu`'s process (or every one) first serves, or first fails: the daemon's files wait for it."""
        for process in [self.processes[npu]] if npu else self.processes.values():
            await process.ready.wait()

    async def _supervise(self, process: NpuProcess) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            started = time.monotonic()
            reason = await self._run_once(process)
            process.up, process.peer, process.last = False, None, None
            process.ready.set()
            if self.stopping:
                log.info("npu_process_stopped", npu=process.name, pid=process.pid, reason=reason)
                process.stopped.set()
                return
            self.exchange.forget_process(process.name)
            await self._send_notices()
            await _detach(process.mountpoint)
            if time.monotonic() - started > STABLE_S:
                backoff = FIRST_BACKOFF_S
            log.error("npu_process_down", npu=process.name, pid=process.pid, reason=reason, restart_in_s=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            process.restarts += 1

    async def _run_once(self, process: NpuProcess) -> str:
        """Start the process and watch it until it fails; why it failed."""
        control_here, control_there = socket.socketpair()
        exchange_here, exchange_there = socket.socketpair()
        ends = (control_there.fileno(), exchange_there.fileno())
        try:
            child = await trio.lowlevel.open_process(
                [sys.executable, "-m", "vdevfs.npu_process", *map(str, ends)], pass_fds=ends
            )
        finally:
            control_there.close()
            exchange_there.close()
        process.pid, process.child = child.pid, child
        peer, exchange = Peer(control_here), Peer(exchange_here)
        reason = "?"
        try:
            async with trio.open_nursery() as nursery:

                def failed(why: str) -> None:
                    nonlocal reason
                    if reason == "?":
                        reason = why
                    nursery.cancel_scope.cancel()

                async def exited() -> None:
                    code = await child.wait()
                    failed(f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")

                nursery.start_soon(exited)
                nursery.start_soon(self._serve_exchange, process, exchange)
                await peer.send(self._spec(process.name))
                with trio.move_on_after(START_S) as starting:
                    (_, pid), _ = await peer.receive()
                if starting.cancelled_caught:
                    failed(f"it did not mount its device files within {START_S:g} s")
                    return reason
                process.peer, process.up = peer, True
                process.ready.set()
                log.info("npu_process_serving", npu=process.name, pid=pid, mountpoint=str(process.mountpoint))
                nursery.start_soon(self._answers, process, peer, child, failed)
                nursery.start_soon(self._watch, process, failed)
        except LinkClosed:
            reason = "its control link closed" if reason == "?" else reason
        finally:
            with trio.CancelScope(shield=True):
                if child.returncode is None:
                    child.kill()
                    await child.wait()
                peer.close()
                exchange.close()
        return reason

    async def _answers(self, process: NpuProcess, peer: Peer, child: trio.Process, failed) -> None:
        try:
            while True:
                (number, answer), _ = await peer.receive()
                channel = process.answers.get(number)
                if channel is not None:
                    channel.send_nowait(answer)
        except LinkClosed:
            with trio.move_on_after(1):  # a process that died closed it: say how it died
                await child.wait()
                await trio.sleep_forever()  # `exited` tells
            failed("its control link closed")

    async def _watch(self, process: NpuProcess, failed) -> None:
        """The watchdog: a status every POLL_S, answered within watchdog_s; resident memory within the limit."""
        while True:
            try:
                process.last = await process.request("status", timeout=self.cfg.watchdog_s)
            except NpuDown:
                log.error("npu_process_hung", npu=process.name, pid=process.pid, watchdog_s=self.cfg.watchdog_s)
                failed(f"it answered nothing for {self.cfg.watchdog_s:g} s (watchdog)")
                return
            limit = self.cfg.process_memory
            if limit is not None and process.pid is not None and (rss := _rss(process.pid)) > limit:
                log.error("npu_process_memory_exceeded", npu=process.name, pid=process.pid, rss=rss, limit=limit)
                failed(f"its resident memory {rss} bytes passed the limit of {limit} ([daemon] process_memory)")
                return
            await trio.sleep(POLL_S)

    async def _serve_exchange(self, process: NpuProcess, exchange: Peer) -> None:
        """The process's calls: IPC keys, and device nodes whose owner or mode changed."""
        try:
            while True:
                message, fds = await exchange.receive()
                if message[0] == "node":
                    answer, out = self._nodes_changed(message[2]), []
                else:
                    answer, out = self.exchange.call(process.name, message, fds)
                    await self._send_notices()
                await exchange.send(answer, out)
        except LinkClosed:
            return

    async def _send_notices(self) -> None:
        """Holds and let-gos of exported memory, to the exporters' processes (before the importer is answered)."""
        notices, self.exchange.notices = self.exchange.notices, []
        for npu, notice in notices:
            process = self.processes[npu]
            if process.up and process.peer is not None:
                with contextlib.suppress(LinkClosed):
                    await process.peer.send((-1, *notice))  # no answer is awaited: -1 is nobody's number

    def _spec(self, npu: str) -> NpuSpec:
        unit = next(p for p in self.topology.physical if p.name == npu)
        physical = next(p for p in self.cfg.physical if p.name == npu)
        mine = [v for v in self.topology.virtual if v.physical is unit]
        virtual = [configuration.VirtualSpec(v.name, npu, v.quota, v.role, v.uid, v.gid, v.mode, v.cores) for v in mine]
        config = dataclasses.replace(
            self.cfg, physical=[dataclasses.replace(physical, policy=unit.policy)], virtual=virtual
        )
        level, json = self.log_settings
        return NpuSpec(npu, config, {v.name: v.index for v in mine}, str(self.processes[npu].mountpoint), level, json)

    # -- what vdevfsd's files show and do ------------------------------------------------------------------

    async def status(self) -> dict:
        """The status file's content: the mirror's, with each serving process's live figures."""
        async with trio.open_nursery() as nursery:
            for process in self.processes.values():
                nursery.start_soon(self._refresh, process)
        mirror = self.topology.status()
        live_virtual = {}
        physical = []
        sessions = held = 0
        limits = {}
        for entry in mirror["physical"]:
            process = self.processes[entry["name"]]
            last = process.last if process.up else None
            if last is not None:
                entry = last["physical"][0]
                live_virtual |= {v["name"]: v for v in last["virtual"]}
                sessions += last["daemon"]["sessions"]
                held += last["daemon"]["buffers"]["held"]
                limits = last["daemon"]
            physical.append(entry | {"pid": process.pid, "up": process.up, "restarts": process.restarts})
        virtual = [live_virtual.get(v["name"], v) for v in mirror["virtual"]]
        daemon = {
            "sessions": sessions,
            "session_limit": limits.get("session_limit"),
            "sessions_per_user_limit": limits.get("sessions_per_user_limit"),
            "buffers": {
                "held": held,
                "session_limit": self.cfg.session_buffer,
                "daemon_limit": self.cfg.daemon_buffer,
                "per": "NPU process",
            },
        }
        return {"daemon": daemon, "physical": physical, "virtual": virtual}

    async def _refresh(self, process: NpuProcess) -> None:
        with contextlib.suppress(NpuDown):
            process.last = await process.request("status", timeout=STATUS_WAIT_S)

    async def command(self, line: str, command_log) -> str:
        """A control-node command: checked against the mirror, carried out by the NPU's process, then mirrored."""
        words = line.split()
        if words[:1] == ["policy"] and len(words) == 3 and words[1] in self.processes:
            reply = await self._forward(words[1], line)
            if reply.startswith("ok:"):
                control.execute(self.topology, line, command_log)
            return reply
        if words[:2] == ["vnpu", "create"]:
            return await self._create(line, command_log)
        if words[:2] in (["vnpu", "resize"], ["vnpu", "destroy"]) and len(words) > 2:
            vdev = next((v for v in self.topology.virtual if v.name == words[2]), None)
            if vdev is not None:
                reply = await self._forward(vdev.physical.name, line)
                if reply.startswith("ok:"):
                    control.execute(self.topology, line, command_log, nodes=_Mirror(self))
                    self.on_nodes_changed()  # a destroyed one's link goes
                    return self._kept(reply)
                return reply
        return control.execute(self.topology, line, command_log, nodes=_Mirror(self))  # the mirror names the error

    async def _create(self, line: str, command_log) -> str:
        made = _Mirror(self)
        reply = control.execute(self.topology, line, command_log, nodes=made)
        if not reply.startswith("ok:") or made.added is None:
            return reply
        vdev = made.added
        roles = {phase: name for name, phase in configuration.ROLES.items()}
        fields = {
            "name": vdev.name,
            "physical": vdev.physical.name,
            "memory": vdev.quota,
            "role": roles[vdev.role],
            "owner": f"{vdev.uid}:{vdev.gid}",
            "mode": f"{vdev.mode:04o}",
            "index": vdev.index,
        } | ({} if vdev.cores is None else {"cores": vdev.cores})
        forwarded = "vnpu create " + " ".join(f"{k}={v}" for k, v in fields.items())
        try:
            answer = await self._forward(vdev.physical.name, forwarded, down_ok=True)
        except NpuDown:
            answer = None  # made when its process starts again
        if answer is not None and not answer.startswith("ok:"):
            self.topology.remove(vdev)
            return answer
        self.on_nodes_changed()
        return self._kept(reply)

    async def _forward(self, npu: str, line: str, down_ok: bool = False) -> str:
        try:
            return await self.processes[npu].request("command", line, timeout=self.cfg.watchdog_s)
        except NpuDown as exc:
            if down_ok:
                raise
            return f"error: {exc}; try again in a few seconds"

    def _kept(self, reply: str) -> str:
        why = self._save()
        return reply if why is None else f"{reply} (not kept for the next start: {why}; see the daemon's log)"

    def _save(self) -> str | None:
        return None if self.keeper is None else self.keeper.save(self.topology)

    def _nodes_changed(self, nodes: dict[str, tuple[int, int, int]]) -> str | None:
        for vdev in self.topology.virtual:
            if vdev.name in nodes:
                vdev.mode, vdev.uid, vdev.gid = nodes[vdev.name]
        return self._save()


@dataclass(eq=False)
class _Mirror:
    """control.Nodes for the mirror: what a command made is remembered; the device files are the front's."""

    npus: Npus
    added: object = None

    def add_node(self, vdev) -> None:
        self.added = vdev

    def end_sessions(self, vdev) -> int:
        return 0

    def remove_node(self, vdev) -> None:
        pass  # its link goes once the mirror has let go of it too

    def changed(self) -> str | None:
        return None  # kept once the NPU process has done it too


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _detach(mountpoint: Path) -> None:
    """A dead process's mount answers ENOTCONN until it is detached. fusermount3 walks the path through this
    daemon's own mount: the loop must go on answering meanwhile."""
    result = await trio.run_process(["fusermount3", "-u", "-z", str(mountpoint)], capture_stderr=True, check=False)
    error = result.stderr.decode(errors="replace").strip()
    if result.returncode != 0 and "not mounted" not in error and "not found" not in error:
        log.warning("npu_mount_not_detached", mountpoint=str(mountpoint), error=error)
