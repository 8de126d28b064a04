"""Head-of-line blocking under fifo survives earlier sessions: a short client that ran kernels on the decode
virtual NPU and exited must leave nothing behind that lets a later decode client escape the prefill loop's kernels.

The reported sequence (two pyACL clients on one emulated 910B2 in timing mode, policy fifo): a decode client
that ran beside a prefill loop had its steps slowed by the prefill kernels, as the device model intends; after
a short client had launched a few kernels on the decode vNPU and exited, the same experiment gave decode steps as
fast as alone while the prefill side held all 24 AI cores. Steps are timed in modeled time (event_elapsed_time),
so they compare as ratios whatever the host's speed.

The daemon runs a real clock: with no clock (time_scale = 0) modeled time jumps ahead as fast as the daemon
works, so a whole decode step (one frame) completes in one burst between two of the prefill client's round trips
and no step ever waits on a prefill kernel, with or without the bug.
"""

from __future__ import annotations

import json
import select
import statistics

import pytest

from tests.conftest import Daemon, acl_popen, acl_program, requires_mount
from tools import launch

pytestmark = requires_mount

CONFIG = """
[daemon]
time_scale = 10
policy = "fifo"

[[physical]]
name = "npu0"
chip = "910B2"
mode = "timing"

[[virtual]]
name = "davinci0"
physical = "npu0"
role = "prefill"

[[virtual]]
name = "davinci1"
physical = "npu0"
role = "decode"
"""

PREFILL, DECODE = ("--devices", "0"), ("--devices", "1")
STEPS = 6


@pytest.fixture
def daemon(tmp_path):
    config = tmp_path / "hol.toml"
    config.write_text(CONFIG)
    with launch.daemon(tmp_path / "mnt", config, tmp_path / "daemon.log") as proc:
        yield Daemon(tmp_path / "mnt", proc.pid, tmp_path / "daemon.log", config)


def decode_steps(daemon: Daemon, steps: int = STEPS) -> list[float]:
    result = acl_program(daemon.mount, "matmul_steps.py", "decode", str(steps), run_opts=DECODE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["steps_ms"]


def test_a_decode_client_waits_behind_the_prefill_loop_after_a_short_client_exited_on_its_vnpu(daemon):
    warm = acl_program(daemon.mount, "matmul_steps.py", "warm", run_opts=DECODE)
    assert warm.returncode == 0, warm.stderr
    alone = decode_steps(daemon)  # itself a client that ran kernels on davinci1 and exited

    prefill = acl_popen(daemon.mount, "matmul_steps.py", "prefill", run_opts=PREFILL)
    try:
        assert select.select([prefill.stdout], [], [], 60)[0], "the prefill loop did not start"
        assert json.loads(prefill.stdout.readline()) == {"ready": True}, prefill.stderr.read()
        beside = decode_steps(daemon)
        status = daemon.status()
        out, err = prefill.communicate("stop\n", timeout=60)
    finally:
        if prefill.poll() is None:
            prefill.kill()
            prefill.communicate()
    assert prefill.returncode == 0, err
    assert json.loads(out)["iterations"] > 1  # the prefill loop ran the whole time the decode client did
    assert status["virtual"][1]["sessions"] == []  # every decode client had gone (and the prefill loop had not)
    assert len(status["virtual"][0]["sessions"]) == 1

    # Alone, a step is 28 kernels on an idle chip (~1 ms; the median, as a loaded host may stretch one while it
    # is still queueing the step's records); beside the prefill loop, fifo queues each decode kernel behind the
    # prefill kernel on the chip (2048 x 18944 outputs on all 24 cores, ~0.9 ms a kernel).
    assert statistics.mean(beside) > 3 * statistics.median(alone), (alone, beside)
