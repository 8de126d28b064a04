"""Capture a chain of operators on a stream into a graph, replay it, and compare with running it eagerly.

Usage: python graph.py [DEVICE_ID]. Prints one JSON line: whether the numbers match, and the modeled time of
one eager pass and one replay (event_elapsed_time).
"""

import json
import sys

import numpy as np

import acl

ACL_FLOAT16, ACL_FORMAT_ND = 1, 2
ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST = 1, 2
STEPS = 20  # x = x * 0.5 + y, STEPS times


def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")


def main():
    device_id = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    check(acl.init(), "init")
    check(acl.rt.set_device(device_id), "set_device")
    stream, ret = acl.rt.create_stream()
    check(ret, "create_stream")
    shape = [64, 256]
    x0 = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    y = np.random.default_rng(1).standard_normal(shape).astype(np.float16)
    half = np.full(shape, 0.5, dtype=np.float16)
    size = x0.nbytes
    ptrs = {}
    for name, host in (("x", x0), ("y", y), ("half", half), ("t", None)):
        ptrs[name], ret = acl.rt.malloc(size, 0)
        check(ret, "malloc")
        if host is not None:
            check(acl.rt.memcpy(ptrs[name], size, acl.util.numpy_to_ptr(host), size, ACL_MEMCPY_HOST_TO_DEVICE), "h2d")
    desc = acl.create_tensor_desc(ACL_FLOAT16, shape, ACL_FORMAT_ND)
    buf = {name: acl.create_data_buffer(p, size) for name, p in ptrs.items()}

    def chain():
        for _ in range(STEPS):
            check(acl.op.execute_v2("Mul", [desc, desc], [buf["x"], buf["half"]], [desc], [buf["t"]], 0, stream), "mul")
            check(acl.op.execute_v2("Add", [desc, desc], [buf["t"], buf["y"]], [desc], [buf["x"]], 0, stream), "add")

    start, ret = acl.rt.create_event()
    end, ret = acl.rt.create_event()

    def timed(run):
        check(acl.rt.record_event(start, stream), "record start")
        run()
        check(acl.rt.record_event(end, stream), "record end")
        check(acl.rt.synchronize_stream(stream), "synchronize_stream")
        ms, ret = acl.rt.event_elapsed_time(start, end)
        check(ret, "event_elapsed_time")
        return ms

    eager_ms = timed(chain)
    eager = np.zeros(shape, dtype=np.float16)
    check(acl.rt.memcpy(acl.util.numpy_to_ptr(eager), size, ptrs["x"], size, ACL_MEMCPY_DEVICE_TO_HOST), "d2h")

    check(acl.rt.memcpy(ptrs["x"], size, acl.util.numpy_to_ptr(x0), size, ACL_MEMCPY_HOST_TO_DEVICE), "reset x")
    check(acl.mdl.ri_capture_begin(stream, 0), "ri_capture_begin")
    chain()  # captured, not run
    graph, ret = acl.mdl.ri_capture_end(stream)
    check(ret, "ri_capture_end")
    untouched = np.zeros(shape, dtype=np.float16)
    check(acl.rt.memcpy(acl.util.numpy_to_ptr(untouched), size, ptrs["x"], size, ACL_MEMCPY_DEVICE_TO_HOST), "d2h")
    replay_ms = timed(lambda: check(acl.mdl.ri_execute_async(graph, stream), "ri_execute_async"))
    replayed = np.zeros(shape, dtype=np.float16)
    check(acl.rt.memcpy(acl.util.numpy_to_ptr(replayed), size, ptrs["x"], size, ACL_MEMCPY_DEVICE_TO_HOST), "d2h")
    check(acl.mdl.ri_destroy(graph), "ri_destroy")
    check(acl.rt.reset_device(device_id), "reset_device")
    check(acl.finalize(), "finalize")
    print(
        json.dumps(
            {
                "capture_ran_nothing": bool(np.array_equal(untouched, x0)),
                "replay_matches_eager": bool(np.array_equal(replayed, eager)),
                "eager_ms": eager_ms,
                "replay_ms": replay_ms,
            }
        )
    )


if __name__ == "__main__":
    main()
