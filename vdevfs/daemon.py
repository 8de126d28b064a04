"""Daemon lifecycle: prepare the mount point (recovering a stale one), mount, serve until a signal, unmount."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pyfuse3
import structlog
import trio

from interposer import config as configuration
from interposer.config import Config
from vdevfs import metrics, state
from vdevfs.channel import Channel
from vdevfs.front import FrontFS
from vdevfs.fs import STATUS_NAME, DeviceFS
from vdevfs.limits import BufferLimits, keep_pieces_in_the_heap
from vdevfs.npus import Npus

log = structlog.get_logger()

# FUSE requests handled at once. A session's read waits in the daemon while its frame waits on the device (so
# that its write never holds the node's lock: vdevfs/channel.py), one read per session; pyfuse3's default of 99
# let 99 sessions in a long synchronize stop every other request. Twice the daemon's session limit
# (vdevfs/limits.py): a waiting read for every session, and as many requests again. A waiting request costs a
# trio task and its request buffer's touched pages; idle workers exit.
FUSE_WORKERS = 8192


class MountError(Exception):
    pass


def unmount(mountpoint: str | Path, lazy: bool = False) -> None:
    """Unmount; a dead daemon's mount is always detached lazily (its clients' files keep it busy)."""
    lazy = lazy or is_stale(mountpoint)
    args = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"{mountpoint}: unmount failed: {result.stderr.strip() or result.returncode}")


def is_stale(mountpoint: str | Path) -> bool:
    """A FUSE mount whose daemon is gone: stat says ENOTCONN (os.path.ismount says False and hides why)."""
    try:
        os.lstat(mountpoint)
        # The mount point's own attributes may still be cached: a listing always reaches the daemon.
        if os.path.ismount(mountpoint):
            os.listdir(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def prepare_mountpoint(mountpoint: Path) -> None:
    """Make the directory; unmount what a killed daemon left behind; refuse to mount over a live daemon."""
    if is_stale(mountpoint):
        log.warning("stale_mount_recovered", mountpoint=str(mountpoint), reason="daemon gone (ENOTCONN)")
        unmount(mountpoint, lazy=True)
    try:
        names = os.listdir(mountpoint) if os.path.ismount(mountpoint) else None
    except OSError as exc:
        raise MountError(f"{mountpoint}: {exc.strerror}") from None
    if names is not None:
        if STATUS_NAME in names:
            raise MountError(
                f"{mountpoint}: a FlexNPU daemon is already serving here; "
                f"stop it or run `vdevfsd umount {mountpoint}` first"
            )
        raise MountError(f"{mountpoint}: something else is mounted here; choose another mount point")
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot create the mount point: {exc.strerror}") from None


@contextlib.asynccontextmanager
async def mounted(fs: pyfuse3.Operations, mountpoint: Path, fsname: str) -> AsyncIterator[None]:
    """`fs` mounted at `mountpoint` for the block; its open channels closed and the mount gone after it."""
    options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=flexnpu", "allow_other"}
    try:
        pyfuse3.init(fs, str(mountpoint), options)
    except RuntimeError as exc:  # libfuse reports its failures (no /dev/fuse, not permitted) this way
        raise MountError(
            f"{mountpoint}: cannot mount ({exc}); FUSE needs /dev/fuse, the fuse3 package, and root "
            "(or user_allow_other in /etc/fuse.conf) for allow_other"
        ) from None
    try:
        yield
    finally:
        for channel in list(fs.open_files.values()):
            if isinstance(channel, Channel):
                channel.close()
        pyfuse3.close(unmount=True)
        log.info("unmounted", mountpoint=str(mountpoint))


async def serve(
    cfg: Config,
    mountpoint: Path,
    metrics_address: tuple[str, int] | None = None,
    keeper: state.Keeper | None = None,
    log_settings: tuple[str, bool | None] = ("info", None),
) -> None:
    """Serve until a signal; MountError or metrics.MetricsError (a bad `metrics_address`) before mounting.
    Run-time changes to virtual NPUs are kept by `keeper` (vdevfs/state.py). With `processes = "per-npu"`
    (the default) each physical NPU is served by a process of its own (vdevfs/npus.py), else by this one."""
    topology = configuration.build(cfg)
    listener = metrics.listen(metrics_address) if metrics_address else None
    prepare_mountpoint(mountpoint)
    keep_pieces_in_the_heap()
    info = {"pid": os.getpid(), "mountpoint": str(mountpoint), "config": cfg.source, "processes": cfg.processes}
    limits = BufferLimits(cfg.session_buffer, cfg.daemon_buffer)
    if cfg.processes == "per-npu":
        supervisor = Npus(cfg, topology, mountpoint, keeper, log_settings)
        fs: DeviceFS | FrontFS = FrontFS(supervisor, info, limits)
        status = supervisor.status
    else:
        fs = DeviceFS(topology, info, limits)
        if keeper is not None:
            fs.on_change = functools.partial(keeper.save, topology)
        status = fs.status_async
    async with mounted(fs, mountpoint, "flexnpu"):
        log.info(
            "mounted",
            mountpoint=str(mountpoint),
            devices=[v.name for v in topology.virtual],
            physical=[f"{p.name}:{p.npu.profile.name}:{p.npu.mode}" for p in topology.physical],
            config=cfg.source,
            processes=cfg.processes,
        )
        async with trio.open_nursery() as nursery:
            fs.spawn = nursery.start_soon
            if cfg.processes == "per-npu":
                nursery.start_soon(supervisor.run)  # its processes mount inside this mount: serve it first
            else:
                for unit in topology.physical:
                    nursery.start_soon(unit.runner.run)
            nursery.start_soon(_terminate_on_signal, supervisor.stop if cfg.processes == "per-npu" else None)
            if listener is not None:
                nursery.start_soon(metrics.serve, status, listener)
            await pyfuse3.main(max_tasks=FUSE_WORKERS)
            nursery.cancel_scope.cancel()


async def _terminate_on_signal(first: Callable[[], Awaitable[None]] | None) -> None:
    """Stop serving on SIGINT or SIGTERM; `first`: the NPU processes stop while this mount still answers (they
    unmount through it)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            if first is not None:
                await first()
            pyfuse3.terminate()
            return
