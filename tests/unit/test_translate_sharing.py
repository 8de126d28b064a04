"""IPC memory, the session's side (interposer/translate/sharing.py), sans-IO: what an export and an allow-list
accept, and memory imported from another chip, which only device-to-device copies may touch. The registry's
rules (who may import, who pays) are in test_ipc.py."""

from __future__ import annotations

import struct

import pytest
from translator_client import Client

from interposer import config
from interposer.wire import Op
from npu.errors import AclError
from npu.memory import rounded_size

TOPOLOGY = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "mode": "numeric"}, {"name": "npu1", "mode": "numeric"}],
        "virtual": [
            {"name": "davinci0", "physical": "npu0", "memory": "1MiB"},
            {"name": "davinci1", "physical": "npu1", "memory": "1MiB"},
        ],
    }
)
KV = bytes(range(256)) * 4
IMPORT_ENABLE_PEER_ACCESS = 1


@pytest.fixture
def vdevs():
    return config.build(TOPOLOGY, driver="sync").virtual


@pytest.fixture
def exporter(vdevs):
    return Client(vdevs[0], 100)


def test_an_export_names_what_it_refuses(exporter):
    ptr = exporter.ok(Op.MALLOC, size=len(KV), policy=0).ptr
    status, message = exporter.call(Op.IPC_EXPORT, ptr=ptr, size=len(KV) + 1, flags=0)
    assert status == AclError.INVALID_PARAM and message.startswith("ipc_mem_get_export_key dev_ptr")
    status, message = exporter.call(Op.IPC_EXPORT, ptr=ptr, size=len(KV), flags=2)
    assert status == AclError.INVALID_PARAM and "flags 2" in message
    key = exporter.ok(Op.IPC_EXPORT, ptr=ptr, size=len(KV), flags=0).key
    status, message = exporter.call(Op.IPC_ALLOW, b"\x01\x02\x03", key=key)
    assert status == AclError.INVALID_PARAM
    assert message == "ipc_mem_set_import_pid: 3 bytes of pids is not a whole number of int32s"
    exporter.ok(Op.IPC_ALLOW, struct.pack("<2i", 200, 300), key=key)
    assert exporter.translator.vdev.ipc.held(exporter.translator) == 1


def test_memory_from_another_chip_is_copied_device_to_device_and_touched_no_other_way(vdevs, exporter):
    ptr = exporter.ok(Op.MALLOC, size=len(KV), policy=0).ptr
    exporter.ok(Op.MEMCPY_H2D, KV, dst=ptr, src=0, count=len(KV))
    key = exporter.ok(Op.IPC_EXPORT, ptr=ptr, size=len(KV), flags=1).key
    importer = Client(vdevs[1], 200)
    status, message = importer.call(Op.IPC_IMPORT, key=key, flags=0)
    assert status == AclError.FEATURE_UNSUPPORTED and "another physical NPU" in message
    remote = importer.ok(Op.IPC_IMPORT, key=key, flags=IMPORT_ENABLE_PEER_ACCESS).ptr
    local = importer.ok(Op.MALLOC, size=len(KV), policy=0).ptr
    importer.ok(Op.MEMCPY_D2D, dst=local, src=remote, count=len(KV))
    assert importer.read(local, len(KV)) == KV
    status, message = importer.call(Op.MEMSET, ptr=remote, value=0, count=1)
    assert status == AclError.INVALID_PARAM
    assert message == (
        f"memset ptr 0x{remote:x}: memory of another NPU (IPC memory imported with peer access) can only be "
        "copied device to device"
    )
    importer.ok(Op.IPC_CLOSE, key=key)
    assert importer.call(Op.MEMCPY_D2D, dst=local, src=remote, count=1)[0] == AclError.INVALID_PARAM
    assert importer.translator.status()["memory_used"] == rounded_size(len(KV))  # its own allocation only


def test_a_process_gives_its_peers_the_pid_the_allow_list_checks(vdevs, exporter):
    importer = Client(vdevs[1], 200)
    pid = importer.ok(Op.BARE_TGID).pid
    assert pid == 200
    ptr = exporter.ok(Op.MALLOC, size=64, policy=0).ptr
    key = exporter.ok(Op.IPC_EXPORT, ptr=ptr, size=64, flags=0).key
    assert importer.call(Op.IPC_IMPORT, key=key, flags=1)[0] == AclError.RT_NO_PERMISSION
    exporter.ok(Op.IPC_ALLOW, struct.pack("<i", pid), key=key)
    importer.ok(Op.IPC_IMPORT, key=key, flags=1)
