"""The tiny model's greedy generation as an interposed program through a daemon's device file gives the numpy
reference's tokens, as it does in direct mode (tests/unit/test_model.py)."""

from __future__ import annotations

import json
import sys

from tests.conftest import requires_mount, vdevctl
from tests.reference_model import reference_greedy
from workloads.model import model_config
from workloads.weights import random_checkpoint

pytestmark = requires_mount


def test_tiny_model_generates_the_reference_tokens_through_the_daemon(daemon):
    prompts, steps = ["The NPU is virtual", "hi"], 4
    args = [arg for p in prompts for arg in ("--prompt", p)]
    command = [sys.executable, "-m", "workloads.generate", "tokens", "--seed", "1", *args, "--steps", str(steps)]
    result = vdevctl(daemon.mount, "run", "--devices", "0", "--", *command)
    assert result.returncode == 0, result.stderr
    tiny = model_config("tiny")
    expected = reference_greedy(tiny, random_checkpoint(tiny, seed=1), [list(p.encode()) for p in prompts], steps)
    assert json.loads(result.stdout)["tokens"] == expected
