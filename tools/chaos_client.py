"""One verifying client of `vdevctl bench chaos`: checks every result it gets back from the daemon.

Usage: python -m tools.chaos_client DEVICE_FILE SEED SECONDS REPORT. Each round writes a seeded int32 pattern
to the device (blocking or asynchronous, up to 24 MiB so big frames travel as several FUSE pieces), copies it
device to device, launches an Add (numeric mode) of the two, reads the sum back and compares it with numpy.
After every round it rewrites REPORT (one JSON object: calls, rounds, wrong, errors by kind), so a client
killed with SIGKILL leaves its counts behind. Exits 3 when the daemon is gone (it was killed: expected once).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

import numpy as np

from interposer.shim.flexnpu_client.errors import AclCallError
from interposer.shim.flexnpu_client.runtime import DEVICE_TO_DEVICE, DEVICE_TO_HOST, HOST_TO_DEVICE, Runtime
from interposer.wire import Op
from npu.errors import AclError

ACL_INT32, ACL_FORMAT_ND = 3, 2
DAEMON_GONE = {AclError.RT_SOCKET_CLOSE, AclError.RT_NO_DEVICE}
GONE_EXIT = 3
SIZES = (4 << 10, 256 << 10, 3 << 20, 24 << 20)  # bytes per operand; the big ones cross FUSE's 1 MiB pieces


class Counts:
    def __init__(self, report: str) -> None:
        self.report = report
        self.calls = self.rounds = self.wrong = 0
        self.errors: Counter[str] = Counter()

    def save(self) -> None:
        data = {"calls": self.calls, "rounds": self.rounds, "wrong": self.wrong, "errors": dict(self.errors)}
        tmp = self.report + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.report)  # whole or not at all, even under SIGKILL


def one_round(rt: Runtime, rng: np.random.Generator, counts: Counts) -> None:
    size = int(rng.choice(SIZES))
    n = size // 4
    a = rng.integers(-(1 << 20), 1 << 20, n, dtype=np.int32)
    stream = rt.create(Op.STREAM_CREATE, priority=0, flag=0)
    x, y, z = (rt.malloc(size, 0) for _ in range(3))
    counts.calls += 4
    use_stream = stream if rng.random() < 0.5 else None
    rt.memcpy(x, size, a.ctypes.data, size, HOST_TO_DEVICE, use_stream)
    rt.memcpy(y, size, x, size, DEVICE_TO_DEVICE, use_stream)
    operand = (ACL_INT32, ACL_FORMAT_ND, (n,))
    rt.launch("Add", [(*operand, x), (*operand, y)], [(*operand, z)], {}, stream)
    back = np.zeros(n, dtype=np.int32)
    rt.memcpy(back.ctypes.data, size, z, size, DEVICE_TO_HOST, stream)
    rt.call(Op.STREAM_SYNC, stream, handle=stream)
    counts.calls += 5
    if not np.array_equal(back, a + a):
        counts.wrong += 1
    for ptr in (x, y, z):
        rt.call(Op.FREE, ptr=ptr)
    rt.destroy(Op.STREAM_DESTROY, stream)
    counts.calls += 4
    counts.rounds += 1


def main() -> int:
    device, seed, seconds, report = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    counts = Counts(report)
    rng = np.random.default_rng(seed)
    deadline = time.monotonic() + seconds
    rt = None
    try:
        while time.monotonic() < deadline:
            try:
                if rt is None:
                    rt = Runtime(devices=[device])
                    rt.set_device(0)
                one_round(rt, rng, counts)
            except AclCallError as exc:
                if exc.code in DAEMON_GONE:
                    counts.errors["daemon_gone"] += 1
                    return GONE_EXIT
                counts.errors[f"{int(exc.code)}: {exc.message[:120]}"] += 1
                if rt is not None:
                    rt.reset_device(0, force=True)
                rt = None
            counts.save()
        if rt is not None:
            rt.reset_device(0, force=True)
        return 0
    finally:
        counts.save()


if __name__ == "__main__":
    sys.exit(main())
