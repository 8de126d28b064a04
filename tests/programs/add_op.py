"""The pyACL single-operator sample pattern: two int32 8x16 tensors, "Add" through execute_v2.

Usage: python add_op.py [DEVICE_ID]. Prints "add ok" when every sum is exact.
"""

import sys
import tempfile

import numpy as np

import acl

ACL_INT32, ACL_FORMAT_ND = 3, 2
ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST = 1, 2


def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")


def main():
    device_id = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    check(acl.init(), "init")
    check(acl.rt.set_device(device_id), "set_device")
    context, ret = acl.rt.create_context(device_id)
    check(ret, "create_context")
    stream, ret = acl.rt.create_stream()
    check(ret, "create_stream")
    models = tempfile.TemporaryDirectory()  # where the sample's compiled *.om operators would be
    check(acl.op.set_model_dir(models.name), "set_model_dir")

    shape = [8, 16]
    x1 = np.random.default_rng(0).integers(-1000, 1000, shape, dtype=np.int32)
    x2 = np.random.default_rng(1).integers(-1000, 1000, shape, dtype=np.int32)
    size = x1.nbytes
    descs, buffers, pointers = [], [], []
    for host in (x1, x2, None):
        ptr, ret = acl.rt.malloc(size, 0)
        check(ret, "malloc")
        if host is not None:
            check(acl.rt.memcpy(ptr, size, acl.util.numpy_to_ptr(host), size, ACL_MEMCPY_HOST_TO_DEVICE), "h2d")
        descs.append(acl.create_tensor_desc(ACL_INT32, shape, ACL_FORMAT_ND))
        buffers.append(acl.create_data_buffer(ptr, size))
        pointers.append(ptr)

    attr = acl.op.create_attr()
    ret = acl.op.execute_v2("Add", descs[:2], buffers[:2], descs[2:], buffers[2:], attr, stream)
    check(ret, "execute_v2")
    check(acl.rt.synchronize_stream(stream), "synchronize_stream")

    out = np.zeros(shape, dtype=np.int32)
    check(acl.rt.memcpy(acl.util.numpy_to_ptr(out), size, pointers[2], size, ACL_MEMCPY_DEVICE_TO_HOST), "d2h")
    if not np.array_equal(out, x1 + x2):
        sys.exit(f"wrong sums:\n{out - (x1 + x2)}")

    acl.op.destroy_attr(attr)
    for desc, buf, ptr in zip(descs, buffers, pointers, strict=True):
        acl.destroy_data_buffer(buf)
        acl.destroy_tensor_desc(desc)
        check(acl.rt.free(ptr), "free")
    check(acl.rt.destroy_stream(stream), "destroy_stream")
    check(acl.rt.destroy_context(context), "destroy_context")
    check(acl.rt.reset_device(device_id), "reset_device")
    check(acl.finalize(), "finalize")
    print("add ok")


if __name__ == "__main__":
    main()
