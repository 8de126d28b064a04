"""Device memory (interposer/translate/memory.py), sans-IO: malloc within the virtual NPU's quota as the device
rounds it, get_mem_info as the quota sees it, pointers that are only their session's, and everything given
back when a session closes."""

from __future__ import annotations

import pytest
from translator_client import Client

from interposer import config
from interposer.wire import Op
from npu.errors import AclError
from npu.memory import rounded_size

QUOTA = 1 << 20
TOPOLOGY = config.parse(
    {
        "daemon": {"time_scale": 0},
        "physical": [{"name": "npu0", "chip": "910B2", "mode": "numeric"}],
        "virtual": [{"name": "davinci0", "physical": "npu0", "memory": "1MiB"}],
    }
)
HBM, DDR = 1, 0  # aclrtMemAttr


@pytest.fixture
def vdev():
    return config.build(TOPOLOGY, driver="sync").virtual[0]


@pytest.fixture
def client(vdev):
    return Client(vdev)


def test_malloc_takes_the_rounded_size_from_the_quota_and_free_gives_it_back(client):
    ptr = client.ok(Op.MALLOC, size=100, policy=0).ptr
    info = client.ok(Op.MEM_INFO, attr=HBM)
    assert (info.free, info.total) == (QUOTA - rounded_size(100), QUOTA)
    assert client.translator.status()["memory_used"] == rounded_size(100)
    client.ok(Op.FREE, ptr=ptr)
    assert client.ok(Op.MEM_INFO, attr=HBM).free == QUOTA
    info = client.ok(Op.MEM_INFO, attr=DDR)
    assert (info.free, info.total) == (0, 0)  # the emulated chip has no device-side DDR
    assert client.call(Op.MEM_INFO, attr=2)[0] == AclError.INVALID_PARAM


def test_malloc_past_the_quota_names_the_virtual_npu_and_what_is_free(client):
    client.ok(Op.MALLOC, size=QUOTA // 2, policy=0)
    status, message = client.call(Op.MALLOC, size=QUOTA, policy=0)
    assert status == AclError.RT_MEMORY_ALLOCATION
    free = QUOTA - rounded_size(QUOTA // 2)
    assert message.startswith(f"davinci0: out of memory: malloc({QUOTA}) needs {rounded_size(QUOTA)} bytes, {free} of")
    assert "raise the quota" in message


@pytest.mark.parametrize(
    ("size", "policy", "code", "says"),
    [
        (64, 6, AclError.RT_INVALID_MALLOC_TYPE, "malloc policy 6 is not an aclrtMemMallocPolicy (0-5)"),
        (0, 0, AclError.INVALID_PARAM, "malloc size must be > 0, got 0"),
    ],
)
def test_a_bad_malloc_is_refused_and_takes_nothing(client, size, policy, code, says):
    assert client.call(Op.MALLOC, size=size, policy=policy) == (code, says)
    assert client.ok(Op.MEM_INFO, attr=HBM).free == QUOTA


def test_a_pointer_is_only_its_sessions(vdev, client):
    ptr = client.ok(Op.MALLOC, size=64, policy=0).ptr
    other = Client(vdev, pid=2)
    status, message = other.call(Op.MEMSET, ptr=ptr, value=0, count=64)
    assert status == AclError.INVALID_PARAM and message.startswith(f"memset ptr 0x{ptr:x}: belongs to another session")
    assert other.call(Op.FREE, ptr=ptr)[0] == AclError.INVALID_PARAM
    client.ok(Op.FREE, ptr=ptr)
    status, message = client.call(Op.FREE, ptr=ptr)
    assert status == AclError.RT_MEMORY_FREE and "double free" in message


def test_a_closed_session_gives_its_memory_back_to_the_quota_and_the_chip(vdev, client):
    chip = vdev.physical.npu.memory
    before = chip.used
    for _ in range(3):
        client.ok(Op.MALLOC, size=4096, policy=0)
    assert vdev.used == 3 * rounded_size(4096)
    client.translator.close()
    assert vdev.used == 0 and chip.used == before
