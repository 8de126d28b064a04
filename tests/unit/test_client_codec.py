"""The client's standard-library codec (interposer/shim/flexnpu_client) against the construct definitions in
interposer/wire.py, which stay the one source of truth: the generated layouts are current, and every record,
operator description and handshake reply the client handles is byte-for-byte what construct builds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interposer import wire
from interposer.shim.flexnpu_client import codec
from tests.unit.test_wire import FAST, args_for
from tools import client_layouts

PER_COMMAND = settings(FAST, max_examples=30)


def test_checked_in_layouts_are_generated_from_the_current_wire_definitions():
    assert client_layouts.TARGET.read_text() == client_layouts.render(), (
        "interposer/shim/flexnpu_client/layouts.py is stale: run `python -m tools.client_layouts`"
    )


@pytest.mark.parametrize("command", list(wire.COMMANDS.values()), ids=lambda c: c.op.name)
def test_client_records_match_construct(command):
    client = codec.COMMANDS[codec.Op[command.op.name]]
    assert (client.cmd, client.sync, client.bulk, client.fixed_size) == (
        command.cmd,
        command.sync,
        command.bulk,
        command.fixed_size,
    )

    @PER_COMMAND
    @given(args=args_for(command), seq=st.integers(0, (1 << 32) - 1), data=st.binary(max_size=64))
    def check(args, seq, data):
        data = data if command.bulk else b""
        assert b"".join(client.record(seq, data, args)) == b"".join(wire.encode_record(command, seq, data, **args))
        if not data:
            expected = b"".join(wire.frame(wire.encode_record(command, seq, **args), 1))
            assert client.solo_frame(seq, args) == expected

    check()


attr_values = {
    wire.AttrKind.INT: st.integers(-(1 << 63), (1 << 63) - 1),
    wire.AttrKind.FLOAT: st.floats(allow_nan=False),
    wire.AttrKind.BOOL: st.booleans(),
    wire.AttrKind.STRING: st.text(max_size=20),
    wire.AttrKind.LIST_INT: st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=5),
    wire.AttrKind.LIST_FLOAT: st.lists(st.floats(allow_nan=False), max_size=5),
    wire.AttrKind.LIST_BOOL: st.lists(st.booleans(), max_size=5),
}
attrs = st.dictionaries(
    st.text(min_size=1, max_size=12),
    st.sampled_from(list(attr_values)).flatmap(lambda k: st.tuples(st.just(k), attr_values[k])),
    max_size=4,
)
tensors = st.tuples(st.integers(-1, 30), st.integers(-1, 30), st.lists(st.integers(-1, 1 << 40), max_size=6))


@FAST
@given(
    op_type=st.text(min_size=1, max_size=20),
    ins=st.lists(tensors, max_size=4),
    outs=st.lists(tensors, max_size=3),
    attrs=attrs,
)
def test_operator_descriptions_match_construct(op_type, ins, outs, attrs):
    expected = wire.OpDescription.build(
        {
            "op_type": op_type,
            "inputs": [{"dtype": d, "format": f, "dims": dims} for d, f, dims in ins],
            "outputs": [{"dtype": d, "format": f, "dims": dims} for d, f, dims in outs],
            "attrs": [{"name": n, "kind": k, "value": v} for n, (k, v) in attrs.items()],
        }
    )
    assert codec.op_description(op_type, ins, outs, attrs) == expected


def test_handshake_reply_parses_what_the_daemon_builds():
    payload = wire.COMMANDS[wire.Op.HELLO].reply.build(
        {"version": 1, "total_memory": 64 << 30, "name": "davinci3", "chip": "910B2"}
    )
    assert codec.hello_reply(payload) == (1, 64 << 30, "davinci3", "910B2")
