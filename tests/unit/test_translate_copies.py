"""Copies and fills (interposer/translate/copies.py), sans-IO on a numeric NPU: the bytes arrive; a blocking copy
runs after the session's work on every stream; asynchronous device-to-host bytes come back with the next reply,
under their own seq; a copy of a stream that failed reports that failure."""

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
DATA = bytes(range(256))


@pytest.fixture
def client():
    return Client(config.build(TOPOLOGY, driver="sync").virtual[0])


def buffers(client: Client, n: int, size: int = len(DATA)) -> list[int]:
    return [client.ok(Op.MALLOC, size=size, policy=0).ptr for _ in range(n)]


def test_blocking_copies_and_fills_move_the_bytes(client):
    a, b = buffers(client, 2)
    client.ok(Op.MEMCPY_H2D, DATA, dst=a, src=0, count=len(DATA))
    client.ok(Op.MEMCPY_D2D, dst=b, src=a, count=len(DATA))
    client.ok(Op.MEMSET, ptr=a, value=0xAB, count=16)
    assert client.read(a, len(DATA)) == bytes([0xAB] * 16) + DATA[16:]
    assert client.read(b, len(DATA)) == DATA


@pytest.mark.parametrize(
    ("op", "data", "args", "says"),
    [
        (Op.MEMCPY_H2D, DATA[:8], {"src": 0, "count": 9}, "memcpy count 9 does not match the 8 bytes sent"),
        (Op.MEMSET, b"", {"value": 256, "count": 1}, "memset value 256 is not a byte (0-255)"),
        (Op.MEMCPY_D2H, b"", {"dst": 0, "count": 257}, "257 bytes at offset 0 run past the end of its 256-byte"),
    ],
)
def test_a_bad_copy_is_refused_naming_what_is_wrong(client, op, data, args, says):
    (ptr,) = buffers(client, 1)
    where = {"ptr": ptr} if op is Op.MEMSET else {"src": ptr} if op is Op.MEMCPY_D2H else {"dst": ptr}
    status, message = client.call(op, data, **where, **args)
    assert status == AclError.INVALID_PARAM and says in message


def test_asynchronous_copies_run_in_stream_order_and_their_bytes_come_back_with_the_next_reply(client):
    a, b = buffers(client, 2)
    stream = client.ok(Op.STREAM_CREATE, priority=0, flag=0).handle
    client.send(Op.MEMCPY_H2D_ASYNC, DATA, stream=stream, dst=a, src=0, count=len(DATA))
    client.send(Op.MEMCPY_D2D_ASYNC, stream=stream, dst=b, src=a, count=len(DATA))
    client.send(Op.MEMSET_ASYNC, stream=stream, ptr=b, value=1, count=4)
    assert client.send(Op.MEMCPY_D2H_ASYNC, stream=stream, dst=0, src=b, count=8) == []  # no reply of its own
    copied = client.seq
    delivered, synced = client.send(Op.STREAM_SYNC, handle=stream)
    assert (delivered.seq, bytes(delivered.payload)) == (copied, bytes([1] * 4) + DATA[4:8])
    assert (synced.seq, synced.status) == (copied + 1, AclError.SUCCESS)


def test_a_blocking_copy_returns_after_the_work_queued_on_every_stream(client):
    size = 16 << 20  # a fill that takes far longer than the copy after it
    big, small = buffers(client, 1, size)[0], buffers(client, 1)[0]
    stream = client.ok(Op.STREAM_CREATE, priority=0, flag=0).handle
    done = client.ok(Op.EVENT_CREATE).handle
    client.send(Op.MEMSET_ASYNC, stream=stream, ptr=big, value=5, count=size)
    client.send(Op.EVENT_RECORD, event=done, stream=stream)
    client.ok(Op.MEMSET, ptr=small, value=0, count=1)  # on the default stream
    assert client.ok(Op.EVENT_QUERY, handle=done).completed == 1
    assert client.read(big, 16) == bytes([5] * 16)


def test_a_blocking_copy_after_a_failed_record_on_the_default_stream_reports_that_failure(client):
    (ptr,) = buffers(client, 1)
    client.send(Op.MEMSET_ASYNC, stream=0, ptr=ptr, value=999, count=1)
    status, message = client.call(Op.MEMSET, ptr=ptr, value=0, count=1)
    assert status == AclError.INVALID_PARAM
    assert message == f"asynchronous record seq {client.seq - 1} failed: memset value 999 is not a byte (0-255)"
    client.ok(Op.MEMSET, ptr=ptr, value=0, count=1)  # reported once: the stream goes on
