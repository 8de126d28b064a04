"""A pyACL client that runs an offline model (.om) over and over, timed by the device: `vdevctl bench models`' tenant.

Usage: python models_client.py MODEL.om N      N executions; prints {"latency_ms": [...]} (modeled, per execute)
       python models_client.py MODEL.om loop   executes until a line arrives on stdin; prints {"ready": true} after
                                               the first, then {"executions": n, "latency_ms": median}
Inputs are zeros (timing mode has no bytes to compute on). Standard library only, besides the shim's acl.
"""

import json
import select
import statistics
import sys

import acl


def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")


def dataset(sizes):
    ds = acl.mdl.create_dataset()
    for size in sizes:
        ptr, ret = acl.rt.malloc(size, 0)
        check(ret, "malloc")
        check(acl.mdl.add_dataset_buffer(ds, acl.create_data_buffer(ptr, size))[1], "add_dataset_buffer")
    return ds


def main():
    path, mode = sys.argv[1], sys.argv[2]
    check(acl.init(), "init")
    check(acl.rt.set_device(0), "set_device")
    model_id, ret = acl.mdl.load_from_file(path)
    check(ret, "load_from_file")
    desc = acl.mdl.create_desc()
    check(acl.mdl.get_desc(desc, model_id), "get_desc")
    ins = dataset(acl.mdl.get_input_size_by_index(desc, i) for i in range(acl.mdl.get_num_inputs(desc)))
    outs = dataset(acl.mdl.get_output_size_by_index(desc, i) for i in range(acl.mdl.get_num_outputs(desc)))
    stream, ret = acl.rt.create_stream()
    check(ret, "create_stream")
    start, ret = acl.rt.create_event()
    check(ret, "create_event")
    end, ret = acl.rt.create_event()
    check(ret, "create_event")

    def once():
        check(acl.rt.record_event(start, stream), "record_event")
        check(acl.mdl.execute_async(model_id, ins, outs, stream), "execute_async")
        check(acl.rt.record_event(end, stream), "record_event")
        check(acl.rt.synchronize_stream(stream), "synchronize_stream")
        ms, ret = acl.rt.event_elapsed_time(start, end)
        check(ret, "event_elapsed_time")
        return ms

    once()  # warm: the operators' descriptions travel once per session
    if mode == "loop":
        latencies = [once()]
        print(json.dumps({"ready": True}), flush=True)
        while not select.select([sys.stdin], [], [], 0)[0]:
            latencies.append(once())
        print(json.dumps({"executions": len(latencies), "latency_ms": statistics.median(latencies)}), flush=True)
    else:
        print(json.dumps({"latency_ms": [once() for _ in range(int(mode))]}), flush=True)
    check(acl.mdl.unload(model_id), "unload")
    check(acl.rt.reset_device(0), "reset_device")
    check(acl.finalize(), "finalize")


if __name__ == "__main__":
    main()
