"""What the HTTP front end needs of a deployment, whatever runs behind it (one process in direct mode, a prefill
and a decode process co-located on one NPU, or disaggregated across NPUs): an `Engine`.

The front end validates requests, turns text into token ids and back, streams, and measures; the engine runs
the model. Both run on trio in the front end's process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Output:
    """One generated token; `finish` is set on the last one: "stop" (EOS) or "length" (max_tokens)."""

    token: int
    finish: str | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


class EngineError(Exception):
    """The engine cannot finish a request (its process died, or it refused it); the message says why."""


class RequestRejected(EngineError):
    """A request that can never run on this deployment (too long for its KV cache): the client's fault, a 4xx."""


class Engine(Protocol):
    model: str  # the name /v1/models lists and requests must name
    max_model_len: int  # prompt + max_tokens may not exceed it
    vocab_size: int

    def generate(self, request_id: str, prompt: list[int], max_tokens: int, ignore_eos: bool) -> AsyncIterator[Output]:
        """Tokens as they are generated. Raises RequestRejected before the first token for a request that can
        never fit, EngineError when the engine fails mid-way."""
        ...

    def abort(self, request_id: str) -> None:
        """The client went away: stop generating for it and free what it holds."""
        ...

    def stats(self) -> EngineStats: ...
