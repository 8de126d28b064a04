"""What `vdevctl ls` and `vdevctl policy` show of a daemon's status, from a real topology and real sessions."""

from __future__ import annotations

import pytest
from translator_client import Client

from interposer import config
from interposer.wire import Op
from npu.errors import AclError
from scheduler.stream import Phase, PhaseSource
from tests.conftest import vdevctl
from tools.vdevctl import policy_label, render

CONFIG = {
    "daemon": {"time_scale": 0},
    "physical": [
        {"name": "npu0", "chip": "910B2", "mode": "timing"},
        {"name": "npu1", "chip": "910B4", "mode": "timing", "policy": "flex"},
    ],
    "virtual": [
        {"name": "davinci0", "physical": "npu0"},
        {"name": "davinci1", "physical": "npu1", "role": "decode"},
    ],
    "policy": {"flex": {"tpot_target_ms": 40}, "static": {"prefill_cores": 8}},
}
DAEMON = {"pid": 1, "mountpoint": "/dev/flexnpu", "config": "test"}


@pytest.mark.parametrize(
    ("physical", "label"),
    [
        ({"policy": "fifo", "policy_state": {}}, "fifo"),
        ({"policy": "static", "policy_state": {"prefill_cores": "half"}}, "static (prefill cores half)"),
        (
            {"policy": "flex", "policy_state": {"decode_reserve": 12, "tpot_target_ms": 50.0}},
            "flex (decode reserve 12, tpot target 50 ms)",
        ),
        (
            {"policy": "flex", "policy_state": {"decode_reserve": None, "tpot_target_ms": 7.5}},
            "flex (tpot target 7.5 ms)",
        ),
    ],
    ids=["no-state", "word", "numbers", "undecided"],
)
def test_a_policy_is_shown_with_its_state(physical, label):
    assert policy_label(physical) == label


def cells(table: str) -> list[dict[str, str]]:
    """A boxed table's rows as {header: cell}."""
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line[0] == "|"]
    return [dict(zip(lines[0], row, strict=True)) for row in lines[1:]]


def test_ls_shows_each_policy_with_its_state_and_each_streams_phase_with_where_it_came_from():
    topology = config.build(config.parse(CONFIG), driver="sync")
    topology.physical[0].switch_policy("static", topology.policy_options["static"])
    mixed = Client(topology.virtual[0], pid=41)
    for _ in range(2):
        assert mixed.call(Op.STREAM_CREATE, priority=0, flag=0)[0] == AclError.SUCCESS
    default = mixed.translator.default_stream
    default.phase, default.phase_from = Phase.PREFILL, PhaseSource.OPERATOR  # as if it ran PromptFlashAttention
    Client(topology.virtual[1], pid=42)  # on a decode-role NPU

    _, physical, sessions, _ = render({"daemon": DAEMON} | topology.status()).split("\n\n")
    assert [(row["Physical"], row["Policy"]) for row in cells(physical)] == [
        ("npu0", "static (prefill cores 8)"),
        ("npu1", "flex (tpot target 40 ms)"),  # its decode reserve is set at its first dispatch
    ]
    assert [(row["PID"], row["Phase"], row["Streams"]) for row in cells(sessions)] == [
        ("41", "prefill (operator), unknown ×2", "3"),
        ("42", "decode (role)", "1"),
    ]


def test_policy_without_a_daemon_says_how_to_start_one(tmp_path):
    result = vdevctl(tmp_path, "policy", "npu0", "flex")
    assert result.returncode == 1
    assert f"no FlexNPU daemon at {tmp_path}" in result.stderr and "vdevfsd mount" in result.stderr


class _Kernel:
    name = "MatMulV2"

    def __init__(self, cost) -> None:
        self._cost = cost

    def cost(self):
        return self._cost

    def run(self) -> None:
        pass


def test_ls_shows_the_ai_cores_each_side_holds_now():
    """The Physical table's "AI cores P / D": what the kernels on the chip hold, prefill (and unknown) side and
    decode side, under the NPU's policy — static's 8-core prefill partition here."""
    from npu.tasks import Cost, Unit
    from scheduler.stream import Stream, TaskEntry

    topology = config.build(config.parse(CONFIG), driver="sync")
    unit = topology.physical[0]
    unit.switch_policy("static", topology.policy_options["static"])
    engine = unit.runner.engine
    for phase, tiles in ((Phase.PREFILL, 100), (Phase.DECODE, 3)):
        stream = Stream(phase=phase, phase_from=PhaseSource.ROLE)
        engine.add_stream(stream)
        engine.submit(TaskEntry(stream, 1, task=_Kernel(Cost(flops=1e12, unit=Unit.CUBE, tiles=tiles))), engine.t)

    _, physical, _, _ = render({"daemon": DAEMON} | topology.status()).split("\n\n")
    assert [(row["Physical"], row["AI cores P / D"]) for row in cells(physical)] == [
        ("npu0", "8 / 3 of 24"),
        ("npu1", "0 / 0 of 20"),
    ]
