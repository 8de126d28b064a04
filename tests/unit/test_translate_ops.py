"""Operators (interposer/translate/ops.py), sans-IO on a numeric NPU: a template described once, launched by id
with its buffers' addresses; a refused description fails each of its launches on the launch's own stream."""

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
N = 16
FLOAT, ND, BLOCKED = 0, 2, 29  # aclDataType ACL_FLOAT; aclFormat ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ


def add(layout: int = ND) -> bytes:
    tensor = {"dtype": FLOAT, "format": layout, "dims": [N]}
    return OpDescription.build({"op_type": "Add", "inputs": [tensor] * 2, "outputs": [tensor], "attrs": []})


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


@pytest.fixture
def client():
    return Client(config.build(TOPOLOGY, driver="sync").virtual[0])


def launch(client: Client, template: int, *ptrs: int, stream: int = 0, count: int | None = None) -> None:
    operands = struct.pack(f"<{len(ptrs)}Q", *ptrs)
    count = len(ptrs) if count is None else count
    client.send(Op.OP_LAUNCH, operands, template=template, stream=stream, count=count, limits=wire.OWN_LIMITS)


def test_a_described_operator_computes_on_the_buffers_each_launch_names(client):
    x, y, out = (client.ok(Op.MALLOC, size=4 * N, policy=0).ptr for _ in range(3))
    client.ok(Op.MEMCPY_H2D, floats(*range(N)), dst=x, src=0, count=4 * N)
    client.ok(Op.MEMCPY_H2D, floats(*[10.0] * N), dst=y, src=0, count=4 * N)
    client.send(Op.OP_TEMPLATE, add(), template=3)
    launch(client, 3, x, y, out)
    launch(client, 3, out, y, y)  # y = x + 20
    client.ok(Op.STREAM_SYNC, handle=0)
    assert client.read(out, 4 * N) == floats(*[i + 10.0 for i in range(N)])
    assert client.read(y, 4 * N) == floats(*[i + 20.0 for i in range(N)])


def test_a_launch_of_a_template_never_described_fails_at_the_next_synchronisation(client):
    ptr = client.ok(Op.MALLOC, size=4 * N, policy=0).ptr
    launch(client, 9, ptr, ptr, ptr)
    status, message = client.call(Op.STREAM_SYNC, handle=0)
    assert status == AclError.INVALID_PARAM
    assert message.endswith("operator launch names template 9, never described in this session")


def test_a_refused_description_fails_each_launch_on_its_own_stream(client):
    ptr = client.ok(Op.MALLOC, size=4 * N, policy=0).ptr
    client.send(Op.OP_TEMPLATE, add(BLOCKED), template=1)
    client.send(Op.OP_TEMPLATE, add(), template=2)
    side = client.ok(Op.STREAM_CREATE, priority=0, flag=0).handle
    launch(client, 1, ptr, ptr, ptr, stream=side)
    launch(client, 2, ptr, ptr, ptr)
    client.ok(Op.STREAM_SYNC, handle=0)  # the default stream's launch was of the good template
    status, message = client.call(Op.STREAM_SYNC, handle=side)
    assert status == AclError.FEATURE_UNSUPPORTED and "aclFormat 29 is a blocked layout" in message
    launch(client, 1, ptr, ptr, ptr, stream=side)  # kept: the next launch fails the same way
    assert client.call(Op.STREAM_SYNC, handle=side)[0] == AclError.FEATURE_UNSUPPORTED


@pytest.mark.parametrize(("ptrs", "count"), [(2, None), (3, 4)])
def test_a_launch_with_the_wrong_buffers_is_refused(client, ptrs, count):
    ptr = client.ok(Op.MALLOC, size=4 * N, policy=0).ptr
    client.send(Op.OP_TEMPLATE, add(), template=1)
    launch(client, 1, *[ptr] * ptrs, count=count)
    status, message = client.call(Op.STREAM_SYNC, handle=0)
    assert status == AclError.INVALID_PARAM and "buffers for 2 inputs and 1 outputs" in message


def test_a_launch_on_a_buffer_too_small_names_the_operand(client):
    small = client.ok(Op.MALLOC, size=8, policy=0).ptr
    big = client.ok(Op.MALLOC, size=4 * N, policy=0).ptr
    client.send(Op.OP_TEMPLATE, add(), template=1)
    launch(client, 1, big, small, big)
    status, message = client.call(Op.STREAM_SYNC, handle=0)
    assert status == AclError.INVALID_PARAM and f"Add input 1 0x{small:x}: 64 bytes" in message
