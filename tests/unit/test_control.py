"""The control node's commands (vdevfs/control.py) over a real topology, without FUSE: a switch, each mistake's
reply naming what is valid, and the bytes in and out of one open node."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from interposer import config
from npu.memory import Region
from npu.tasks import Fill
from scheduler.flex import Flex
from scheduler.policy import Fifo, Quiet
from scheduler.static import Static
from scheduler.stream import Stream, TaskEntry
from vdevfs.control import MAX_COMMAND, Control, execute

MiB = 1 << 20

CONFIG = {
    "daemon": {"time_scale": 0},
    "physical": [
        {"name": "npu0", "chip": "910B2", "mode": "timing"},  # 24 AI cores
        {"name": "npu1", "chip": "910B4", "mode": "timing", "policy": "flex"},  # 20 AI cores
    ],
    "virtual": [{"name": "davinci0", "physical": "npu0"}, {"name": "davinci1", "physical": "npu1"}],
    "policy": {"flex": {"tpot_target_ms": 40}, "static": {"prefill_cores": 22}},
}


class Log:
    """Records what is logged (structlog's capture_logs would leave structlog configured for later tests)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def info(self, event: str, **fields) -> None:
        self.events.append({"event": event, **fields})


@pytest.fixture
def topology():
    return config.build(config.parse(CONFIG), driver="sync")


def run(topology, line: str, log: Log | None = None) -> str:
    return execute(topology, line, log or Log())


def policies(topology) -> list[tuple[str, type]]:
    return [(unit.policy, type(unit.runner.engine.policy)) for unit in topology.physical]


def test_a_switch_makes_the_policy_with_its_configured_options_and_status_shows_it(topology):
    log = Log()
    assert run(topology, "policy npu0 flex", log) == "ok: npu0 policy flex (was fifo)"
    assert policies(topology) == [("flex", Flex), ("flex", Flex)]
    npu0 = topology.physical[0]
    assert npu0.runner.engine.policy is not topology.physical[1].runner.engine.policy  # each NPU its own state
    status = topology.status()["physical"][0]
    assert (status["policy"], status["policy_state"]["tpot_target_ms"]) == ("flex", 40.0)
    assert log.events == [
        {
            "event": "policy_switched",
            "npu": "npu0",
            "policy": "flex",
            "was": "fifo",
            "options": {"tpot_target_ms": 40},
        }
    ]
    assert run(topology, "policy npu0 fifo\n") == "ok: npu0 policy fifo (was flex)"
    assert policies(topology)[0] == ("fifo", Fifo)


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("policy npu9 flex", "error: npu9: no such physical NPU (have npu0, npu1; see vdevctl policy)"),
        ("policy npu0 rr", "error: rr: no such policy (have fifo, static, flex)"),
        (
            "policies npu0 flex",
            "error: policies: unknown command (commands: policy <npu> <name>, vnpu create|resize|destroy ...)",
        ),
        ("", "error: empty command (commands: policy <npu> <name>, vnpu create|resize|destroy ...)"),
        ("policy npu0", "error: usage: policy <npu> <name>"),
        ("policy npu0 flex now", "error: usage: policy <npu> <name>"),
        (
            "policy npu1 static",  # prefill_cores = 22 fits npu0's 24 AI cores, not npu1's 20
            "error: npu1: static policy: prefill_cores 22 leaves decode no core of the 20 on 910B4 (use 1-19); "
            "its options are [policy.static] in the daemon's config",
        ),
    ],
    ids=["npu", "policy", "command", "empty", "too-few", "too-many", "options-do-not-fit"],
)
def test_a_mistake_changes_nothing_and_its_reply_names_what_is_valid(topology, line, reply):
    before = [unit.runner.engine.policy for unit in topology.physical]
    log = Log()
    assert run(topology, line, log) == reply
    assert [unit.runner.engine.policy for unit in topology.physical] == before
    assert policies(topology) == [("fifo", Fifo), ("flex", Flex)]
    assert log.events == []


def test_options_that_fit_one_npu_switch_it(topology):
    assert run(topology, "policy npu0 static") == "ok: npu0 policy static (was fifo)"
    assert topology.physical[0].runner.engine.policy.prefill_cores == 22
    assert topology.status()["physical"][0]["policy_state"] == {"prefill_cores": 22}


def test_queued_work_stays_queued_in_order_across_a_switch(topology):
    unit = topology.physical[0]
    stream = Stream()
    unit.runner.engine.add_stream(stream)
    buffer = unit.npu.memory.alloc(64 * MiB)
    for seq in range(5):
        unit.runner.submit(TaskEntry(stream, seq, task=Fill(Region(buffer, 0, 64 * MiB), seq)))
    assert unit.runner.engine.queued == 5  # nothing runs in direct mode until someone waits
    assert run(topology, "policy npu0 static") == "ok: npu0 policy static (was fifo)"
    assert isinstance(unit.runner.engine.policy, Static)
    unit.runner.wait_until(lambda: stream.idle)
    assert stream.completed == 5


class Hold(Quiet):
    """Starts nothing: work waits until another policy takes over."""

    name = "hold"

    def select(self, ready, running, chip, now):
        return []


def test_the_new_policy_starts_held_work_at_the_present(topology):
    unit = topology.physical[0]
    unit.runner.engine.policy, unit.policy = Hold(), "hold"
    stream = Stream()
    unit.runner.engine.add_stream(stream)
    entry = TaskEntry(stream, 1, task=Fill(Region(unit.npu.memory.alloc(MiB), 0, MiB), 0))
    unit.runner.submit(entry)  # at modeled time 0
    unit.runner.clock.t = 2.0  # the engine has not moved since
    assert run(topology, "policy npu0 fifo") == "ok: npu0 policy fifo (was hold)"
    assert entry.job is not None and entry.job.started_at == 2.0


async def test_a_switch_wakes_the_daemons_driver_to_run_what_the_new_policy_starts():
    topology = config.build(config.parse(CONFIG), driver="trio")
    unit = topology.physical[0]
    unit.runner.engine.policy, unit.policy = Hold(), "hold"
    stream = Stream()
    unit.runner.engine.add_stream(stream)
    buffer = unit.npu.memory.alloc(64 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(unit.runner.run)
        unit.runner.submit(TaskEntry(stream, 1, task=Fill(Region(buffer, 0, 64 * MiB), 0)))
        await trio.testing.wait_all_tasks_blocked()
        assert not stream.idle  # held, and the driver asleep with nothing to wait for
        assert run(topology, "policy npu0 fifo") == "ok: npu0 policy fifo (was hold)"
        await trio.testing.wait_all_tasks_blocked()
        assert stream.idle and stream.completed == 1
        nursery.cancel_scope.cancel()


# -- one open node: bytes in, a reply line out -----------------------------------------------------------


@pytest.fixture
def control(topology):
    return Control(topology, Log())


def test_a_write_is_one_command_and_the_next_read_its_reply(control):
    control.write(b"policy npu0 flex\n")
    assert control.read(4096) == b"ok: npu0 policy flex (was fifo)\n"
    assert control.read(4096) == b""
    control.write(b"policy npu0 static")  # no newline needed
    assert control.read(10) + control.read(4096) == b"ok: npu0 policy static (was flex)\n"


def test_an_unread_reply_is_replaced_by_the_next(control):
    control.write(b"policy npu9 flex\n")
    control.write(b"policy npu0 flex\n")
    assert control.read(4096) == b"ok: npu0 policy flex (was fifo)\n"


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (
            b"policy npu0 flex\npolicy npu1 fifo\n",
            b"error: one command per write (read its reply, then write the next)",
        ),
        (b"policy npu0 " + b"x" * MAX_COMMAND, b"error: a command is one line of at most 1024 bytes (got 1036)"),
        (
            b"\xff\xfe npu0 flex",
            b"error: \xef\xbf\xbd\xef\xbf\xbd: unknown command "
            b"(commands: policy <npu> <name>, vnpu create|resize|destroy ...)",
        ),
    ],
    ids=["two-lines", "too-long", "not-utf8"],
)
def test_a_write_that_is_not_one_command_is_refused_in_its_reply(control, topology, data, reply):
    control.write(data)
    assert control.read(4096) == reply + b"\n"
    assert policies(topology) == [("fifo", Fifo), ("flex", Flex)]
