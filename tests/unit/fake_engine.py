"""A fake `Engine` for the front end's tests: deterministic tokens, controllable delays, failure on demand."""

from __future__ import annotations

import trio

from workloads.serving import EngineError, EngineStats, Output, RequestRejected

TEXT = "héllo wörld, 1€ 😀 ".encode()  # multi-byte characters, so streams split some of them across tokens
EOS = 259


class FakeEngine:
    model = "fake-model"
    max_model_len = 64
    vocab_size = 260  # ids 256..259 exist but have no bytes; EOS is the last

    def __init__(
        self,
        first_delay: float = 0.0,
        token_delay: float = 0.0,
        fail_after: int | None = None,
        reject: bool = False,
        eos_after: int | None = None,
    ) -> None:
        self.first_delay, self.token_delay = first_delay, token_delay
        self.fail_after, self.reject, self.eos_after = fail_after, reject, eos_after
        self.calls: list[tuple[str, list[int], int, bool]] = []
        self.aborted: list[str] = []
        self.running = 0
        self.waiting = 0
        self.gone = trio.Event()  # set by abort()
        self.started = trio.Event()  # set as a token goes out; a test replaces it to wait for the next request

    async def generate(self, request_id, prompt, max_tokens, ignore_eos):
        self.calls.append((request_id, prompt, max_tokens, ignore_eos))
        if self.reject:
            raise RequestRejected(f"{len(prompt)} + {max_tokens} tokens do not fit in 3 KV blocks")
        self.running += 1
        try:
            await trio.sleep(self.first_delay)
            for i in range(max_tokens):
                if i:
                    await trio.sleep(self.token_delay)
                if i == self.fail_after:
                    raise EngineError("decode process 4242 died")
                if not ignore_eos and i == self.eos_after:
                    yield Output(EOS, "stop")
                    return
                self.started.set()
                yield Output(TEXT[i % len(TEXT)], "length" if i == max_tokens - 1 else None)
        finally:
            self.running -= 1

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.gone.set()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self.running, waiting=self.waiting, kv_blocks_used=4 * self.running, kv_blocks_total=96
        )


def expected_text(n: int) -> str:
    return (TEXT * (n // len(TEXT) + 1))[:n].decode(errors="replace")
