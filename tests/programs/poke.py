"""Tries to read, overwrite and free a device pointer this process does not own (the isolation tests).

Usage: python poke.py DEVICE_ID PTR. Prints one JSON line: each attempt's return code and error message.
"""

import json
import sys

import numpy as np

import acl

ACL_MEMCPY_DEVICE_TO_HOST = 2


def main():
    device_id, ptr = int(sys.argv[1]), int(sys.argv[2])
    acl.init()
    acl.rt.set_device(device_id)
    host = np.zeros(64, dtype=np.uint8)
    result = {}
    attempts = {
        "read": lambda: acl.rt.memcpy(acl.util.numpy_to_ptr(host), 64, ptr, 64, ACL_MEMCPY_DEVICE_TO_HOST),
        "write": lambda: acl.rt.memset(ptr, 64, 0, 64),
        "free": lambda: acl.rt.free(ptr),
    }
    for name, attempt in attempts.items():
        ret = attempt()
        result[name] = {"ret": ret, "message": acl.get_recent_err_msg() if ret else ""}
    acl.rt.reset_device(device_id)
    acl.finalize()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
