"""The device plugin: one kubelet device per virtual NPU, healthy while the daemon serves it.

The state logic is pure (a status dict in, devices and allocations out): `survey`, `prefer`, `container_response`.
`Board` hands the surveyed devices to every ListAndWatch stream; `Servicer` answers the kubelet; `Plugin` is the
loop that reads the status, serves the socket and registers, again whenever the kubelet restarts.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import click
import grpc
import structlog

from tools import cdi
from tools.device_plugin import api_pb2, api_pb2_grpc

log = structlog.get_logger()

API_VERSION = "v1beta1"
RESOURCE = "flexnpu.io/npu"
KUBELET_DIR = Path("/var/lib/kubelet/device-plugins")
KUBELET_SOCKET = "kubelet.sock"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
REGISTER_TIMEOUT_S = 5.0
UNREADABLE = "the daemon's status file cannot be read"
# The kubelet not listening (yet, or while it restarts): try again at the next poll. Any other error is its
# answer, a refusal: the API expects the plugin to exit then.
RETRY_REGISTER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

OPTIONS = api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

StatusSource = Callable[[], dict]  # the daemon's status; raises click.ClickException when there is none


@dataclass(frozen=True)
class Device:
    id: str  # the virtual NPU's node name, davinci2
    physical: str | None  # its physical NPU, as last seen
    problem: str | None = None  # why it is unhealthy; None while healthy

    @property
    def health(self) -> str:
        return UNHEALTHY if self.problem else HEALTHY


def node_key(name: str) -> tuple[str, int]:
    """Order node names by their number: davinci2 before davinci10."""
    stem, number = re.fullmatch(r"(.*?)([0-9]*)", name).groups()
    return stem, int(number or -1)


def survey(status: dict | None, previous: Iterable[Device] = ()) -> tuple[Device, ...]:
    """Every virtual NPU of `status` (None: unreadable) and every one seen before, in node order. A device
    once announced stays, Unhealthy, when it vanishes: the kubelet then stops placing pods on it rather than
    losing track of the pods it holds."""
    devices = {
        d.id: Device(d.id, d.physical, UNREADABLE if status is None else "destroyed: gone from the daemon's status")
        for d in previous
    }
    if status is not None:
        up = {p["name"]: p.get("up", True) for p in status["physical"]}
        for v in status["virtual"]:
            physical = v["physical"]
            problem = None if up.get(physical, True) else f"its physical NPU {physical} is down"
            devices[v["name"]] = Device(v["name"], physical, problem)
    return tuple(sorted(devices.values(), key=lambda d: node_key(d.id)))


def prefer(available: Sequence[str], must_include: Sequence[str], size: int, physical: dict[str, str]) -> list[str]:
    """`size` of the `available` virtual NPUs, `must_include` among them, on as few physical NPUs as can be:
    first the physical NPUs the must-include ones are on, then those with the most free virtual NPUs (the least
    shared chips; ties by name). `physical` maps a virtual NPU to its physical one (unknown: its own group)."""
    chosen = [name for name in dict.fromkeys(must_include) if name in set(available)]  # never one not offered
    groups: dict[str, list[str]] = {}
    for name in sorted(set(available) - set(chosen), key=node_key):
        groups.setdefault(physical.get(name, name), []).append(name)
    held = {physical.get(name, name) for name in chosen}
    for npu in sorted(groups, key=lambda npu: (npu not in held, -len(groups[npu]), node_key(npu))):
        chosen += groups[npu][: max(size - len(chosen), 0)]
    return sorted(chosen, key=node_key)


def container_response(names: Sequence[str], edits: dict) -> api_pb2.ContainerAllocateResponse:
    """The kubelet's answer for one container: the CDI devices (for runtimes with CDI) and the same edits as
    mounts and environment (for runtimes without)."""
    return api_pb2.ContainerAllocateResponse(
        cdi_devices=[api_pb2.CDIDevice(name=f"{cdi.KIND}={name}") for name in names],
        envs=dict(item.split("=", 1) for item in edits["env"]),
        mounts=[
            api_pb2.Mount(
                host_path=m["hostPath"], container_path=m["containerPath"], read_only="ro" in m.get("options", ())
            )
            for m in edits["mounts"]
        ],
    )


class Board:
    """The devices as last surveyed. Every ListAndWatch stream waits here for a change the kubelet can see (an
    ID or a health), so a changed reason alone sends nothing."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._devices: tuple[Device, ...] = ()
        self._version = 0

    @property
    def devices(self) -> tuple[Device, ...]:
        with self._changed:
            return self._devices

    def publish(self, devices: tuple[Device, ...]) -> None:
        with self._changed:
            if [(d.id, d.health) for d in devices] != [(d.id, d.health) for d in self._devices]:
                self._version += 1
                self._changed.notify_all()
            self._devices = devices

    def wake(self) -> None:
        """Let waiting streams look whether they are still wanted."""
        with self._changed:
            self._changed.notify_all()

    def watch(self, active: Callable[[], bool]) -> Iterator[tuple[Device, ...]]:
        """The devices now, then at every change, while `active()`."""
        seen = None
        while True:
            with self._changed:
                while self._version == seen and active():
                    self._changed.wait()
                if not active():
                    return
                seen, devices = self._version, self._devices
            yield devices


class Servicer(api_pb2_grpc.DevicePluginServicer):
    def __init__(self, board: Board, source: StatusSource, mount: Path, shim: Path) -> None:
        self.board = board
        self.source = source
        self.mount = mount
        self.shim = shim

    def GetDevicePluginOptions(self, request, context) -> api_pb2.DevicePluginOptions:
        return OPTIONS

    def ListAndWatch(self, request, context) -> Iterator[api_pb2.ListAndWatchResponse]:
        context.add_callback(self.board.wake)  # a stream the kubelet dropped stops waiting at once
        for devices in self.board.watch(context.is_active):
            yield api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=d.id, health=d.health) for d in devices])

    def GetPreferredAllocation(self, request, context) -> api_pb2.PreferredAllocationResponse:
        physical = {d.id: d.physical for d in self.board.devices if d.physical}
        return api_pb2.PreferredAllocationResponse(
            container_responses=[
                api_pb2.ContainerPreferredAllocationResponse(
                    deviceIDs=prefer(r.available_deviceIDs, r.must_include_deviceIDs, r.allocation_size, physical)
                )
                for r in request.container_requests
            ]
        )

    def Allocate(self, request, context) -> api_pb2.AllocateResponse:
        try:
            status = self.source()  # read now: a virtual NPU may have gone since the last poll
        except click.ClickException as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
        responses = []
        for r in request.container_requests:
            names = list(r.devices_ids)
            try:
                edits = cdi.container_edits(status, names, self.mount, self.shim)
            except ValueError as exc:  # a name the daemon has no virtual NPU of (destroyed?), or one given twice
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            responses.append(container_response(names, edits))
            log.info("allocated", devices=names)
        return api_pb2.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request, context) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()  # not required (OPTIONS): nothing to prepare


class PluginError(Exception):
    """The plugin cannot go on: its socket cannot be made, or the kubelet refused to register it."""


def identity(path: Path) -> tuple[int, int, int] | None:
    """Which file is at `path` (None: none): a socket deleted and made again is another file, even when the
    file system gives it the same inode number, as its change time differs."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


class Plugin:
    """Read the status every `poll` seconds and publish it; serve the plugin socket in `kubelet_dir` and register
    with the kubelet, again whenever either socket is made anew (the kubelet removes plugin sockets and remakes
    its own when it restarts)."""

    def __init__(
        self,
        source: StatusSource,
        mount: Path,
        kubelet_dir: Path,
        resource: str = RESOURCE,
        poll: float = 1.0,
        shim: Path = cdi.SHIM_PATH,
    ) -> None:
        self.source = source
        self.kubelet_dir = kubelet_dir.absolute()
        self.resource = resource
        self.poll = poll
        self.socket = self.kubelet_dir / f"{resource.replace('/', '-')}.sock"
        self.board = Board()
        self.servicer = Servicer(self.board, source, mount, shim)
        self._server: grpc.Server | None = None
        self._serving: tuple[int, int, int] | None = None  # our socket's identity, while served
        self._registered: tuple[int, int, int] | None = None  # kubelet.sock's identity when Register succeeded
        self._unreadable: str | None = None  # the last reason the status could not be read, to log it once
        self._silent: tuple[int, int, int] | None = None  # a kubelet.sock that did not answer, to log it once
        self._registering: tuple | None = None  # a Register call in flight: (future, channel, kubelet.sock identity)

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set; then the socket is removed. Raises PluginError."""
        log.info("starting", resource=self.resource, socket=str(self.socket), poll_s=self.poll)
        try:
            while True:
                self.refresh()
                if self._server is None or identity(self.socket) != self._serving:
                    self.serve()
                self.register()
                if stop.wait(self.poll):
                    break
        finally:
            self.stop_serving()
            log.info("stopped", resource=self.resource)

    def refresh(self) -> None:
        try:
            status = self.source()
            self._unreadable = None
        except click.ClickException as exc:
            status = None
            if exc.message != self._unreadable:
                log.warning("status unreadable", error=exc.message)
            self._unreadable = exc.message
        before = {d.id: d for d in self.board.devices}
        devices = survey(status, before.values())
        for d in devices:
            old = before.get(d.id)
            if old is None or old.problem != d.problem:
                (log.warning if d.problem else log.info)("device health", device=d.id, health=d.health, why=d.problem)
        self.board.publish(devices)

    def serve(self) -> None:
        if self._server is not None:
            log.info("plugin socket gone (kubelet restarted?): serving it again", socket=str(self.socket))
            self.stop_serving()
        self.socket.unlink(missing_ok=True)  # a stale one from a plugin that was killed
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="device-plugin"))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.servicer, server)
        try:
            server.add_insecure_port(f"unix://{self.socket}")
        except RuntimeError:  # grpc says only "Failed to bind"
            raise PluginError(
                f"cannot make the socket {self.socket}: is --kubelet-dir the kubelet's device plugin directory, "
                "and is this process root (as the kubelet's directory is root's)?"
            ) from None
        server.start()
        self._server, self._serving, self._registered = server, identity(self.socket), None

    def stop_serving(self) -> None:
        if self._server is None:
            return
        # Ends the ListAndWatch streams too, and removes the socket if it is still the one it made (the tests
        # check it is gone).
        self._server.stop(grace=None).wait()
        self._server = self._serving = None

    def register(self) -> None:
        """Register with the kubelet unless done with the kubelet.sock there now. The call runs while polls go
        on (a kubelet that hangs must not hold back health updates: found in review) and is looked at by later
        polls; a kubelet that does not answer is tried again."""
        if self._registering is not None:
            future, channel, kubelet = self._registering
            if not future.done():
                return
            self._registering = None
            channel.close()
            try:
                future.result()
            except grpc.RpcError as exc:
                if exc.code() in RETRY_REGISTER:
                    if kubelet != self._silent:
                        log.warning("kubelet not answering; retrying every poll", error=exc.details())
                    self._silent = kubelet
                    return
                raise PluginError(
                    f"the kubelet refused to register {self.resource}: {exc.details()} ({exc.code().name})"
                ) from None
            self._registered = kubelet
            log.info("registered", resource=self.resource, endpoint=self.socket.name)
            return
        kubelet = identity(self.kubelet_dir / KUBELET_SOCKET)
        if kubelet is None or kubelet == self._registered:
            return
        request = api_pb2.RegisterRequest(
            version=API_VERSION, endpoint=self.socket.name, resource_name=self.resource, options=OPTIONS
        )
        channel = grpc.insecure_channel(f"unix://{self.kubelet_dir / KUBELET_SOCKET}")
        future = api_pb2_grpc.RegistrationStub(channel).Register.future(request, timeout=REGISTER_TIMEOUT_S)
        self._registering = (future, channel, kubelet)
