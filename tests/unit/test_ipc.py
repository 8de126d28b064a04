"""IPC memory between processes (interposer/ipc.py through the translator), sans-IO: two sessions with their
own pids on two virtual NPUs of one physical NPU, as a prefill process hands its KV cache to a decode process.
Semantics from the CANN docs of aclrtIpcMemGetExportKey / SetImportPid / ImportByKey / Close."""

from __future__ import annotations

import struct

import pytest
from translator_client import Client

from interposer.wire import Op
from npu.errors import AclError
from vdevfs import config

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


def test_a_killed_exporters_memory_lives_until_its_importers_close(prefill, decode):
    ptr, key = export(prefill, flags=1)
    write(prefill, ptr, b"handed over")
    imported = ok(decode.call(Op.IPC_IMPORT, key=key, flags=0)).ptr
    memory = prefill.translator.vdev.physical.npu.memory
    prefill.translator.close()
    assert prefill.translator.vdev.used == 0  # the exporter's quota is given back with its session
    assert read(decode, imported, 11) == b"handed over"  # the bytes are not
    ok(decode.call(Op.IPC_CLOSE, key=key))
    assert memory.used == 0


def test_another_chips_memory_is_imported_with_peer_access_and_only_copied(prefill, vdevs):
    ptr, key = export(prefill, flags=1)
    write(prefill, ptr, b"prefilled KV")
    elsewhere = Client(vdevs[2], DECODE_PID)  # davinci2 is on npu1
    status, message = elsewhere.call(Op.IPC_IMPORT, key=key, flags=0)
    assert status == AclError.FEATURE_UNSUPPORTED and "ENABLE_PEER_ACCESS" in message
    remote = ok(elsewhere.call(Op.IPC_IMPORT, key=key, flags=1)).ptr
    status, message = elsewhere.call(Op.MEMCPY_D2H, dst=0, src=remote, count=8)
    assert status == AclError.INVALID_PARAM and "copied device to device" in message
    local = ok(elsewhere.call(Op.MALLOC, size=4096, policy=0)).ptr
    engine = elsewhere.translator.runner.engine
    before = engine.t
    ok(elsewhere.call(Op.MEMCPY_D2D, dst=local, src=remote, count=4096))
    # The copy crossed the interconnect: 4 KiB at the 910B2's 56 GB/s HCCS link, plus the copy's launch.
    assert engine.t - before == pytest.approx(3e-6 + 4096 / 56e9)
    assert read(elsewhere, local, 12) == b"prefilled KV"


def test_bad_keys_and_strangers_are_refused(prefill, decode):
    _, key = export(prefill, flags=1)
    assert decode.call(Op.IPC_IMPORT, key=b"\xff" * 64, flags=0)[0] == AclError.INVALID_PARAM
    assert decode.call(Op.IPC_IMPORT, key=b"0" * 64, flags=0)[0] == AclError.INVALID_PARAM
    assert decode.call(Op.IPC_CLOSE, key=key)[0] == AclError.INVALID_PARAM  # neither exported nor imported it
    assert allow(decode, key, DECODE_PID)[0] == AclError.INVALID_PARAM  # only the exporter sets the list


def test_bare_tgid_is_the_pid_the_daemon_checks(decode):
    assert ok(decode.call(Op.BARE_TGID)).pid == DECODE_PID
