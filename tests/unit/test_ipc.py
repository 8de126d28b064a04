"""IPC memory between processes (interposer/ipc.py through the translator), sans-IO: two sessions with their
own pids on two virtual NPUs of one physical NPU, as a prefill process hands its KV cache to a decode process.
Semantics from the CANN docs of aclrtIpcMemGetExportKey / SetImportPid / ImportByKey / Close."""

from __future__ import annotations

import struct

import pytest
from translator_client import Client

from interposer import config
from interposer.wire import Op
from npu.errors import AclError

TOPOLOGY = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "mode": "numeric"}, {"name": "npu1", "mode": "numeric"}],
        "virtual": [
            {"name": "davinci0", "physical": "npu0", "memory": "1MiB"},
            {"name": "davinci1", "physical": "npu0", "memory": "1MiB"},
            {"name": "davinci2", "physical": "npu1", "memory": "1MiB"},
        ],
    }
)
PREFILL_PID, DECODE_PID = 100, 200


@pytest.fixture
def vdevs():
    return config.build(TOPOLOGY, driver="sync").virtual


@pytest.fixture
def prefill(vdevs):
    return Client(vdevs[0], PREFILL_PID)


@pytest.fixture
def decode(vdevs):
    return Client(vdevs[1], DECODE_PID)


def ok(result):
    status, fields = result
    assert status == AclError.SUCCESS, fields
    return fields


def write(client: Client, ptr: int, data: bytes) -> None:
    ok(client.call(Op.MEMCPY_H2D, data, dst=ptr, src=0, count=len(data)))


def read(client: Client, ptr: int, n: int) -> bytes:
    (reply,) = client.send(Op.MEMCPY_D2H, dst=0, src=ptr, count=n)
    assert reply.status == AclError.SUCCESS
    return bytes(reply.payload)


def export(client: Client, size: int = 4096, flags: int = 0) -> tuple[int, bytes]:
    ptr = ok(client.call(Op.MALLOC, size=size, policy=0)).ptr
    return ptr, ok(client.call(Op.IPC_EXPORT, ptr=ptr, size=size, flags=flags)).key


def allow(client: Client, key: bytes, *pids: int):
    return client.call(Op.IPC_ALLOW, struct.pack(f"<{len(pids)}i", *pids), key=key)


def test_an_allowed_process_imports_the_same_bytes_without_a_copy(prefill, decode):
    ptr, key = export(prefill)
    assert len(key) == 64
    ok(allow(prefill, key, DECODE_PID))
    imported = ok(decode.call(Op.IPC_IMPORT, key=key, flags=0)).ptr
    write(prefill, ptr, b"kv cache" * 8)
    assert read(decode, imported, 64) == b"kv cache" * 8  # the decode process sees the prefill's writes
    write(decode, imported + 8, b"DECODED!")
    assert read(prefill, ptr + 8, 8) == b"DECODED!"  # and the other way round: one physical buffer
    assert decode.translator.vdev.used == 0  # the exporter's quota pays for it, not the importer's


def test_a_process_not_on_the_allow_list_gets_no_permission(prefill, decode):
    _, key = export(prefill)
    ok(allow(prefill, key, 999))
    status, message = decode.call(Op.IPC_IMPORT, key=key, flags=0)
    assert status == AclError.RT_NO_PERMISSION
    assert "pid 200 is not on" in message and "device_get_bare_tgid" in message


def test_without_pid_validation_anyone_on_the_chip_imports(prefill, decode):
    _, key = export(prefill, flags=1)  # ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION
    ok(decode.call(Op.IPC_IMPORT, key=key, flags=0))
    status, message = allow(prefill, key, DECODE_PID)
    assert status == AclError.INVALID_PARAM and "pid validation disabled" in message


def test_a_closed_or_freed_export_cannot_be_imported(prefill, decode):
    _, closed = export(prefill, flags=1)
    ok(prefill.call(Op.IPC_CLOSE, key=closed))
    assert decode.call(Op.IPC_IMPORT, key=closed, flags=0)[0] == AclError.INVALID_PARAM

    ptr, freed = export(prefill, flags=1)
    ok(prefill.call(Op.FREE, ptr=ptr))
    assert decode.call(Op.IPC_IMPORT, key=freed, flags=0)[0] == AclError.INVALID_PARAM


def test_imported_memory_cannot_be_freed_until_the_importer_closes(prefill, decode):
    ptr, key = export(prefill, flags=1)
    imported = ok(decode.call(Op.IPC_IMPORT, key=key, flags=0)).ptr
    status, message = prefill.call(Op.FREE, ptr=ptr)
    assert status == AclError.RT_MEMORY_FREE and "ipc_mem_close" in message
    status, message = decode.call(Op.FREE, ptr=imported)
    assert status == AclError.INVALID_PARAM and "ipc_mem_close" in message
    ok(decode.call(Op.IPC_CLOSE, key=key))
    assert decode.call(Op.MEMCPY_D2H, dst=0, src=imported, count=8)[0] == AclError.INVALID_PARAM  # unmapped
    ok(prefill.call(Op.IPC_CLOSE, key=key))
    ok(prefill.call(Op.FREE, ptr=ptr))
    assert prefill.translator.vdev.physical.npu.memory.used == 0


def test_a_killed_importer_lets_go_and_the_exporter_keeps_its_memory(prefill, decode):
    ptr, key = export(prefill, flags=1)
    ok(decode.call(Op.IPC_IMPORT, key=key, flags=0))
    decode.translator.close()  # kill -9: the session ends
    write(prefill, ptr, b"still mine")
    assert read(prefill, ptr, 10) == b"still mine"
    ok(prefill.call(Op.FREE, ptr=ptr))  # nobody imports it any more


def test_a_killed_exporters_memory_lives_until_its_importers_close_and_its_quota_pays_until_then(
    prefill, decode, vdevs
):
    ptr, key = export(prefill, flags=1)
    write(prefill, ptr, b"handed over")
    imported = ok(decode.call(Op.IPC_IMPORT, key=key, flags=0)).ptr
    memory = prefill.translator.vdev.physical.npu.memory
    prefill.translator.close()
    assert read(decode, imported, 11) == b"handed over"  # the bytes live on
    assert vdevs[0].used == 4096 + 32  # and the exporter's virtual NPU still pays for them (as malloc rounds)
    assert decode.translator.vdev.used == 0  # not the importer's
    ok(decode.call(Op.IPC_CLOSE, key=key))
    assert memory.used == 0
    assert vdevs[0].used == 0  # paid until the last holder let go


def test_memory_exported_and_left_imported_cannot_take_a_session_past_its_quota(vdevs):
    """Export, let an importer hold it, close, open a new session, repeat: the quota holds every round."""
    quota = vdevs[0].quota
    importer = Client(vdevs[1], DECODE_PID)
    for _ in range(3):
        owner = Client(vdevs[0], PREFILL_PID)
        status, _ = owner.call(Op.MALLOC, size=quota // 2, policy=0)
        if status != AclError.SUCCESS:
            assert status == AclError.RT_MEMORY_ALLOCATION
            break
        ptr = owner.pointers[-1]
        key = ok(owner.call(Op.IPC_EXPORT, ptr=ptr, size=quota // 2, flags=1)).key
        ok(importer.call(Op.IPC_IMPORT, key=key, flags=0))
        owner.translator.close()
        assert vdevs[0].used <= quota
    else:
        pytest.fail("three half-quota allocations fitted a quota with the first two still imported")
    assert vdevs[0].used <= quota
    importer.translator.close()
    assert vdevs[0].used == 0 and vdevs[0].physical.npu.memory.used == 0


@pytest.mark.parametrize("first", ["importer", "exporter"])
def test_memory_imported_across_chips_goes_back_to_its_own_chip(prefill, vdevs, first):
    """Exported on npu0, imported with peer access on npu1: whoever closes first, npu0 gets its bytes back and
    npu1 never counts them (the importer's unmap used to free them on its own chip: npu0 +n, npu1 -n for ever)."""
    from interposer.topology import Topology

    size = 1 << 16
    ptr = ok(prefill.call(Op.MALLOC, size=size, policy=0)).ptr
    key = ok(prefill.call(Op.IPC_EXPORT, ptr=ptr, size=size, flags=1)).key
    elsewhere = Client(vdevs[2], DECODE_PID)  # davinci2 is on npu1
    ok(elsewhere.call(Op.IPC_IMPORT, key=key, flags=1))
    npu0, npu1 = vdevs[0].physical.npu.memory, vdevs[2].physical.npu.memory
    assert (npu0.used, npu1.used) == (size + 32, 0)
    order = [elsewhere, prefill] if first == "importer" else [prefill, elsewhere]
    for client in order:
        client.translator.close()
    assert (npu0.used, npu1.used) == (0, 0)
    assert (vdevs[0].used, vdevs[2].used) == (0, 0)
    status = Topology([vdevs[0].physical, vdevs[2].physical], vdevs, 0.0).status()
    assert [p["memory_used"] for p in status["physical"]] == [0, 0]
    assert [v["memory_used"] for v in status["virtual"]] == [0, 0, 0]


def test_a_process_holds_a_bounded_number_of_ipc_keys(prefill, decode, monkeypatch):
    from interposer import limits

    monkeypatch.setattr(limits, "IPC_KEYS", 3)
    keys = [export(prefill, size=64, flags=1)[1] for _ in range(3)]
    ptr = ok(prefill.call(Op.MALLOC, size=64, policy=0)).ptr
    status, message = prefill.call(Op.IPC_EXPORT, ptr=ptr, size=64, flags=1)
    assert status == AclError.RT_OVER_LIMIT and "holds 3 IPC memory keys" in message and "ipc_mem_close" in message
    for key in keys[:2]:
        ok(decode.call(Op.IPC_IMPORT, key=key, flags=0))
    ok(prefill.call(Op.IPC_CLOSE, key=keys[2]))  # nobody imports it: gone, and its room with it
    ok(prefill.call(Op.IPC_EXPORT, ptr=ptr, size=64, flags=1))
    assert prefill.translator.vdev.ipc.held(decode.translator) == 2
    decode.translator.close()
    prefill.translator.close()
    assert prefill.translator.vdev.ipc.exports == {}


def test_bad_keys_and_strangers_are_refused(prefill, decode):
    _, key = export(prefill, flags=1)
    assert decode.call(Op.IPC_IMPORT, key=b"\xff" * 64, flags=0)[0] == AclError.INVALID_PARAM
    assert decode.call(Op.IPC_IMPORT, key=b"0" * 64, flags=0)[0] == AclError.INVALID_PARAM
    assert decode.call(Op.IPC_CLOSE, key=key)[0] == AclError.INVALID_PARAM  # neither exported nor imported it
    assert allow(decode, key, DECODE_PID)[0] == AclError.INVALID_PARAM  # only the exporter sets the list


def test_bare_tgid_is_the_pid_the_daemon_checks(decode):
    assert ok(decode.call(Op.BARE_TGID)).pid == DECODE_PID
