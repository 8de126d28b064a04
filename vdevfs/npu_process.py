"""One physical NPU's process: its engine, policy and executor, and the sessions of its virtual NPUs.

vdevfsd starts one per physical NPU (vdevfs/npus.py) with two sockets: `control` (vdevfsd asks, this answers:
status, commands; the first message is this process's `NpuSpec`) and `exchange` (this asks vdevfsd: IPC keys,
changed device nodes). It serves its device files on a FUSE mount of its own at `<mount>/.npu/<npu>`, which
vdevfsd's top-level `davinciN` links point into: a client's write and read reach this process directly, no hop
through vdevfsd (a forwarding hop measured +33 µs per round trip, 1.75x a bare FUSE echo, before any work).
It exits when vdevfsd goes (its control socket closes) or on SIGTERM.

Run by vdevfsd only: python -m vdevfs.npu_process CONTROL_FD EXCHANGE_FD
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pyfuse3
import structlog
import trio

from interposer import config as configuration
from interposer import logs
from interposer.topology import Topology
from vdevfs import control
from vdevfs.daemon import FUSE_WORKERS, MountError, mounted, prepare_mountpoint
from vdevfs.exchange import RemoteIpc
from vdevfs.fs import DeviceFS
from vdevfs.limits import BufferLimits, keep_pieces_in_the_heap
from vdevfs.link import Caller, LinkClosed, Peer
from vdevfs.npus import NpuSpec

log = structlog.get_logger()


def build(spec: NpuSpec, exchange: Caller) -> Topology:
    topology = configuration.build(spec.config, indices=spec.indices)
    topology.ipc = RemoteIpc(exchange, spec.npu, topology.physical[0].npu.memory)
    for vdev in topology.virtual:
        vdev.ipc = topology.ipc
    return topology


async def serve(spec: NpuSpec, topology: Topology, peer: Peer, exchange: Caller) -> None:
    mountpoint = Path(spec.mountpoint)
    prepare_mountpoint(mountpoint)
    keep_pieces_in_the_heap()
    info = {"pid": os.getpid(), "mountpoint": spec.mountpoint, "config": spec.config.source, "npu": spec.npu}
    fs = DeviceFS(topology, info, BufferLimits(spec.config.session_buffer, spec.config.daemon_buffer))
    fs.on_change = lambda: _node_changed(exchange, topology)
    async with mounted(fs, mountpoint, f"flexnpu-{spec.npu}"), trio.open_nursery() as nursery:
        fs.spawn = nursery.start_soon
        nursery.start_soon(topology.physical[0].runner.run)
        nursery.start_soon(_answer, peer, fs, topology)
        nursery.start_soon(_terminate_on_signal)
        await peer.send(("ready", os.getpid()))
        await pyfuse3.main(max_tasks=FUSE_WORKERS)
        nursery.cancel_scope.cancel()


def _node_changed(exchange: Caller, topology: Topology) -> str | None:
    """A device node's owner or mode changed (chmod, chown): vdevfsd keeps it for the next start."""
    nodes = {v.name: (v.mode, v.uid, v.gid) for v in topology.virtual}
    try:
        return exchange.call(("node", 0, nodes))[0]
    except LinkClosed:
        return "vdevfsd is gone"


async def _answer(peer: Peer, fs: DeviceFS, topology: Topology) -> None:
    """vdevfsd's requests, in order: (id, "status"), (id, "command", line), and the holds and let-gos of exported
    memory by importers elsewhere (vdevfs/exchange.py), which are not answered. Its end closing ends this process."""
    command_log = log.bind(by="vdevfsd")
    try:
        while True:
            (number, what, *args), _ = await peer.receive()
            if what == "status":
                answer: object = fs.status()
            elif what == "command":
                answer = control.execute(topology, args[0], command_log, nodes=fs)
            elif what in ("hold", "let_go"):
                getattr(topology.ipc, what)(*args)
                continue
            else:
                answer = f"error: {what}: not a request an NPU process knows"
            await peer.send((number, answer))
    except LinkClosed:
        log.warning("vdevfsd_gone", reason="its control link closed; unmounting")
        pyfuse3.terminate()


async def _terminate_on_signal() -> None:
    """SIGTERM only: a terminal's ^C reaches the whole process group, and vdevfsd stops its NPU processes itself."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def main(argv: list[str]) -> int:
    control_sock = socket.socket(fileno=int(argv[0]))
    exchange_sock = socket.socket(fileno=int(argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to vdevfsd, which stops this one
    spec, _ = Caller(control_sock).receive()
    logs.configure(spec.log_level, json=spec.log_json)
    structlog.contextvars.bind_contextvars(npu=spec.npu)
    exchange = Caller(exchange_sock)
    try:
        topology = build(spec, exchange)
        trio.run(serve, spec, topology, Peer(control_sock), exchange)
    except (MountError, configuration.ConfigError) as exc:
        log.error("npu_process_failed", error=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
