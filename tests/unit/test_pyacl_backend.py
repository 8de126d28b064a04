"""The `pyacl` backend (npu/pyacl/device.py) forwarding to a vendor pyACL module. The vendor here is this
project's own shim in direct mode — an emulated 910B2 behind `import acl` — so every forwarded call runs for real:
memory, copies, operators with their attributes, and the core limits the policy chose."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from interposer.shim.flexnpu_client.runtime import Runtime
from interposer.wire import AttrKind, Op

ACL_FLOAT16, ACL_FORMAT_ND, CUBE_CORE = 1, 2, 0

CONFIG = """
[daemon]
time_scale = 1.0
[[physical]]
name = "npu0"
backend = "pyacl"
chip = "910B2"
[[virtual]]
name = "davinci0"
physical = "npu0"
memory = "1GiB"
"""


@pytest.fixture
def vendor(direct_acl):
    """The vendor's `acl`: the shim in direct mode, an emulated 910B2 behind it. The backend opens its device;
    it is closed after the backend's own session (fixtures end in reverse order)."""
    yield direct_acl
    assert direct_acl.rt.reset_device(0) == 0
    assert direct_acl.finalize() == 0


@pytest.fixture
def runtime(vendor, direct_runtime):
    return direct_runtime(CONFIG)


def host_bytes(runtime: Runtime, size: int, data: bytes = b"") -> memoryview:
    """Host memory from malloc_host, as a writable view (its address: host_address)."""
    view = memoryview((ctypes.c_char * size).from_address(runtime.malloc_host(size))).cast("B")
    view[: len(data)] = data
    return view


def host_address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_an_operator_runs_on_the_vendors_device_with_the_policys_core_limit(runtime, vendor):
    x = np.arange(16, dtype=np.float16).reshape(4, 4)
    y = np.eye(4, dtype=np.float16)[::-1] * 2
    a, b, out = (runtime.malloc(32, 0) for _ in range(3))
    for ptr, array in ((a, x), (b, y)):
        runtime.memcpy(ptr, 32, host_address(host_bytes(runtime, 32, array.tobytes())), 32, 1)
    stream = runtime.create(Op.STREAM_CREATE, priority=0, flag=0)
    runtime.call(Op.STREAM_LIMIT_SET, stream, stream=stream, kind=CUBE_CORE, value=6)
    ins = [(ACL_FLOAT16, ACL_FORMAT_ND, (4, 4), ptr) for ptr in (a, b)]
    outs = [(ACL_FLOAT16, ACL_FORMAT_ND, (4, 4), out)]
    runtime.launch("MatMulV2", ins, outs, {"transpose_x2": (AttrKind.BOOL, True)}, stream)
    runtime.call(Op.STREAM_SYNC, stream, handle=stream)

    npu = runtime._direct_topology()._vdevs["davinci0"].physical.npu
    assert type(npu).__name__ == "PyaclNPU"
    (vendor_stream,) = npu.streams  # back in the pool: the vendor stream the kernel ran on
    # The stream's own limit reached the vendor as the limit of the stream the kernel ran on.
    assert vendor.rt.get_stream_res_limit(vendor_stream, CUBE_CORE) == (6, 0)
    assert npu.memory.used > 0  # the allocations are the vendor's

    back = host_bytes(runtime, 32)
    runtime.memcpy(host_address(back), 32, out, 32, 2)
    np.testing.assert_array_equal(np.frombuffer(back, dtype=np.float16).reshape(4, 4), x @ y.T)
