"""Holds device memory filled with a pattern until told to check it: one side of the isolation tests.

Usage: python hold.py DEVICE_ID NBYTES. Prints one JSON line {"ptr", "pid", "devices"} when ready, then waits
for a line on stdin, reads the memory back and prints "intact" if every byte is as written. Standard library
only: the container test runs it in a bare `python3 -I` with nothing but the shim on its path.
"""

import json
import os
import sys

import acl

ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST = 1, 2


def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")


def main():
    device_id, size = int(sys.argv[1]), int(sys.argv[2])
    check(acl.init(), "init")
    check(acl.rt.set_device(device_id), "set_device")
    count, ret = acl.rt.get_device_count()
    check(ret, "get_device_count")
    ptr, ret = acl.rt.malloc(size, 0)
    check(ret, "malloc")
    pattern = bytes(i % 251 for i in range(size))
    check(acl.rt.memcpy(ptr, size, acl.util.bytes_to_ptr(pattern), size, ACL_MEMCPY_HOST_TO_DEVICE), "h2d")
    print(json.dumps({"ptr": ptr, "pid": os.getpid(), "devices": count}), flush=True)
    sys.stdin.readline()
    back = bytearray(size)
    check(acl.rt.memcpy(acl.util.bytes_to_ptr(back), size, ptr, size, ACL_MEMCPY_DEVICE_TO_HOST), "d2h")
    print("intact" if back == pattern else "CHANGED", flush=True)
    check(acl.rt.free(ptr), "free")
    check(acl.rt.reset_device(device_id), "reset_device")
    check(acl.finalize(), "finalize")


if __name__ == "__main__":
    main()
