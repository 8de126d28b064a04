"""fp16 MatMuls in the shapes of an LLM's prefill and decode, timed by the device: the two sides of a head-of-line
blocking experiment on one chip.

Usage: python matmul_steps.py MODE [N]
  prefill    2048x3584 @ 3584x18944, four at a time and a sync, until a line (or EOF) arrives on stdin; prints
             {"ready": true} once its first four ran, then {"iterations": n} when it stops
  warm       five 16x3584 @ 3584x4096 and a sync, then exits (a short client that leaves nothing behind)
  decode N   N steps of 28 16x3584 @ 3584x4096 between two events; prints {"steps_ms": [...]}, each step's
             modeled time (acl.rt.event_elapsed_time)
Standard library only, besides the shim's acl.
"""

import json
import select
import sys

import acl

ACL_FLOAT16, ACL_FORMAT_ND = 1, 2


def check(ret, what):
    if ret != 0:
        sys.exit(f"{what} failed: {ret} ({acl.get_recent_err_msg()})")


def matmul(m, k, n):
    """Descriptors and buffers of an (m, k) @ (k, n) fp16 MatMul."""
    descs, buffers = [], []
    for shape in ([m, k], [k, n], [m, n]):
        size = 2 * shape[0] * shape[1]
        ptr, ret = acl.rt.malloc(size, 0)
        check(ret, "malloc")
        descs.append(acl.create_tensor_desc(ACL_FLOAT16, shape, ACL_FORMAT_ND))
        buffers.append(acl.create_data_buffer(ptr, size))
    attr = acl.op.create_attr()

    def launch(stream):
        check(acl.op.execute_v2("MatMul", descs[:2], buffers[:2], descs[2:], buffers[2:], attr, stream), "MatMul")

    return launch


def main():
    mode = sys.argv[1]
    check(acl.init(), "init")
    check(acl.rt.set_device(0), "set_device")
    stream, ret = acl.rt.create_stream()
    check(ret, "create_stream")
    if mode == "prefill":
        launch = matmul(2048, 3584, 18944)
        iterations = 0
        while True:
            for _ in range(4):
                launch(stream)
            check(acl.rt.synchronize_stream(stream), "synchronize_stream")
            iterations += 1
            if iterations == 1:
                print(json.dumps({"ready": True}), flush=True)
            if select.select([sys.stdin], [], [], 0)[0]:
                break
        print(json.dumps({"iterations": iterations}), flush=True)
    elif mode == "warm":
        launch = matmul(16, 3584, 4096)
        for _ in range(5):
            launch(stream)
        check(acl.rt.synchronize_stream(stream), "synchronize_stream")
    elif mode == "decode":
        launch = matmul(16, 3584, 4096)
        start, ret = acl.rt.create_event()
        check(ret, "create_event")
        end, ret = acl.rt.create_event()
        check(ret, "create_event")
        steps = []
        for _ in range(int(sys.argv[2])):
            check(acl.rt.record_event(start, stream), "record_event")
            for _ in range(28):
                launch(stream)
            check(acl.rt.record_event(end, stream), "record_event")
            check(acl.rt.synchronize_stream(stream), "synchronize_stream")
            ms, ret = acl.rt.event_elapsed_time(start, end)
            check(ret, "event_elapsed_time")
            steps.append(ms)
        print(json.dumps({"steps_ms": steps}), flush=True)
    else:
        sys.exit(f"unknown mode {mode!r}: prefill, warm or decode N")
    check(acl.rt.destroy_stream(stream), "destroy_stream")
    check(acl.rt.reset_device(0), "reset_device")
    check(acl.finalize(), "finalize")


if __name__ == "__main__":
    main()
