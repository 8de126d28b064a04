"""The protocol's frame around every record (interposer/translate/protocol.py), sans-IO: HELLO first, the
session's phase onto its streams, contexts, and the ancillary nodes that answer VERSION only."""

from __future__ import annotations

import pytest
from translator_client import Client

from interposer import config, wire
from interposer.translate import HANDLERS, Translator, VersionOnly
from interposer.wire import COMMANDS, Op, Record
from npu.errors import AclError

TOPOLOGY = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "chip": "910B2", "mode": "timing"}],
        "virtual": [
            {"name": "davinci0", "physical": "npu0", "memory": "1GiB"},
            {"name": "davinci1", "physical": "npu0", "memory": "1GiB", "role": "decode"},
        ],
    }
)


@pytest.fixture
def vdevs():
    return config.build(TOPOLOGY, driver="sync").virtual


def record(op: Op, seq: int, **args) -> Record:
    command = COMMANDS[op]
    return Record(command, seq, command.request.parse(command.request.build(args)), memoryview(b""))


def hello(version: int = wire.PROTOCOL_VERSION, phase: int = 0, pid: int = 7) -> Record:
    return record(Op.HELLO, 1, version=version, phase=phase, pad=0, pid=pid)


def test_every_command_of_the_wire_has_a_handler_in_a_concern_module():
    assert set(HANDLERS) == set(COMMANDS)
    for op, handler in HANDLERS.items():
        assert handler.__module__.startswith("interposer.translate."), op


def test_records_before_hello_are_refused_but_version_answers(vdevs):
    session = Translator(vdevs[0])
    answer = session.execute(record(Op.VERSION, 1))
    version = COMMANDS[Op.VERSION].reply.parse(answer.payload)
    assert answer.status == AclError.SUCCESS and version.version == wire.PROTOCOL_VERSION
    refused = session.execute(record(Op.MALLOC, 2, size=64, policy=0))
    assert refused.status == AclError.INVALID_PARAM and b"MALLOC before HELLO" in refused.payload
    # An asynchronous record before HELLO has no answer of its own: the first synchronisation reports it.
    assert session.execute(record(Op.MEMSET_ASYNC, 3, stream=0, ptr=0, value=0, count=1)) is None
    assert session.execute(hello()).status == AclError.SUCCESS
    failed = session.execute(record(Op.STREAM_SYNC, 4, handle=0)).then()
    assert failed.status == AclError.INVALID_PARAM
    assert failed.payload.startswith(b"asynchronous record seq 3 failed: MEMSET_ASYNC before HELLO")
    assert session.execute(record(Op.STREAM_SYNC, 5, handle=0)).then().status == AclError.SUCCESS  # reported once


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"version": wire.PROTOCOL_VERSION + 1}, b"protocol version mismatch"),
        ({"phase": 3}, b"HELLO phase 3 is not 0 (unknown), 1 (prefill) or 2 (decode)"),
    ],
)
def test_a_bad_hello_is_refused_and_the_session_stays_closed_to_other_records(vdevs, fields, says):
    session = Translator(vdevs[0])
    refused = session.execute(hello(**fields))
    assert refused.status == AclError.INVALID_PARAM and says in refused.payload
    assert session.execute(record(Op.DEVICE_SYNC, 2)).status == AclError.INVALID_PARAM


def test_hello_answers_the_virtual_npu_and_its_phase_goes_onto_every_stream(vdevs):
    client = Client(vdevs[0], pid=0)
    answer = client.ok(Op.HELLO, version=wire.PROTOCOL_VERSION, phase=1, pad=0, pid=42)
    assert (answer.name, answer.chip, answer.total_memory) == ("davinci0", "910B2", 1 << 30)
    client.ok(Op.STREAM_CREATE, priority=0, flag=0)
    status = client.translator.status()
    assert status["pid"] == 42  # the transport gave none (direct mode): the client's own word
    assert status["phase"] == "prefill"
    assert status["stream_phases"] == [{"phase": "prefill", "from": "client"}] * 2


def test_a_virtual_npus_role_outranks_the_phase_its_client_declares(vdevs):
    client = Client(vdevs[1])
    client.ok(Op.HELLO, version=wire.PROTOCOL_VERSION, phase=1, pad=0, pid=1)
    client.ok(Op.STREAM_CREATE, priority=0, flag=0)
    status = client.translator.status()
    assert status["phase"] == "decode"
    assert status["stream_phases"] == [{"phase": "decode", "from": "role"}] * 2


def test_a_context_is_a_handle_destroyed_once(vdevs):
    client = Client(vdevs[0])
    context = client.ok(Op.CONTEXT_CREATE).handle
    client.ok(Op.CONTEXT_DESTROY, handle=context)
    status, message = client.call(Op.CONTEXT_DESTROY, handle=context)
    assert status == AclError.RT_INVALID_HANDLE and message


def test_an_ancillary_node_answers_version_only():
    node = VersionOnly("davinci_manager")
    assert node.execute(record(Op.VERSION, 1)).status == AclError.SUCCESS
    refused = node.execute(record(Op.MALLOC, 2, size=64, policy=0))
    assert refused.status == AclError.API_NOT_SUPPORT
    assert refused.payload == b"davinci_manager answers only VERSION; open a davinciN node for MALLOC"
    assert node.execute(record(Op.MEMSET_ASYNC, 3, stream=0, ptr=0, value=0, count=1)) is None
    assert node.take_deliveries() == []
