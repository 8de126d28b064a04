"""The CloudMatrix384 supernode's two networks, as a die sees them.

- UB (Unified Bus), the supernode's scale-up fabric: every NPU reaches every other at > 392 GB/s one way, under
  1 us added latency across nodes (arXiv 2506.12708); a 910C is two dies, so a die has 196 GB/s. MoE
  token dispatch and combine run over it, as all-to-all.
- RoCE, the scale-out network: 400 Gb/s per NPU (same paper), 25 GB/s per die. Prefill-to-decode
  KV transfer runs over it (the issue's deployment; CloudMatrix-Infer's own decode may read KV over the UB).

All-to-all time of one rank: its bytes over the die's UB bandwidth plus a fixed cost that grows with the group
(synchronization and the spread of destinations): latency(ep) = base + per_doubling * log2(ep). The paper
publishes (as issue 19 quotes it: 128 tokens per rank, INT8 dispatch, BF16 combine):
dispatch 116 us at EP8 and 152 us at EP256, combine 118 / 149 us. Each pair fixes base and per_doubling for its
op once the bytes are taken out (dispatch: 128 x 8 rows of 7168 INT8 + a 4-byte scale = 7.34 MB, 37.5 us at
196 GB/s; combine: 128 x 8 rows of 7168 BF16 = 14.7 MB, 74.9 us) — fitted, not predicted. `scale` multiplies
both fixed terms: the sweep of the UB latency nobody published beyond these points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UB_DIE_BYTES_S = 392e9 / 2  # per die, one way (arXiv 2506.12708: > 392 GB/s unidirectional per NPU)
ROCE_DIE_BYTES_S = 400e9 / 8 / 2  # per die (400 Gb/s RoCE per NPU)
PUBLISHED_TOKENS = 128  # tokens per rank of the published all-to-all latencies
PUBLISHED = {"dispatch": {8: 116e-6, 256: 152e-6}, "combine": {8: 118e-6, 256: 149e-6}}


def _fit(op: str, row_bytes: float, k: int = 8) -> tuple[float, float]:
    """(base, per_doubling) in seconds: the published pair less the bytes' time."""
    (ep_a, t_a), (ep_b, t_b) = sorted(PUBLISHED[op].items())
    wire = PUBLISHED_TOKENS * k * row_bytes / UB_DIE_BYTES_S
    per = (t_b - t_a) / (math.log2(ep_b) - math.log2(ep_a))
    return t_a - wire - per * math.log2(ep_a), per


DISPATCH_ROW = 7168 + 4  # an INT8 hidden row and its scale
COMBINE_ROW = 7168 * 2  # a BF16 hidden row
DISPATCH_FIT, COMBINE_FIT = _fit("dispatch", DISPATCH_ROW), _fit("combine", COMBINE_ROW)


@dataclass(frozen=True)
class Network:
    ub_bytes_s: float = UB_DIE_BYTES_S
    roce_bytes_s: float = ROCE_DIE_BYTES_S
    latency_scale: float = 1.0  # multiplies the fitted fixed terms (the UB-latency sweep)

    def all_to_all(self, op: str, ep: int, rows: float, row_bytes: float) -> float:
        """Seconds one rank spends in a dispatch or combine that moves `rows` rows of `row_bytes` (its own, or its
        slowest peer's when the group waits for it)."""
        if ep <= 1:
            return 0.0
        base, per = DISPATCH_FIT if op == "dispatch" else COMBINE_FIT
        return self.latency_scale * (base + per * math.log2(ep)) + rows * row_bytes / self.ub_bytes_s

    def kv_transfer(self, nbytes: float, dies: int) -> float:
        """Seconds to move `nbytes` of KV cache over RoCE when `dies` dies' ports carry it in parallel."""
        return nbytes / (self.roce_bytes_s * max(dies, 1))
