"""A pyACL program written against the real pyACL API: bytes through device memory and back.

Usage: python roundtrip.py [DEVICE_ID] [NBYTES]. Exits 0 and prints "roundtrip ok" when every byte returns.
"""

import sys

import numpy as np

import acl

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_DEVICE_TO_DEVICE = 1, 2, 3


def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")


def main():
    device_id = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
    check(acl.init(), "init")
    check(acl.rt.set_device(device_id), "set_device")
    context, ret = acl.rt.create_context(device_id)
    check(ret, "create_context")
    stream, ret = acl.rt.create_stream()
    check(ret, "create_stream")

    host = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    dev_a, ret = acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
    check(ret, "malloc a")
    dev_b, ret = acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
    check(ret, "malloc b")
    check(acl.rt.memcpy(dev_a, size, acl.util.numpy_to_ptr(host), size, ACL_MEMCPY_HOST_TO_DEVICE), "memcpy h2d")
    check(acl.rt.memset(dev_b, size, 0xAB, size), "memset")
    half = size // 2
    check(acl.rt.memcpy_async(dev_b, size, dev_a, half, ACL_MEMCPY_DEVICE_TO_DEVICE, stream), "memcpy_async d2d")
    check(acl.rt.synchronize_stream(stream), "synchronize_stream")

    out_host, ret = acl.rt.malloc_host(size)
    check(ret, "malloc_host")
    check(acl.rt.memcpy(out_host, size, dev_b, size, ACL_MEMCPY_DEVICE_TO_HOST), "memcpy d2h")
    out = acl.util.ptr_to_numpy(out_host, (size,), 2).copy()
    expected = np.concatenate([host[:half], np.full(size - half, 0xAB, dtype=np.uint8)])
    if not np.array_equal(out, expected):
        sys.exit(f"bytes differ at {np.flatnonzero(out != expected)[:8].tolist()}")

    check(acl.rt.free_host(out_host), "free_host")
    check(acl.rt.free(dev_a), "free a")
    check(acl.rt.free(dev_b), "free b")
    check(acl.rt.destroy_stream(stream), "destroy_stream")
    check(acl.rt.destroy_context(context), "destroy_context")
    check(acl.rt.reset_device(device_id), "reset_device")
    check(acl.finalize(), "finalize")
    print("roundtrip ok")


if __name__ == "__main__":
    main()
