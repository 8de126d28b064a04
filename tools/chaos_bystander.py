"""Another tenant's client while one attacks the daemon (`vdevctl bench chaos`, tests/integration/test_tenants.py):
memset + synchronize in a loop, timed.

Usage: python tools/chaos_bystander.py SHIM_PATH DEVICE_FILE SECONDS. Standard library only, so it runs under any
python3 as an unprivileged uid. Prints "ready" once its session is open, then waits for a line on stdin, so the
attack can be set up first; runs for SECONDS, or until a line "stop"; then prints one JSON line: calls made,
errors, the median and worst latency in ms, and the first error's message.
"""

import json
import statistics
import sys
import threading
import time


def main():
    shim, device, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sys.path.insert(0, shim)
    from flexnpu_client.client import Client, FileTransport
    from flexnpu_client.codec import Op
    from flexnpu_client.errors import AclCallError

    client = Client(FileTransport(device))
    reply = client.call(Op.MALLOC, size=4096, policy=0)
    ptr = int.from_bytes(bytes(reply.payload)[:8], "little")
    print("ready", flush=True)
    sys.stdin.readline()
    stop = threading.Event()  # a line "stop" ends the loop before SECONDS are up

    def stop_on_request() -> None:
        if sys.stdin.readline().strip() == "stop":
            stop.set()

    threading.Thread(target=stop_on_request, daemon=True).start()
    latencies, errors, first_error = [], 0, ""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        t = time.perf_counter()
        try:
            for op, args in ((Op.MEMSET, {"ptr": ptr, "max": 4096, "value": 7, "count": 4096}), (Op.DEVICE_SYNC, {})):
                reply = client.call(op, **args)
                if reply.status != 0:
                    errors += 1
                    first_error = first_error or bytes(reply.payload).decode(errors="replace")
        except AclCallError as exc:
            errors += 1
            first_error = first_error or str(exc)
        latencies.append((time.perf_counter() - t) * 1e3)
    client.call(Op.FREE, ptr=ptr)
    client.close()
    print(
        json.dumps(
            {
                "calls": len(latencies),
                "errors": errors,
                "median_ms": statistics.median(latencies) if latencies else 0.0,
                "max_ms": max(latencies, default=0.0),
                "first_error": first_error,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
