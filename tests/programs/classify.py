"""Image classification with an offline model, the way the public pyACL classification sample does it
(Ascend/samples python/level2_simple_inference/1_classification/resnet50_imagenet_classification: init,
device and context, load_from_file, the model description, one device buffer per input and output, datasets,
execute, get_cur_output_dims, the result copied back, top-5, and the teardown in reverse) — written here from its
call sequence, not copied.

Usage: python classify.py MODEL.om IMAGES.npy OUT.npy — runs the model on IMAGES (float32 NCHW), writes its first
output to OUT.npy and prints the top-5 class indices of each image as JSON.
"""

import json
import sys

import numpy as np

import acl

ACL_MEM_MALLOC_HUGE_FIRST, ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST = 0, 1, 2


def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")


def main():
    model_path, images_path, out_path = sys.argv[1:4]
    device = 0
    check(acl.init(), "init")
    check(acl.rt.set_device(device), "set_device")
    context, ret = acl.rt.create_context(device)
    check(ret, "create_context")
    model_id, ret = acl.mdl.load_from_file(model_path)
    check(ret, "load_from_file")
    desc = acl.mdl.create_desc()
    check(acl.mdl.get_desc(desc, model_id), "get_desc")

    def buffers(count, size_of):
        dataset, pointers = acl.mdl.create_dataset(), []
        for i in range(count):
            size = size_of(desc, i)
            ptr, ret = acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
            check(ret, "malloc")
            _, ret = acl.mdl.add_dataset_buffer(dataset, acl.create_data_buffer(ptr, size))
            check(ret, "add_dataset_buffer")
            pointers.append((ptr, size))
        return dataset, pointers

    inputs, in_ptrs = buffers(acl.mdl.get_num_inputs(desc), acl.mdl.get_input_size_by_index)
    outputs, out_ptrs = buffers(acl.mdl.get_num_outputs(desc), acl.mdl.get_output_size_by_index)

    images = np.ascontiguousarray(np.load(images_path), dtype=np.float32)
    data = images.tobytes()
    ptr, size = in_ptrs[0]
    check(acl.rt.memcpy(ptr, size, acl.util.bytes_to_ptr(data), len(data), ACL_MEMCPY_HOST_TO_DEVICE), "memcpy")
    gears, ret = acl.mdl.get_dynamic_batch(desc)
    check(ret, "get_dynamic_batch")
    if gears["batchCount"]:  # a model with batch gears: this batch's gear
        index, ret = acl.mdl.get_input_index_by_name(desc, "ascend_mbatch_shape_data")
        check(ret, "get_input_index_by_name")
        check(acl.mdl.set_dynamic_batch_size(model_id, inputs, index, images.shape[0]), "set_dynamic_batch_size")
    check(acl.mdl.execute(model_id, inputs, outputs), "execute")

    dims, ret = acl.mdl.get_cur_output_dims(desc, 0)
    check(ret, "get_cur_output_dims")
    ptr, size = out_ptrs[0]
    host, ret = acl.rt.malloc_host(size)
    check(ret, "malloc_host")
    check(acl.rt.memcpy(host, size, ptr, size, ACL_MEMCPY_DEVICE_TO_HOST), "memcpy")
    used = int(np.prod(dims["dims"])) * 4  # a batch gear uses the front of a buffer sized for the largest
    result = np.frombuffer(acl.util.ptr_to_bytes(host, used), dtype=np.float32).reshape(dims["dims"])
    np.save(out_path, result)
    print(json.dumps([row.argsort()[-1:-6:-1].tolist() for row in result.reshape(result.shape[0], -1)]))

    check(acl.rt.free_host(host), "free_host")
    for dataset in (inputs, outputs):
        for i in range(acl.mdl.get_dataset_num_buffers(dataset)):
            check(acl.destroy_data_buffer(acl.mdl.get_dataset_buffer(dataset, i)), "destroy_data_buffer")
        check(acl.mdl.destroy_dataset(dataset), "destroy_dataset")
    check(acl.mdl.unload(model_id), "unload")
    check(acl.mdl.destroy_desc(desc), "destroy_desc")
    for ptr, _ in in_ptrs + out_ptrs:
        check(acl.rt.free(ptr), "free")
    check(acl.rt.destroy_context(context), "destroy_context")
    check(acl.rt.reset_device(device), "reset_device")
    check(acl.finalize(), "finalize")


if __name__ == "__main__":
    main()
