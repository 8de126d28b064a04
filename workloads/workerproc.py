"""A worker process (workloads/worker.py) seen from the coordinator: started with the shim's environment, asked
one JSON request at a time over its pipes, from trio."""

from __future__ import annotations

import json
import subprocess
import sys

import trio

from workloads.serving import EngineError

MAX_LINE = 64 << 20  # the longest answer we wait for (token lists are small; a runaway worker is not)


class WorkerProcess:
    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self._lock = trio.Lock()  # one request at a time: answers come back in order
        self._buffer = bytearray()

    @classmethod
    async def start(cls, name: str, env: dict[str, str]) -> WorkerProcess:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "workloads.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        return cls(name, process)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def call(self, op: str, **args) -> dict:
        """Send one request and wait for its answer; EngineError if the worker failed it or died."""
        async with self._lock:
            try:
                await self.process.stdin.send_all(json.dumps({"op": op, **args}).encode() + b"\n")
                line = await self._readline()
            except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
                raise self.died(op) from None
        answer = json.loads(line)
        if "error" in answer:
            raise EngineError(f"{self.name} engine: {answer['error']}")
        return answer

    async def aclose(self) -> None:
        """End of input: the worker frees its device memory and exits; killed if it does not within 10 s."""
        with trio.move_on_after(10):
            await self.process.stdin.aclose()
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def _readline(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(1 << 16)
            if not chunk or len(self._buffer) > MAX_LINE:
                raise EOFError
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line

    def died(self, op: str) -> EngineError:
        """Why it can no longer serve, as an error naming `op`, what it was doing."""
        code = self.process.poll()
        if code is None:
            how = "closed its pipes"
        else:
            how = f"exited with {code}" if code >= 0 else f"was killed by signal {-code}"
        return EngineError(f"{self.name} engine (pid {self.pid}) {how} during {op}; its requests are lost")
