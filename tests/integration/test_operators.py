"""Operators through the device files: the pyACL Add sample, graph capture and replay, operator errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import AttrKind, Op
from npu.errors import AclError
from tests.conftest import PROGRAMS, ROOT, acl_program, requires_mount

pytestmark = requires_mount

INT32, FP16, ND = 3, 1, 2


def test_add_sample_sums_exactly_through_the_daemon(daemon):
    result = acl_program(daemon.mount, "add_op.py", "0", run_opts=("--devices", "3"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "add ok"


def test_add_sample_sums_exactly_in_direct_mode(daemon):
    result = acl_program(daemon.mount, "add_op.py", "0", run_opts=("--direct", "--config", str(daemon.config)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "add ok"


def test_captured_graph_replays_what_it_captured(daemon):
    result = acl_program(daemon.mount, "graph.py", "0", run_opts=("--devices", "2"))
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["capture_ran_nothing"] and outcome["replay_matches_eager"]


def test_replay_costs_what_the_captured_ops_cost(tmp_path):
    """With no clock, modeled time is device time only: a replay takes exactly what the eager ops took."""
    config = tmp_path / "virtual.toml"
    config.write_text(
        '[daemon]\ntime_scale = 0\n[[physical]]\nname = "npu0"\n[[virtual]]\nname = "davinci0"\nphysical = "npu0"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "tools.vdevctl", "run", "--direct", "--config", str(config), "--",
         sys.executable, str(PROGRAMS / "graph.py"), "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["replay_ms"] == outcome["eager_ms"] > 0


@pytest.fixture
def runtime(daemon):
    rt = Runtime(devices=[str(daemon.mount / "davinci2")])
    rt.set_device(0)
    yield rt
    rt.reset_device(0, force=True)


def operand(rt: Runtime, dtype: int, dims: tuple[int, ...], itemsize: int) -> tuple:
    size = itemsize
    for d in dims:
        size *= d
    return (dtype, ND, dims, rt.malloc(size, 0))


def expect(code: AclError, match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(AclCallError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.code == code


def test_operator_errors_surface_at_the_next_sync_naming_op_and_operand(runtime):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    a = operand(runtime, INT32, (8, 16), 4)
    sync = (runtime.call, Op.STREAM_SYNC, stream)

    runtime.launch("Frobnicate", [a], [a], {}, stream)
    expect(AclError.OP_NOT_FOUND, "'Frobnicate' not found", *sync, handle=stream)

    wrong = operand(runtime, INT32, (8, 8), 4)
    runtime.launch("Add", [a, a], [wrong], {}, stream)
    expect(
        AclError.INVALID_PARAM,
        r"Add output 0: declared int32\[8, 8\], the op produces int32\[8, 16\]",
        *sync,
        handle=stream,
    )

    half = operand(runtime, FP16, (8, 16), 2)
    runtime.launch("MatMulV2", [a, half], [a], {}, stream)
    expect(AclError.INVALID_PARAM, "MatMulV2 x2: dtype float16 differs from int32", *sync, handle=stream)

    runtime.launch("SoftmaxV2", [half], [half], {"axes": (AttrKind.LIST_INT, [5])}, stream)
    expect(AclError.INVALID_PARAM, "SoftmaxV2 attr axes: 5 is out of range", *sync, handle=stream)

    runtime.launch("Add", [a, a], [a], {}, stream)
    runtime.call(Op.STREAM_SYNC, stream, handle=stream)  # the stream works again once the error is reported


def test_operator_operands_must_fit_their_buffers(runtime):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    a = operand(runtime, INT32, (4,), 4)
    small = (INT32, ND, (64,), a[3])  # a 4-element buffer described as 64 elements
    runtime.launch("Add", [a, a], [small], {}, stream)
    expect(AclError.INVALID_PARAM, "Add output 0", runtime.call, Op.STREAM_SYNC, stream, handle=stream)
    runtime.launch("Add", [small, small], [small], {}, stream)
    expect(
        AclError.INVALID_PARAM,
        "Add input 0 0x[0-9a-f]+: 256 bytes",
        runtime.call,
        Op.STREAM_SYNC,
        stream,
        handle=stream,
    )


def test_capture_misuse_is_refused(runtime):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    expect(AclError.INVALID_PARAM, "not being captured", runtime.call, Op.GRAPH_CAPTURE_END, stream, stream=stream)
    runtime.call(Op.GRAPH_CAPTURE_BEGIN, stream, stream=stream, mode=0)
    expect(
        AclError.INVALID_PARAM,
        "already being captured",
        runtime.call,
        Op.GRAPH_CAPTURE_BEGIN,
        stream,
        stream=stream,
        mode=0,
    )
    event = runtime.create(Op.EVENT_CREATE)
    runtime.submit(Op.EVENT_RECORD, event, event=event, stream=stream)
    runtime.call(Op.GRAPH_CAPTURE_END, stream, stream=stream)
    expect(AclError.API_NOT_SUPPORT, "record_event on a stream being captured", runtime.call, Op.DEVICE_SYNC)


def test_blocked_formats_are_refused_naming_the_operand(runtime):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    dtype, _, dims, ptr = operand(runtime, FP16, (16, 16), 2)
    nz = (dtype, 29, dims, ptr)  # ACL_FORMAT_FRACTAL_NZ
    runtime.launch("Add", [nz, nz], [nz], {}, stream)
    expect(
        AclError.FEATURE_UNSUPPORTED, "Add input 0: aclFormat 29", runtime.call, Op.STREAM_SYNC, stream, handle=stream
    )


def test_an_attribute_of_the_wrong_kind_fails_the_launch_and_the_daemon_survives(runtime, daemon):
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    x = operand(runtime, FP16, (4, 8), 2)
    runtime.launch("SoftmaxV2", [x], [x], {"axes": (AttrKind.INT, -1)}, stream)  # axes must be a list
    expect(AclError.INVALID_PARAM, "an attribute is wrong", runtime.call, Op.STREAM_SYNC, stream, handle=stream)
    assert daemon.status()["daemon"]["pid"] == daemon.pid
