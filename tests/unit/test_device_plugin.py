"""The kubelet device plugin: its pure state logic, then the plugin served on a unix socket and driven by a fake
kubelet (a Registration server in a temporary kubelet directory) as the kubelet drives it, over a fake status."""

from __future__ import annotations

import copy
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import click
import grpc
import pytest

from tools import cdi
from tools.device_plugin import api_pb2, api_pb2_grpc
from tools.device_plugin.plugin import (
    UNREADABLE,
    Board,
    Device,
    Plugin,
    PluginError,
    container_response,
    prefer,
    survey,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tools" / "device_plugin"
MOUNT = Path("/dev/flexnpu")
WAIT_S = 10  # generous: a condition the plugin meets within a few polls


def vnpu(name: str, physical: str) -> dict:
    return {"name": name, "physical": physical, "chip": "910B2", "role": "any", "memory_used": 0,
            "memory_quota": 1 << 30, "sessions": []}  # fmt: skip


STATUS = {
    "daemon": {"pid": 1, "mountpoint": str(MOUNT), "config": "test.toml"},
    "physical": [{"name": "npu0", "up": True}, {"name": "npu1"}, {"name": "npu2", "up": True}],  # npu1: no "up" yet
    "virtual": [vnpu("davinci0", "npu0"), vnpu("davinci1", "npu0"), vnpu("davinci2", "npu1"), vnpu("davinci3", "npu2")],
}


def health(devices) -> dict[str, str]:
    return {d.id: d.health for d in devices}


# --- the generated stubs


def test_stubs_are_what_protoc_writes(tmp_path):
    """Nobody edits the stubs by hand: regenerating them (the command in tools/device_plugin/__init__.py) into
    a temporary directory gives the committed files."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", *(f"--{kind}_out={tmp_path}" for kind in ("python", "pyi",
         "grpc_python")), "tools/device_plugin/api.proto"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        assert (tmp_path / "tools" / "device_plugin" / name).read_text() == (PACKAGE / name).read_text(), (
            f"tools/device_plugin/{name} differs from what protoc writes: regenerate the stubs with the command in "
            "tools/device_plugin/__init__.py (a different grpcio-tools writes different stubs)"
        )


def test_proto_keeps_no_gogoproto():
    body = (PACKAGE / "api.proto").read_text().split('syntax = "proto3";', 1)[1]
    assert "gogo" not in body and "import" not in body


# --- pure state logic


def test_survey_follows_the_status():
    devices = survey(STATUS)
    assert [(d.id, d.physical, d.health) for d in devices] == [
        ("davinci0", "npu0", "Healthy"),
        ("davinci1", "npu0", "Healthy"),
        ("davinci2", "npu1", "Healthy"),
        ("davinci3", "npu2", "Healthy"),
    ]

    down = copy.deepcopy(STATUS)
    down["physical"][0]["up"] = False
    assert health(survey(down, devices)) == {
        "davinci0": "Unhealthy",
        "davinci1": "Unhealthy",
        "davinci2": "Healthy",
        "davinci3": "Healthy",
    }
    assert survey(down, devices)[0].problem == "its physical NPU npu0 is down"


def test_survey_keeps_a_vanished_device_unhealthy_and_adds_new_ones():
    devices = survey(STATUS)
    changed = copy.deepcopy(STATUS)
    del changed["virtual"][1]
    changed["virtual"].append(vnpu("davinci10", "npu1"))
    after = survey(changed, devices)
    assert [(d.id, d.health) for d in after] == [
        ("davinci0", "Healthy"),
        ("davinci1", "Unhealthy"),
        ("davinci2", "Healthy"),
        ("davinci3", "Healthy"),
        ("davinci10", "Healthy"),  # node order, not string order
    ]
    assert "destroyed" in after[1].problem and after[1].physical == "npu0"
    assert health(survey(changed, survey(changed, after)))["davinci1"] == "Unhealthy"  # it stays
    assert health(survey(STATUS, after))["davinci1"] == "Healthy"  # made again


def test_survey_without_a_status_keeps_every_device_unhealthy():
    devices = survey(None, survey(STATUS))
    assert {d.health for d in devices} == {"Unhealthy"} and len(devices) == 4
    assert {d.problem for d in devices} == {UNREADABLE}
    assert devices[2].physical == "npu1"  # remembered, for GetPreferredAllocation
    assert survey(None) == ()


PHYSICAL = {"a0": "npu0", "a1": "npu0", "b0": "npu1", "b1": "npu1", "b2": "npu1", "c0": "npu2", "c1": "npu2"}


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        # fits on one NPU: the one with the most free virtual NPUs
        (list(PHYSICAL), [], 2, ["b0", "b1"]),
        (list(PHYSICAL), [], 3, ["b0", "b1", "b2"]),
        # does not fit on one: fewest NPUs, the fullest-free first
        (list(PHYSICAL), [], 4, ["a0", "b0", "b1", "b2"]),
        (list(PHYSICAL), [], 6, ["a0", "a1", "b0", "b1", "b2", "c0"]),
        # ties by NPU name: npu0 and npu2 have two free each
        (["a0", "a1", "c0", "c1"], [], 2, ["a0", "a1"]),
        # the NPU a must-include one is on first, though another has more free
        (list(PHYSICAL), ["c1"], 2, ["c0", "c1"]),
        (list(PHYSICAL), ["c1"], 4, ["b0", "b1", "c0", "c1"]),
        # must-include ones all stay, even past the size
        (list(PHYSICAL), ["a0", "c0"], 3, ["a0", "a1", "c0"]),
        (list(PHYSICAL), ["a0", "c0"], 1, ["a0", "c0"]),
        # fewer available than asked: all of them; an unknown device is a group of its own
        (["a0", "x9"], [], 5, ["a0", "x9"]),
        (["x9", "a0", "a1"], [], 2, ["a0", "a1"]),
        # a must-include device the kubelet never offered is never answered (found in review)
        (["a0", "a1"], ["bogus"], 2, ["a0", "a1"]),
    ],
)
def test_prefer_packs_onto_few_physical_npus(available, must, size, expected):
    assert prefer(available, must, size, PHYSICAL) == expected
    assert prefer(list(reversed(available)), must, size, PHYSICAL) == expected  # deterministic


def test_container_response_carries_cdi_names_and_the_same_edits():
    edits = {
        "env": ["FLEXNPU_DEVICES=/dev/davinci0,/dev/davinci1", "A=b=c"],
        "mounts": [
            {"hostPath": "/dev/flexnpu/davinci2", "containerPath": "/dev/davinci0", "options": ["bind", "rw"]},
            {"hostPath": "/opt/shim", "containerPath": "/opt/flexnpu", "options": ["bind", "ro"]},
        ],
    }
    response = container_response(["davinci2", "davinci3"], edits)
    assert [d.name for d in response.cdi_devices] == ["flexnpu.io/npu=davinci2", "flexnpu.io/npu=davinci3"]
    assert dict(response.envs) == {"FLEXNPU_DEVICES": "/dev/davinci0,/dev/davinci1", "A": "b=c"}
    assert [(m.host_path, m.container_path, m.read_only) for m in response.mounts] == [
        ("/dev/flexnpu/davinci2", "/dev/davinci0", False),
        ("/opt/shim", "/opt/flexnpu", True),
    ]


def test_board_wakes_watchers_only_for_what_the_kubelet_sees():
    board = Board()
    board.publish(survey(STATUS))
    watch = board.watch(lambda: True)
    assert health(next(watch))["davinci0"] == "Healthy"
    # another reason to be unhealthy, same health: nothing new for the kubelet
    board.publish((Device("davinci0", "npu0", "down"),))
    board.publish((Device("davinci0", "npu0", "gone"),))
    assert next(watch) == (Device("davinci0", "npu0", "gone"),)  # one change, the latest state
    active = [True]
    waiting = board.watch(lambda: active[0])
    next(waiting)
    active[0] = False
    board.wake()
    assert list(waiting) == []


# --- the plugin and a fake kubelet


class FakeStatus:
    """The daemon's status as the plugin reads it; None: no daemon (the file cannot be read)."""

    def __init__(self) -> None:
        self.status: dict | None = copy.deepcopy(STATUS)

    def __call__(self) -> dict:
        if self.status is None:
            raise click.ClickException(f"no FlexNPU daemon at {MOUNT} (no status file)")
        return copy.deepcopy(self.status)


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    """The kubelet's Registration service on kubelet.sock; `refuse`: answer Register with that error."""

    def __init__(self, directory: Path, refuse: str | None = None) -> None:
        self.directory = directory
        self.refuse = refuse
        self.requests: queue.Queue[api_pb2.RegisterRequest] = queue.Queue()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{directory / 'kubelet.sock'}")
        self.server.start()

    def Register(self, request, context):
        if self.refuse:
            context.abort(grpc.StatusCode.UNKNOWN, self.refuse)
        self.requests.put(request)
        return api_pb2.Empty()

    def registered(self) -> api_pb2.RegisterRequest:
        return self.requests.get(timeout=WAIT_S)

    def dial(self, request: api_pb2.RegisterRequest) -> api_pb2_grpc.DevicePluginStub:
        """Connect to the plugin as the kubelet does: at the endpoint it registered, in the kubelet directory."""
        channel = grpc.insecure_channel(f"unix://{self.directory / request.endpoint}")
        return api_pb2_grpc.DevicePluginStub(channel)

    def stop(self) -> None:
        """A kubelet going away: its socket and every plugin socket are removed (as a starting kubelet does)."""
        self.server.stop(grace=None).wait()
        for path in self.directory.iterdir():
            path.unlink()


class Running:
    def __init__(self, directory: Path, source: FakeStatus) -> None:
        self.plugin = Plugin(source, MOUNT, directory, poll=0.05)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.plugin.run(self.stop)
        except BaseException as exc:  # handed to the test, which asserts on it
            self.errors.append(exc)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the plugin did not stop"
        assert self.errors == []


@pytest.fixture
def kubelet_dir():
    # short: a unix socket path must fit in 108 bytes, and pytest's tmp_path may not
    directory = Path(tempfile.mkdtemp(prefix="kdp-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def status():
    return FakeStatus()


@pytest.fixture
def plugin(kubelet_dir, status):
    running = Running(kubelet_dir, status)
    yield running
    running.join()


@pytest.fixture
def kubelet(kubelet_dir):
    fake = FakeKubelet(kubelet_dir)
    yield fake
    fake.server.stop(grace=None).wait()


def devices_of(response: api_pb2.ListAndWatchResponse) -> dict[str, str]:
    return {d.ID: d.health for d in response.devices}


def test_registers_and_serves_the_kubelet(kubelet, plugin):
    request = kubelet.registered()
    assert request.version == "v1beta1"
    assert request.resource_name == "flexnpu.io/npu"
    assert request.endpoint == "flexnpu.io-npu.sock" and "/" not in request.endpoint
    assert request.options.get_preferred_allocation_available and not request.options.pre_start_required
    stub = kubelet.dial(request)
    assert stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=WAIT_S) == request.options
    assert stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=["davinci0"]), timeout=WAIT_S) == (
        api_pb2.PreStartContainerResponse()
    )


def test_list_and_watch_pushes_every_change(kubelet, plugin, status):
    stream = kubelet.dial(kubelet.registered()).ListAndWatch(api_pb2.Empty(), timeout=WAIT_S)
    healthy = {"davinci0": "Healthy", "davinci1": "Healthy", "davinci2": "Healthy", "davinci3": "Healthy"}
    assert devices_of(next(stream)) == healthy

    del status.status["virtual"][1]  # destroyed at run time
    assert devices_of(next(stream)) == healthy | {"davinci1": "Unhealthy"}

    status.status["physical"][2]["up"] = False
    assert devices_of(next(stream)) == healthy | {"davinci1": "Unhealthy", "davinci3": "Unhealthy"}

    status.status = None  # the daemon is gone
    assert devices_of(next(stream)) == dict.fromkeys(healthy, "Unhealthy")

    status.status = copy.deepcopy(STATUS)
    status.status["virtual"].append(vnpu("davinci4", "npu1"))  # the daemon back, with one more
    assert devices_of(next(stream)) == healthy | {"davinci4": "Healthy"}
    stream.cancel()


def test_allocate_answers_cdi_names_and_the_edits(kubelet, plugin):
    stub = kubelet.dial(kubelet.registered())
    request = api_pb2.AllocateRequest(
        container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["davinci2", "davinci3"]),
            api_pb2.ContainerAllocateRequest(devices_ids=["davinci0"]),
        ]
    )
    first, second = stub.Allocate(request, timeout=WAIT_S).container_responses
    assert [d.name for d in first.cdi_devices] == ["flexnpu.io/npu=davinci2", "flexnpu.io/npu=davinci3"]
    assert [d.name for d in second.cdi_devices] == ["flexnpu.io/npu=davinci0"]
    # for runtimes without CDI, the very edits of the CDI spec: the nodes bound at /dev/<node>, the shim, its path
    assert first == container_response(
        ["davinci2", "davinci3"], cdi.container_edits(STATUS, ["davinci2", "davinci3"], MOUNT)
    )
    mounts = {m.container_path: (m.host_path, m.read_only) for m in first.mounts}
    assert mounts["/dev/davinci2"] == ("/dev/flexnpu/davinci2", False)
    assert mounts[cdi.SHIM_IN_CONTAINER][1] is True
    assert dict(first.envs) == {"PYTHONPATH": cdi.SHIM_IN_CONTAINER}


def test_allocate_refuses_an_unknown_device_and_a_missing_daemon(kubelet, plugin, status):
    stub = kubelet.dial(kubelet.registered())
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["davinci0", "davinci7"])]
    )
    with pytest.raises(grpc.RpcError) as failed:
        stub.Allocate(request, timeout=WAIT_S)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details().startswith("davinci7: no such virtual NPU")

    status.status = None
    with pytest.raises(grpc.RpcError) as failed:
        stub.Allocate(request, timeout=WAIT_S)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no FlexNPU daemon" in failed.value.details()


def test_preferred_allocation_packs_each_container(kubelet, plugin):
    stub = kubelet.dial(kubelet.registered())
    every = ["davinci0", "davinci1", "davinci2", "davinci3"]
    request = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=every, allocation_size=2),
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=every, must_include_deviceIDs=["davinci3"], allocation_size=2
            ),
        ]
    )
    answers = stub.GetPreferredAllocation(request, timeout=WAIT_S).container_responses
    assert [list(a.deviceIDs) for a in answers] == [["davinci0", "davinci1"], ["davinci0", "davinci3"]]


def test_registers_again_after_a_kubelet_restart(kubelet_dir, kubelet, plugin):
    kubelet.registered()
    kubelet.stop()  # removes kubelet.sock and the plugin's socket
    restarted = FakeKubelet(kubelet_dir)
    try:
        request = restarted.registered()
        stream = restarted.dial(request).ListAndWatch(api_pb2.Empty(), timeout=WAIT_S)
        assert len(next(stream).devices) == 4
        stream.cancel()
    finally:
        restarted.server.stop(grace=None).wait()


def test_registers_again_when_only_kubelet_sock_is_new(kubelet_dir, kubelet, plugin):
    kubelet.registered()
    kubelet.server.stop(grace=None).wait()  # its socket goes with it; the plugin's stays
    assert (kubelet_dir / "flexnpu.io-npu.sock").exists()
    restarted = FakeKubelet(kubelet_dir)
    try:
        assert restarted.registered().resource_name == "flexnpu.io/npu"
    finally:
        restarted.server.stop(grace=None).wait()


def test_waits_for_a_kubelet_that_comes_later(kubelet_dir, plugin):
    socket = kubelet_dir / "flexnpu.io-npu.sock"
    late = FakeKubelet(kubelet_dir)
    try:
        assert late.registered().endpoint == socket.name
    finally:
        late.server.stop(grace=None).wait()


def test_stop_removes_the_socket_and_ends_streams(kubelet_dir, kubelet, status):
    running = Running(kubelet_dir, status)
    stream = kubelet.dial(kubelet.registered()).ListAndWatch(api_pb2.Empty(), timeout=WAIT_S)
    next(stream)
    running.join()
    assert not (kubelet_dir / "flexnpu.io-npu.sock").exists()
    with pytest.raises(grpc.RpcError) as ended:
        next(stream)
    assert ended.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # ended by the plugin, not by waiting


def test_a_refusing_kubelet_stops_the_plugin(kubelet_dir, status):
    refusing = FakeKubelet(kubelet_dir, refuse="resource flexnpu.io/npu is taken")
    try:
        running = Running(kubelet_dir, status)
        running.thread.join(WAIT_S)
        (error,) = running.errors
        assert isinstance(error, PluginError)
        assert "resource flexnpu.io/npu is taken" in str(error)
        assert not (kubelet_dir / "flexnpu.io-npu.sock").exists()
    finally:
        refusing.server.stop(grace=None).wait()


def test_a_socket_that_cannot_be_made_stops_the_plugin(kubelet_dir, status):
    plugin = Plugin(status, MOUNT, kubelet_dir / "not-the-kubelets")
    with pytest.raises(PluginError, match="cannot make the socket .*not-the-kubelets/flexnpu.io-npu.sock"):
        plugin.run(threading.Event())
