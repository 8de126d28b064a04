"""What one session may make the daemon hold (interposer/limits.py), sans-IO through the translator: objects
bounded per session with the codes real CANN gives, host bytes counted against the session's buffers, graphs
bounded however they nest, handles unique across sessions. The multi-user attacks on a real mount are in
tests/integration/test_tenants.py."""

from __future__ import annotations

import gc
import struct
import time

import pytest
from translator_client import Client

from interposer import config, limits, wire
from interposer.handles import SessionTags
from interposer.wire import COMMANDS, Op, OpDescription
from npu.errors import AclError, FlexNPUError
from vdevfs.limits import BufferAccount, BufferLimits

MiB = 1 << 20
TOPOLOGY = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "mode": "timing"}],
        "virtual": [{"name": "davinci0", "physical": "npu0"}, {"name": "davinci1", "physical": "npu0"}],
    }
)


@pytest.fixture
def vdevs():
    return config.build(TOPOLOGY, driver="sync").virtual


@pytest.fixture
def account():
    return BufferAccount(BufferLimits(session=64 * MiB, total=128 * MiB), "davinci0")


@pytest.fixture
def client(vdevs, account):
    return Client(vdevs[0], 100, buffers=account)


def ok(result):
    status, fields = result
    assert status == AclError.SUCCESS, fields
    return fields


def sync(client: Client, stream: int = 0):
    return client.call(Op.STREAM_SYNC, handle=stream)


ADD = OpDescription.build(
    {
        "op_type": "Add",
        "inputs": [{"dtype": 0, "format": 2, "dims": [16]}] * 2,
        "outputs": [{"dtype": 0, "format": 2, "dims": [16]}],
        "attrs": [],
    }
)


def add_op(client: Client, stream: int = 0) -> callable:
    """Describe an Add on 16 floats once; return a function that launches it (asynchronously) on `stream`."""
    ptr = ok(client.call(Op.MALLOC, size=64, policy=0)).ptr
    client.send(Op.OP_TEMPLATE, ADD, template=1)
    operands = struct.pack("<3Q", ptr, ptr, ptr)
    return lambda: client.send(Op.OP_LAUNCH, operands, template=1, stream=stream, count=3, limits=wire.OWN_LIMITS)


def capture(client: Client, stream: int, body) -> tuple[int, str]:
    """Capture what `body()` issues on `stream`: (graph handle, "") or (0, the error capture_end gave)."""
    ok(client.call(Op.GRAPH_CAPTURE_BEGIN, stream=stream, mode=0))
    body()
    status, fields = client.call(Op.GRAPH_CAPTURE_END, stream=stream)
    return (fields.handle, "") if status == AclError.SUCCESS else (0, f"{int(status)} {fields}")


def launch_graph(client: Client, graph: int, stream: int) -> None:
    client.send(Op.GRAPH_LAUNCH, graph=graph, stream=stream)


# -- 1. graph replay amplification ---------------------------------------------------------------------------


def test_graphs_that_replay_the_previous_graph_twice_stop_at_the_task_limit(client, account):
    """The reported attack: level 0 is two small records, each level replays the level below twice, so one
    launch of level n queued 2**(n+1) tasks (a 21-level graph froze every client for 70 s; 30 levels got the
    daemon OOM-killed). A graph holds at most GRAPH_TASKS (a real model stream's depth): the capture past it fails
    with ACL_ERROR_RT_STREAM_TASK_FULL and holds nothing, and every graph counts against the session's buffers."""
    stream = ok(client.call(Op.STREAM_CREATE, priority=0, flag=0)).handle
    add = add_op(client, stream)
    graph, _ = capture(client, stream, lambda: (add(), add()))
    levels = [graph]
    t = time.perf_counter()
    for _ in range(30):
        below = levels[-1]
        graph, error = capture(client, stream, lambda b=below: [launch_graph(client, b, stream) for _ in range(2)])
        if not graph:
            break
        levels.append(graph)
    elapsed = time.perf_counter() - t
    assert len(levels) == 15  # 2**15 = GRAPH_TASKS tasks in the last one that fits
    assert error.startswith(f"{int(AclError.RT_STREAM_TASK_FULL)} captured record")
    assert f"the captured graph would hold {2 * limits.GRAPH_TASKS} tasks" in error
    assert elapsed < 5  # each capture is O(tasks), bounded: no level takes the daemon long
    tasks = sum(2 ** (level + 1) for level in range(15))
    assert account.held == tasks * limits.GRAPH_TASK_BYTES  # the graphs' bytes, in the session's buffers
    gc.collect()
    assert account.held == tasks * limits.GRAPH_TASK_BYTES  # the failed capture held nothing

    engine = client.translator.runner.engine
    t = time.perf_counter()
    launch_graph(client, levels[-1], stream)  # one launch: at most GRAPH_TASKS queued, at once
    assert time.perf_counter() - t < 2
    assert engine.queued <= limits.GRAPH_TASKS
    assert sync(client, stream)[0] == AclError.SUCCESS

    for graph in levels:
        ok(client.call(Op.GRAPH_DESTROY, handle=graph))
    gc.collect()
    assert account.held == 0


def test_graph_bytes_past_the_session_buffer_fail_the_capture_not_the_daemon(vdevs):
    small = BufferAccount(BufferLimits(session=1 * MiB, total=2 * MiB), "davinci0")
    client = Client(vdevs[0], 100, buffers=small)
    add = add_op(client)
    room = (1 * MiB) // limits.GRAPH_TASK_BYTES
    graph, error = capture(client, 0, lambda: [add() for _ in range(room + 1)])
    assert not graph and error.startswith(str(int(AclError.RT_OVER_LIMIT)))
    assert "session_buffer" in error
    gc.collect()
    assert small.held == 0
    graph, error = capture(client, 0, lambda: [add() for _ in range(room // 2)])
    assert graph and not error  # the session goes on


def test_queued_tasks_are_bounded_per_session_and_the_refusal_comes_at_the_next_synchronisation(client):
    """Launches faster than the chip runs them (here: virtual time, which stands still until a synchronisation)
    would queue without end: past QUEUED_TASKS the launch is refused, nothing of it is queued, and the session's
    next synchronisation reports ACL_ERROR_RT_STREAM_TASK_FULL."""
    stream = ok(client.call(Op.STREAM_CREATE, priority=0, flag=0)).handle
    add = add_op(client, stream)
    graph, _ = capture(client, stream, lambda: [add() for _ in range(1000)])
    engine = client.translator.runner.engine
    for _ in range(limits.QUEUED_TASKS // 1000 + 2):
        launch_graph(client, graph, stream)
    assert limits.QUEUED_TASKS - 1000 < engine.queued <= limits.QUEUED_TASKS
    status, message = sync(client)  # the default stream: idle, but the session's refusal is reported here
    assert status == AclError.RT_STREAM_TASK_FULL
    assert f"past {limits.QUEUED_TASKS} queued on the device" in message
    ok(sync(client, stream))  # what was queued runs
    launch_graph(client, graph, stream)  # and there is room again
    ok(sync(client, stream))


def test_async_host_to_device_data_counts_against_the_session_buffers_until_it_is_copied(client, account):
    """34 x 64 MiB queued behind a kernel used to sit outside every limit (RSS 56 -> 2,298 MiB, status 0 held).
    Virtual time stands still until a synchronisation, so the copies queue behind the first one here."""
    ptr = ok(client.call(Op.MALLOC, size=4 * MiB, policy=0)).ptr
    stream = ok(client.call(Op.STREAM_CREATE, priority=0, flag=0)).handle
    data = bytes(4 * MiB)
    for _ in range(20):  # 80 MiB against a 64 MiB session limit
        client.send(Op.MEMCPY_H2D_ASYNC, data, dst=ptr, src=0, count=len(data), stream=stream)
    assert account.held == 16 * 4 * MiB  # the 17th did not fit
    status, message = sync(client, stream)
    assert status == AclError.RT_OVER_LIMIT and "the data of asynchronous memcpy seq" in message
    assert "session_buffer" in message
    gc.collect()
    assert account.held == 0  # copied: the bytes are gone, and so is their count


def test_captured_host_to_device_data_counts_while_the_graph_lives(client, account):
    ptr = ok(client.call(Op.MALLOC, size=MiB, policy=0)).ptr
    data = bytes(MiB)
    graph, _ = capture(client, 0, lambda: client.send(Op.MEMCPY_H2D_ASYNC, data, dst=ptr, src=0, count=MiB, stream=0))
    assert account.held == MiB + limits.GRAPH_TASK_BYTES
    ok(client.call(Op.GRAPH_DESTROY, handle=graph))
    gc.collect()
    assert account.held == 0


def test_a_closed_session_counts_nothing_and_late_finalizers_count_nothing_twice(vdevs, account):
    def a_session_holding_a_graph() -> None:
        client = Client(vdevs[0], 100, buffers=account)
        ptr = ok(client.call(Op.MALLOC, size=MiB, policy=0)).ptr
        copy = bytes(MiB)
        graph, _ = capture(
            client, 0, lambda: client.send(Op.MEMCPY_H2D_ASYNC, copy, dst=ptr, src=0, count=MiB, stream=0)
        )
        assert graph and account.held > MiB
        client.translator.close()
        account.close()  # what the channel does next
        assert account.held == account.limits.held == 0

    a_session_holding_a_graph()
    gc.collect()  # the graph and its copy are collected now: their tabs must not count a second time
    assert account.held == account.limits.held == 0


# -- 6. handles, groups -----------------------------------------------------------------------------------------


def test_session_tags_are_unique_among_live_sessions_however_many_came_and_went():
    tags = SessionTags(bits=3)  # 7 tags
    kept = tags.take()
    for _ in range(100):
        tag = tags.take()
        assert tag != kept
        tags.give_back(tag)
    taken = [tags.take() for _ in range(6)]
    assert sorted([kept, *taken]) == list(range(1, 8))
    with pytest.raises(FlexNPUError) as refused:
        tags.take()
    assert refused.value.code == AclError.RT_OVER_LIMIT


def test_a_process_two_devices_never_share_a_handle_after_the_session_field_wraps(vdevs, monkeypatch):
    """Session ids used to be cut to 16 bits: after 65,536 sessions a process's two devices handed out the same
    stream handle and its calls went to the wrong device. Tags are unique among live sessions."""
    monkeypatch.setattr("interposer.translate.TAGS", SessionTags(bits=2))  # 3 tags: wrap quickly
    first = Client(vdevs[0], 100)
    for _ in range(10):  # sessions come and go on the other device
        Client(vdevs[1], 200).translator.close()
    second = Client(vdevs[1], 100)
    a = ok(first.call(Op.STREAM_CREATE, priority=0, flag=0)).handle
    b = ok(second.call(Op.STREAM_CREATE, priority=0, flag=0)).handle
    assert a != b
    status, message = second.call(Op.STREAM_SYNC, handle=a)
    assert status == AclError.RT_INVALID_HANDLE and "another process's session" in message


def test_capture_end_with_a_task_group_open_is_refused_and_the_capture_goes_on(client):
    add = add_op(client)
    ok(client.call(Op.GRAPH_CAPTURE_BEGIN, stream=0, mode=0))
    ok(client.call(Op.GRAPH_GROUP_BEGIN, stream=0))
    add()
    status, message = client.call(Op.GRAPH_CAPTURE_END, stream=0)
    assert status == AclError.INVALID_PARAM and "ri_capture_task_grp_end first" in message
    ok(client.call(Op.GRAPH_GROUP_END, stream=0))  # used to answer 500000 (an internal KeyError)
    graph = ok(client.call(Op.GRAPH_CAPTURE_END, stream=0)).handle
    launch_graph(client, graph, 0)
    ok(sync(client))


# -- 5. objects per session ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "op", "args", "code"),
    [
        ("STREAMS", Op.STREAM_CREATE, {"priority": 0, "flag": 0}, AclError.RT_NO_STREAM_RESOURCE),
        ("EVENTS", Op.EVENT_CREATE, {}, AclError.RT_NO_EVENT_RESOURCE),
        ("CONTEXTS", Op.CONTEXT_CREATE, {}, AclError.RT_NO_STREAM_RESOURCE),
    ],
)
def test_streams_events_and_contexts_are_bounded_per_session_with_canns_codes(
    vdevs, monkeypatch, limit, op, args, code
):
    monkeypatch.setattr(limits, limit, 5)
    client, other = Client(vdevs[0], 100), Client(vdevs[0], 200)
    made = []
    while True:
        status, fields = client.call(op, **args)
        if status != AclError.SUCCESS:
            break
        made.append(fields.handle)
    assert len(made) == (4 if limit == "STREAMS" else 5)  # the default stream counts
    assert status == code and "as many as one process may" in fields
    ok(other.call(op, **args))  # another session is not affected
    destroy = {Op.STREAM_CREATE: Op.STREAM_DESTROY, Op.EVENT_CREATE: Op.EVENT_DESTROY}.get(op, Op.CONTEXT_DESTROY)
    ok(client.call(destroy, handle=made[0]))
    ok(client.call(op, **args))  # room again


def test_graphs_are_bounded_per_session(client, monkeypatch):
    monkeypatch.setattr(limits, "GRAPHS", 2)
    add = add_op(client)
    graphs = [capture(client, 0, add)[0] for _ in range(2)]
    status, message = client.call(Op.GRAPH_CAPTURE_BEGIN, stream=0, mode=0)
    assert status == AclError.RT_NO_MODEL_RESOURCE and "graphs" in message
    ok(client.call(Op.GRAPH_DESTROY, handle=graphs[0]))
    assert capture(client, 0, add)[0]


def test_status_and_close_of_a_session_cost_what_it_holds_not_what_every_session_holds(vdevs):
    """Per-object costs are O(1): a session's status, its synchronisation and its close do not grow with the
    objects other sessions hold (100,000 streams elsewhere made a memset+sync go from 1.3 to 119 ms)."""
    crowd = Client(vdevs[1], 300)
    for _ in range(limits.STREAMS - 1):
        crowd.call(Op.STREAM_CREATE, priority=0, flag=0)
    for _ in range(5000):
        crowd.call(Op.EVENT_CREATE)
    me = Client(vdevs[0], 100)
    ptr = ok(me.call(Op.MALLOC, size=64, policy=0)).ptr
    engine = me.translator.runner.engine
    assert len(engine.busy) == 0  # idle streams are not visited by dispatch
    t = time.perf_counter()
    for _ in range(200):
        ok(me.call(Op.MEMSET, ptr=ptr, max=64, value=1, count=64))
    per_call = (time.perf_counter() - t) / 200
    assert per_call < 2e-3
    status = me.translator.status()
    assert status["streams"] == 1 and status["events"] == 0
    assert crowd.translator.status()["events"] == 5000
    t = time.perf_counter()
    me.translator.close()
    assert time.perf_counter() - t < 0.05
    assert me.translator not in vdevs[0].sessions
    assert COMMANDS  # the wire module loaded


def test_sessions_are_bounded_per_user_and_in_all():
    """vdevfs's admission of a new session (open() of a device node): EUSERS past a user's limit, ENFILE past
    the daemon's; a released session makes room."""
    import errno

    from vdevfs.limits import SessionRefused, Tenants

    tenants = Tenants(per_user=2, total=3)
    a, b, c = object(), object(), object()
    for session in (a, b):
        tenants.admit(1000, "davinci0")
        tenants.hold(session, 1000)
    with pytest.raises(SessionRefused) as mine:
        tenants.admit(1000, "davinci0")
    assert mine.value.errno == errno.EUSERS and mine.value.code == AclError.RT_OVER_LIMIT
    assert "uid 1000 has 2 sessions open" in mine.value.message
    tenants.admit(1001, "davinci0")  # another user is not held back by the first one's limit
    tenants.hold(c, 1001)
    with pytest.raises(SessionRefused) as everyone:
        tenants.admit(1002, "davinci0")
    assert everyone.value.errno == errno.ENFILE and "as many as it may (3)" in everyone.value.message
    tenants.release(a)
    tenants.admit(1000, "davinci0")
    assert tenants.status()["sessions"] == 2
