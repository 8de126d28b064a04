"""Streams and events (interposer/translate/streams.py), sans-IO: asynchronous failures reported by the
synchronisation that covers them, once; events ordering one stream after another; core limits per stream and
per process; a destroyed stream's handle refused."""

from __future__ import annotations

import pytest
from translator_client import Client

from interposer import config
from interposer.wire import Op
from npu.errors import AclError

TOPOLOGY = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "chip": "910B2", "mode": "numeric"}],
        "virtual": [{"name": "davinci0", "physical": "npu0", "memory": "64MiB"}],
    }
)


@pytest.fixture
def client():
    return Client(config.build(TOPOLOGY, driver="sync").virtual[0])


def stream(client: Client) -> int:
    return client.ok(Op.STREAM_CREATE, priority=0, flag=0).handle


def fill(client: Client, on: int, ptr: int, value: int, count: int = 64) -> None:
    client.send(Op.MEMSET_ASYNC, stream=on, ptr=ptr, value=value, count=count)


def test_a_stream_sync_reports_the_earliest_failure_on_that_stream_once(client):
    side = stream(client)
    ptr = client.ok(Op.MALLOC, size=64, policy=0).ptr
    fill(client, side, ptr, 300)  # not a byte
    fill(client, side, ptr, 1, count=65)  # past the allocation
    client.ok(Op.STREAM_SYNC, handle=0)  # the default stream has nothing to report
    status, message = client.call(Op.STREAM_SYNC, handle=side)
    assert status == AclError.INVALID_PARAM
    assert message == "asynchronous record seq 4 failed: memset value 300 is not a byte (0-255)"
    client.ok(Op.STREAM_SYNC, handle=side)


def test_a_device_sync_reports_the_earliest_failure_of_every_stream_and_of_records_naming_none(client):
    first, second = stream(client), stream(client)
    fill(client, second, 0x1234, 1)
    earliest = client.seq
    fill(client, first, 0x5678, 1)
    fill(client, 999, 0x9ABC, 1)  # names no stream of the session
    status, message = client.call(Op.DEVICE_SYNC)
    assert status == AclError.INVALID_PARAM
    assert message.startswith(f"asynchronous record seq {earliest} failed: memset_async ptr 0x1234")
    client.ok(Op.DEVICE_SYNC)  # the later failures were covered by the same synchronisation


def test_an_event_orders_one_streams_work_after_anothers(client):
    first, second = stream(client), stream(client)
    src, dst = (client.ok(Op.MALLOC, size=64, policy=0).ptr for _ in range(2))
    event = client.ok(Op.EVENT_CREATE).handle
    fill(client, first, src, 7)
    client.send(Op.EVENT_RECORD, event=event, stream=first)
    client.send(Op.EVENT_WAIT, event=event, stream=second)
    client.send(Op.MEMCPY_D2D_ASYNC, stream=second, dst=dst, src=src, count=64)
    client.ok(Op.STREAM_SYNC, handle=second)
    assert client.read(dst, 64) == bytes([7] * 64)
    client.ok(Op.EVENT_SYNC, handle=event)
    assert client.ok(Op.EVENT_QUERY, handle=event).completed == 1


def test_elapsed_time_needs_two_completed_records(client):
    start, end = client.ok(Op.EVENT_CREATE).handle, client.ok(Op.EVENT_CREATE).handle
    status, message = client.call(Op.EVENT_ELAPSED, start=start, end=end)
    assert status == AclError.INVALID_PARAM and "both events must have completed a record" in message
    ptr = client.ok(Op.MALLOC, size=1 << 20, policy=0).ptr
    client.send(Op.EVENT_RECORD, event=start, stream=0)
    fill(client, 0, ptr, 1, count=1 << 20)
    client.send(Op.EVENT_RECORD, event=end, stream=0)
    client.ok(Op.STREAM_SYNC, handle=0)
    assert client.ok(Op.EVENT_ELAPSED, start=start, end=end).ns > 0
    client.send(Op.EVENT_RESET, event=end, stream=0)  # forgets the completed record
    assert client.call(Op.EVENT_ELAPSED, start=start, end=end)[0] == AclError.INVALID_PARAM


def test_a_streams_own_core_limit_outranks_the_processes(client):
    side = stream(client)
    cube = 0  # ACL_RT_DEV_RES_CUBE_CORE
    chip_cores = client.ok(Op.DEVICE_LIMIT_GET, kind=cube).value
    assert client.ok(Op.STREAM_LIMIT_GET, stream=side, kind=cube).value == chip_cores
    client.ok(Op.DEVICE_LIMIT_SET, kind=cube, value=8)
    client.ok(Op.STREAM_LIMIT_SET, stream=side, kind=cube, value=2)
    assert client.ok(Op.STREAM_LIMIT_GET, stream=0, kind=cube).value == 8
    assert client.ok(Op.STREAM_LIMIT_GET, stream=side, kind=cube).value == 2
    status, message = client.call(Op.STREAM_LIMIT_SET, stream=side, kind=cube, value=chip_cores + 1)
    assert status == AclError.INVALID_PARAM and f"this chip has 1-{chip_cores}" in message


def test_a_destroyed_stream_finishes_its_work_and_its_handle_is_refused_after(client):
    side = stream(client)
    ptr = client.ok(Op.MALLOC, size=64, policy=0).ptr
    fill(client, side, ptr, 9)
    client.ok(Op.STREAM_DESTROY, handle=side)
    assert client.read(ptr, 64) == bytes([9] * 64)
    assert client.call(Op.STREAM_SYNC, handle=side)[0] == AclError.RT_INVALID_HANDLE
    assert client.translator.status()["streams"] == 1


def test_a_stream_being_captured_refuses_events(client):
    event = client.ok(Op.EVENT_CREATE).handle
    client.ok(Op.GRAPH_CAPTURE_BEGIN, stream=0, mode=0)
    client.send(Op.EVENT_RECORD, event=event, stream=0)
    client.ok(Op.GRAPH_CAPTURE_END, stream=0)
    status, message = client.call(Op.STREAM_SYNC, handle=0)
    assert status == AclError.API_NOT_SUPPORT and "record_event on a stream being captured" in message
