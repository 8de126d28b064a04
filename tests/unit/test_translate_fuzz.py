"""Random well-framed records against a real translator: whatever a client sends, every record gets an AscendCL
answer (or a stream failure), never an internal error, and the session still works afterwards."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from translator_client import Client

from interposer import config, wire
from interposer.wire import COMMANDS, Op
from npu.errors import AclError

SMALL = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "chip": "910B2", "mode": "numeric"}],
        "virtual": [{"name": "davinci0", "physical": "npu0", "memory": "64MiB"}],
    }
)
HELLO = COMMANDS[Op.HELLO]
OPS = [op for op in COMMANDS if op not in (Op.HELLO, Op.VERSION)]
CRASHES = (AclError.INTERNAL_ERROR, AclError.RT_AICORE_EXCEPTION)  # what an unforeseen exception becomes


@st.composite
def value(draw, client: Client, name: str):
    if name == "key":  # an IPC memory key: garbage, or well-formed but never exported
        return draw(st.binary(min_size=64, max_size=64) | st.just(b"0" * 64))
    if name in ("stream", "event", "handle", "start", "end", "graph", "limits"):
        return draw(st.sampled_from(client.handles) | st.integers(0, 2**64 - 1))
    if name in ("ptr", "dst", "src"):
        base = draw(st.sampled_from(client.pointers)) if client.pointers else 0
        return draw(st.sampled_from([base, base + 8, base + 4096]) | st.integers(0, 2**64 - 1))
    if name in ("size", "count"):
        return draw(st.sampled_from([0, 1, 31, 64, 4096, 1 << 20]) | st.integers(0, 2**40))
    if name == "value":
        return draw(st.integers(0, 300))
    return draw(st.integers(0, 8))


def description(draw) -> bytes:
    tensor = st.fixed_dictionaries(
        {"dtype": st.sampled_from([0, 1, 3, 27, 99]), "format": st.sampled_from([2, 29]),
         "dims": st.lists(st.integers(0, 8), max_size=3)}
    )  # fmt: skip
    attr = st.fixed_dictionaries(
        {"name": st.sampled_from(["axes", "dim", "num_heads", "transpose_x1", "dst_type"]), "kind": st.just(0),
         "value": st.integers(-3, 3)}
    )  # fmt: skip
    return wire.OpDescription.build(
        {
            "op_type": draw(st.sampled_from(["Add", "MatMulV2", "SoftmaxV2", "SwiGlu", "Cast", "Nope"])),
            "inputs": draw(st.lists(tensor, max_size=3)),
            "outputs": draw(st.lists(tensor, max_size=2)),
            "attrs": draw(st.lists(attr, max_size=2)),
        }
    )


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_records_get_answers_never_internal_errors(data):
    client = Client(config.build(SMALL, driver="sync").virtual[0])
    for _ in range(25):
        op = data.draw(st.sampled_from(OPS))
        command = COMMANDS[op]
        args = {n: data.draw(value(client, n)) for n in command.request.names}
        payload = b""
        if op is Op.OP_TEMPLATE:
            payload = description(data.draw)
        elif op is Op.OP_LAUNCH:
            payload = b"".join(
                p.to_bytes(8, "little")
                for p in data.draw(st.lists(st.sampled_from(client.pointers or [0]), max_size=3))
            )
            args["count"] = data.draw(st.sampled_from([len(payload) // 8, 5]))
        elif command.bulk:
            payload = bytes(data.draw(st.integers(0, 64)))
        for reply in client.send(op, payload, **args):
            assert reply.status not in CRASHES, bytes(reply.payload)
    # Whatever happened, a synchronisation answers (reporting any asynchronous failure, none of them a crash)
    # and the session can still allocate.
    for reply in client.send(Op.DEVICE_SYNC):
        assert reply.status not in CRASHES, bytes(reply.payload)
    (reply,) = client.send(Op.MALLOC, size=64, policy=0)
    assert reply.status in (AclError.SUCCESS, AclError.RT_MEMORY_ALLOCATION)
    client.translator.close()
