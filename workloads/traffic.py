"""Traffic for serving runs, live or simulated: request lengths (fixed, or drawn from a published trace's moments),
Poisson arrivals, per-request results and their aggregate against an SLO. Pure: no I/O, so the simulator uses it
without the load generator's HTTP client and plots (workloads/loadgen.py).

Lengths are fixed or drawn per request from a lognormal fitted to a trace's mean and standard deviation (its first
two moments), rounded, and clipped to [1, the trace's max] and to the model's context: prompt <= max_model_len - 1,
then output <= max_model_len - prompt. Clipping shifts the moments a little; the drawn lengths are in the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Length:
    mean: float
    std: float = 0.0  # 0: every request gets `mean` tokens
    max: int | None = None  # the trace's longest, where published

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.std == 0:
            values = np.full(n, self.mean)
        else:
            sigma2 = math.log1p((self.std / self.mean) ** 2)
            values = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), n)
        return np.clip(np.rint(values), 1, self.max or np.inf).astype(int)


@dataclass(frozen=True)
class Lengths:
    prompt: Length
    output: Length

    @classmethod
    def fixed(cls, prompt: int, output: int) -> Lengths:
        return cls(Length(prompt), Length(output))


# Azure LLM inference trace (2023); see docs/ascend-reference.md. Only the conversation prompt's max is published.
CONVERSATION = Lengths(Length(1155, 1109, 14050), Length(211, 163))
CODE = Lengths(Length(2048, 1973), Length(28, 60))


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.050


DEFAULT_SLO = Slo()


@dataclass
class RequestResult:
    prompt_tokens: int
    max_tokens: int
    sent_s: float  # since the run started
    output_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None  # None with fewer than 2 tokens
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


def _draw_lengths(rng: np.random.Generator, lengths: Lengths, n: int, max_model_len: int) -> list[tuple[int, int]]:
    prompts = np.minimum(lengths.prompt.draw(rng, n), max_model_len - 1)
    outputs = np.minimum(lengths.output.draw(rng, n), max_model_len - prompts)
    return list(zip(prompts.tolist(), outputs.tolist(), strict=True))


def draw_lengths(lengths: Lengths, num_requests: int, seed: int, max_model_len: int) -> list[tuple[int, int]]:
    """(prompt tokens, max_tokens) per request: draw_requests' lengths, without the token ids (the simulator's)."""
    return _draw_lengths(np.random.default_rng(seed), lengths, num_requests, max_model_len)


def draw_requests(lengths: Lengths, num_requests: int, seed: int, max_model_len: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) per request, the same for the same seed."""
    rng = np.random.default_rng(seed)
    drawn = _draw_lengths(rng, lengths, num_requests, max_model_len)
    return [(rng.integers(0, 256, p).tolist(), o) for p, o in drawn]


def arrival_times(rate: float, num_requests: int, seed: int) -> list[float]:
    """Send times from the start, in seconds: a Poisson process at `rate`/s, or all at 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng([seed, 1]).exponential(1 / rate, num_requests)  # a stream apart from the lengths'
    return np.concatenate(([0.0], np.cumsum(gaps[1:]))).tolist()


def _summary(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}}


def aggregate(results: list[RequestResult], duration_s: float, slo: Slo) -> dict:
    ok = [r for r in results if r.error is None]
    good = [r for r in ok if r.ttft_s <= slo.ttft_s and (r.tpot_s is None or r.tpot_s <= slo.tpot_s)]
    return {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": sum(r.output_tokens for r in ok) / duration_s,
        "goodput": len(good) / duration_s,  # completed requests/s meeting every SLO
        "ttft_s": _summary([r.ttft_s for r in ok]),
        "tpot_s": _summary([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": _summary([gap for r in ok for gap in r.itl_s]),
        "e2e_s": _summary([r.e2e_s for r in ok]),
    }
