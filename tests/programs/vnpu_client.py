"""A client that answers one line per command, for tests that change its virtual NPU under it.

Usage: python vnpu_client.py DEVICE_ID NBYTES. Sets the device, holds NBYTES of device memory filled with a
pattern and prints "ready". Then, per line on stdin: `meminfo` prints "FREE TOTAL" (acl.rt.get_mem_info, HBM);
`check` reads the memory back and prints "intact" (or "CHANGED"), or "error CODE MESSAGE" if a call failed;
`quit` ends. Standard library only.
"""

import sys

import acl

ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST, ACL_HBM_MEM = 1, 2, 1


def main():
    device_id, size = int(sys.argv[1]), int(sys.argv[2])
    acl.init()
    assert acl.rt.set_device(device_id) == 0, acl.get_recent_err_msg()
    ptr, ret = acl.rt.malloc(size, 0)
    assert ret == 0, acl.get_recent_err_msg()
    pattern = bytes(i % 251 for i in range(size))
    assert acl.rt.memcpy(ptr, size, acl.util.bytes_to_ptr(pattern), size, ACL_MEMCPY_HOST_TO_DEVICE) == 0
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "meminfo":
            free, total, ret = acl.rt.get_mem_info(ACL_HBM_MEM)
            print(f"{free} {total}" if ret == 0 else f"error {ret} {acl.get_recent_err_msg()}", flush=True)
        elif command == "check":
            back = bytearray(size)
            ret = acl.rt.memcpy(acl.util.bytes_to_ptr(back), size, ptr, size, ACL_MEMCPY_DEVICE_TO_HOST)
            if ret != 0:
                print(f"error {ret} {acl.get_recent_err_msg()}", flush=True)
            else:
                print("intact" if back == pattern else "CHANGED", flush=True)
        elif command == "quit":
            return


if __name__ == "__main__":
    main()
