"""`vnpu create|resize|destroy` on the control node (vdevfs/control.py) over a real topology, with the
filesystem's side (device files, sessions) recorded by a stand-in: each command's effect, and each mistake's reply
naming what is wrong while nothing changes."""

from __future__ import annotations

import pytest

from interposer import config
from scheduler.stream import Phase
from tests.unit.test_control import CONFIG, Log
from vdevfs.control import execute

GiB = 1 << 30


class Nodes:
    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []
        self.changes = 0

    def add_node(self, vdev) -> None:
        self.added.append(vdev.name)

    def end_sessions(self, vdev) -> int:
        return len(vdev.sessions)

    def remove_node(self, vdev) -> None:
        self.removed.append(vdev.name)

    def changed(self) -> str | None:
        self.changes += 1
        return None


@pytest.fixture
def topology():
    return config.build(config.parse(CONFIG), driver="sync")


@pytest.fixture
def nodes():
    return Nodes()


def vnpu(topology, nodes, line: str, log: Log | None = None) -> str:
    return execute(topology, f"vnpu {line}", log or Log(), nodes)


def named(topology, name: str):
    return next(v for v in topology.virtual if v.name == name)


def test_create_makes_a_virtual_npu_with_the_lowest_free_name_and_its_node(topology, nodes):
    log = Log()
    assert vnpu(
        topology, nodes, "create physical=npu0 memory=2GiB cores=6 role=decode owner=1000:1000 mode=0600", log
    ) == ("ok: davinci2")
    vdev = named(topology, "davinci2")
    assert (vdev.physical.name, vdev.quota, vdev.cores, vdev.role) == ("npu0", 2 * GiB, 6, Phase.DECODE)
    assert (vdev.uid, vdev.gid, vdev.mode) == (1000, 1000, 0o600)
    assert vdev.index not in {v.index for v in topology.virtual if v is not vdev}  # a span of addresses its own
    assert vdev.ipc is topology.virtual[0].ipc  # IPC keys are the daemon's
    assert (nodes.added, nodes.changes) == (["davinci2"], 1)
    assert log.events[0]["event"] == "vnpu_created"
    status = next(v for v in topology.status()["virtual"] if v["name"] == "davinci2")
    assert (status["cores"], status["kernels"], status["memory_quota"]) == (6, 0, 2 * GiB)
    assert vnpu(topology, nodes, "create physical=npu1 memory=1073741824 name=davinci7") == "ok: davinci7"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (
            "create memory=1GiB",
            "error: physical= is needed (usage: vnpu create physical=NPU memory=SIZE [cores=N] "
            "[role=R] [owner=U:G] [mode=0660] [name=davinciN])",
        ),
        ("create physical=npu9 memory=1GiB", "error: physical = 'npu9': no such [[physical]] NPU (have npu0, npu1)"),
        (
            "create physical=npu0 memory=lots",
            "error: memory = 'lots': not a size: use bytes (an integer) or a number with KiB, MiB, GiB, TiB, KB, MB, "
            "GB or TB",
        ),
        (
            "create physical=npu0 memory=100GiB",
            "error: memory 107374182400 bytes: must be more than 0 and at most npu0's 68719476736 bytes",
        ),
        ("create physical=npu0 memory=1GiB cores=25", "error: cores 25: must be 1 to the chip's 24 AI cores"),
        (
            "create physical=npu0 memory=1GiB cores=0",
            "error: cores = 0: must be a number of AI cores >= 1 (at most the chip's)",
        ),
        ("create physical=npu0 memory=1GiB name=davinci0", "error: davinci0: a virtual NPU of that name exists"),
        (
            "create physical=npu0 memory=1GiB name=gpu0",
            "error: name = 'gpu0': must be davinci<N>, the name a container expects",
        ),
        (
            "create physical=npu0 memory=1GiB colour=red",
            "error: colour=red: not one of cores=, memory=, mode=, "
            "name=, owner=, physical=, role= (usage: vnpu create physical=NPU memory=SIZE [cores=N] [role=R] "
            "[owner=U:G] [mode=0660] [name=davinciN])",
        ),
        ("resize davinci9 memory=1GiB", "error: davinci9: no such virtual NPU (have davinci0, davinci1)"),
        (
            "resize davinci0",
            "error: nothing to change: give memory= and/or cores= (usage: vnpu resize <vnpu> [memory=SIZE] [cores=N])",
        ),
        ("resize davinci1 cores=21", "error: cores 21: must be 1 to the chip's 20 AI cores"),
        ("destroy davinci0 now", "error: usage: vnpu destroy <vnpu> [force]"),
        (
            "rename davinci0",
            "error: usage: vnpu create physical=NPU memory=SIZE [cores=N] [role=R] [owner=U:G] "
            "[mode=0660] [name=davinciN] | vnpu resize <vnpu> [memory=SIZE] [cores=N] | vnpu destroy <vnpu> [force]",
        ),
    ],
)
def test_a_mistake_changes_nothing_and_its_reply_names_it(topology, nodes, line, reply):
    before = [(v.name, v.quota, v.cores) for v in topology.virtual]
    assert vnpu(topology, nodes, line) == reply
    assert [(v.name, v.quota, v.cores) for v in topology.virtual] == before
    assert (nodes.added, nodes.removed, nodes.changes) == ([], [], 0)


def test_resize_applies_at_once_and_never_below_what_is_held(topology, nodes):
    vdev = named(topology, "davinci0")
    vdev.used = 3 * GiB
    assert vnpu(topology, nodes, "resize davinci0 memory=4GiB cores=8") == f"ok: davinci0 memory {4 * GiB} cores 8"
    assert (vdev.quota, vdev.cores, vdev.tenant.cores) == (4 * GiB, 8, 8)
    assert vnpu(topology, nodes, "resize davinci0 memory=2GiB") == (
        f"error: davinci0: {2 * GiB} bytes is below the {3 * GiB} bytes its sessions hold; free memory first"
    )
    assert vnpu(topology, nodes, "resize davinci0 cores=24") == f"ok: davinci0 memory {4 * GiB} cores 24"
    assert vdev.cores is None  # the whole chip: no cap
    assert nodes.changes == 2


def test_destroy_is_refused_while_sessions_are_open_unless_forced(topology, nodes):
    vdev = named(topology, "davinci0")
    vdev.sessions[object()] = None
    assert vnpu(topology, nodes, "destroy davinci0") == (
        "error: davinci0: 1 session(s) open; close them, or add `force` to end them (their processes get the "
        "device-lost error)"
    )
    assert vdev in topology.virtual
    vdev.sessions.clear()  # the stand-in ends none: the filesystem's side closes them (tested through a mount)
    assert vnpu(topology, nodes, "destroy davinci0 force") == "ok: davinci0 destroyed"
    assert vdev not in topology.virtual and nodes.removed == ["davinci0"]
    assert vnpu(topology, nodes, "create physical=npu0 memory=1GiB") == "ok: davinci0"  # name and index free again
    assert named(topology, "davinci0").index == 0


def test_destroy_is_refused_while_memory_it_exported_is_still_mapped_elsewhere(topology, nodes):
    vdev = named(topology, "davinci0")
    vdev.used = 8 << 20  # its sessions are gone; an IPC import on another virtual NPU keeps it paying
    assert vnpu(topology, nodes, "destroy davinci0 force") == (
        "error: davinci0: 8388608 bytes it exported are still mapped by other virtual NPUs' sessions (IPC); "
        "destroy it once they let go"
    )
    assert vdev in topology.virtual and nodes.removed == []


def test_a_change_that_could_not_be_kept_says_so(topology, nodes):
    nodes.changed = lambda: "/proc/x.state.json: No such file or directory"
    assert vnpu(topology, nodes, "resize davinci0 cores=4") == (
        f"ok: davinci0 memory {named(topology, 'davinci0').quota} cores 4 (not kept for the next start: "
        "/proc/x.state.json: No such file or directory; see the daemon's log)"
    )


def test_vnpu_commands_need_the_filesystem(topology):
    assert execute(topology, "vnpu destroy davinci0", Log()) == "error: vnpu commands need the daemon's device files"


def test_a_field_given_twice_is_refused_not_quietly_overridden(topology, nodes):
    assert vnpu(topology, nodes, "create physical=npu0 memory=1GiB mode=0600 mode=0666") == (
        "error: mode= given twice (usage: vnpu create physical=NPU memory=SIZE [cores=N] [role=R] [owner=U:G] "
        "[mode=0660] [name=davinciN])"
    )


def test_vdevctl_refuses_a_value_that_would_be_read_as_more_words():
    from click.testing import CliRunner

    from tools.vdevctl import main

    runner = CliRunner()
    for args in (
        ["vnpu", "create", "--physical", "npu0", "--memory", "1MiB", "--name", "davinci7 mode=0666"],
        ["vnpu", "destroy", "davinci5 force"],
        ["vnpu", "resize", "davinci0", "--memory", "1MiB cores=1"],
    ):
        result = runner.invoke(main, ["--mount", "/nonexistent", *args])
        assert result.exit_code == 2 and "no spaces or '=' here" in result.output, result.output
