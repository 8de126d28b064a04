"""Graphs and task groups (interposer/translate/graphs.py and collectors.py), sans-IO on a numeric NPU: a capture
runs nothing until replayed; a replay inside a capture is flattened into the new graph; a task update replaces
its group's operators in the graph, and an update that issues other operators is refused."""

from __future__ import annotations

import struct

import pytest
from translator_client import Client

from interposer import config, wire
from interposer.wire import Op, OpDescription
from npu.errors import AclError

TOPOLOGY = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "chip": "910B2", "mode": "numeric"}],
        "virtual": [{"name": "davinci0", "physical": "npu0", "memory": "64MiB"}],
    }
)
N = 4
TENSOR = {"dtype": 0, "format": 2, "dims": [N]}  # ACL_FLOAT, ACL_FORMAT_ND
ADD = OpDescription.build({"op_type": "Add", "inputs": [TENSOR] * 2, "outputs": [TENSOR], "attrs": []})
ONES = struct.pack(f"<{N}f", *[1.0] * N)


@pytest.fixture
def client():
    client = Client(config.build(TOPOLOGY, driver="sync").virtual[0])
    client.send(Op.OP_TEMPLATE, ADD, template=1)
    return client


def ones(client: Client) -> int:
    ptr = client.ok(Op.MALLOC, size=4 * N, policy=0).ptr
    client.ok(Op.MEMCPY_H2D, ONES, dst=ptr, src=0, count=4 * N)
    return ptr


def double(client: Client, ptr: int) -> None:
    """Launch ptr = ptr + ptr on the default stream."""
    client.send(Op.OP_LAUNCH, struct.pack("<3Q", ptr, ptr, ptr), template=1, stream=0, count=3, limits=wire.OWN_LIMITS)


def value(client: Client, ptr: int) -> float:
    client.ok(Op.STREAM_SYNC, handle=0)
    values = set(struct.unpack(f"<{N}f", client.read(ptr, 4 * N)))
    assert len(values) == 1
    return values.pop()


def capture(client: Client, body) -> int:
    client.ok(Op.GRAPH_CAPTURE_BEGIN, stream=0, mode=0)
    body()
    return client.ok(Op.GRAPH_CAPTURE_END, stream=0).handle


def launch(client: Client, graph: int) -> None:
    client.send(Op.GRAPH_LAUNCH, graph=graph, stream=0)


def test_a_capture_runs_nothing_and_each_replay_runs_it_all(client):
    x = ones(client)
    graph = capture(client, lambda: (double(client, x), double(client, x)))
    assert value(client, x) == 1.0
    launch(client, graph)
    assert value(client, x) == 4.0
    launch(client, graph)
    assert value(client, x) == 16.0


def test_a_replay_inside_a_capture_joins_the_new_graph_and_outlives_the_graph_replayed(client):
    x = ones(client)
    inner = capture(client, lambda: double(client, x))
    outer = capture(client, lambda: (launch(client, inner), double(client, x), launch(client, inner)))
    client.ok(Op.GRAPH_DESTROY, handle=inner)
    launch(client, outer)
    assert value(client, x) == 8.0
    launch(client, inner)
    status, message = client.call(Op.STREAM_SYNC, handle=0)
    assert status == AclError.RT_INVALID_HANDLE and message.startswith("asynchronous record seq")


def test_a_task_update_replaces_its_groups_operators_and_leaves_the_rest(client):
    a, b, c = ones(client), ones(client), ones(client)

    def body():
        client.ok(Op.GRAPH_GROUP_BEGIN, stream=0)
        double(client, a)
        body.group = client.ok(Op.GRAPH_GROUP_END, stream=0).handle
        double(client, c)

    graph = capture(client, body)
    client.send(Op.GRAPH_UPDATE_BEGIN, stream=0, group=body.group)
    double(client, b)  # the same operator, on new parameters
    client.send(Op.GRAPH_UPDATE_END, stream=0)
    launch(client, graph)
    assert (value(client, a), value(client, b), value(client, c)) == (1.0, 2.0, 2.0)


def test_an_update_that_issues_more_operators_than_its_group_is_refused_and_the_graph_kept(client):
    a, b = ones(client), ones(client)

    def body():
        client.ok(Op.GRAPH_GROUP_BEGIN, stream=0)
        double(client, a)
        body.group = client.ok(Op.GRAPH_GROUP_END, stream=0).handle

    graph = capture(client, body)
    client.send(Op.GRAPH_UPDATE_BEGIN, stream=0, group=body.group)
    double(client, b)
    double(client, b)
    client.send(Op.GRAPH_UPDATE_END, stream=0)
    status, message = client.call(Op.STREAM_SYNC, handle=0)
    assert status == AclError.INVALID_PARAM
    assert "the update issued 2 tasks, the task group holds 1" in message
    launch(client, graph)
    assert (value(client, a), value(client, b)) == (2.0, 1.0)


@pytest.mark.parametrize(
    ("steps", "says"),
    [
        ([Op.GRAPH_CAPTURE_END], "capture_end: this stream is not being captured"),
        ([Op.GRAPH_CAPTURE_BEGIN, Op.GRAPH_CAPTURE_BEGIN], "capture_begin: this stream is already being captured"),
        ([Op.GRAPH_GROUP_BEGIN], "ri_capture_task_grp_begin: the stream must be capturing, outside a task group"),
        ([Op.GRAPH_CAPTURE_BEGIN, Op.GRAPH_GROUP_END], "ri_capture_task_grp_end: no task group began on this stream"),
    ],
)
def test_capture_calls_out_of_order_are_refused(client, steps, says):
    args = {Op.GRAPH_CAPTURE_BEGIN: {"stream": 0, "mode": 0}}
    *before, last = steps
    for op in before:
        client.ok(op, **args.get(op, {"stream": 0}))
    status, message = client.call(last, **args.get(last, {"stream": 0}))
    assert status == AclError.INVALID_PARAM and message.startswith(says)
