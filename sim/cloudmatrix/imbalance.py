"""Expert load imbalance: how much more than the mean the busiest die of an EP group receives, per step.

An EP group's MoE layer ends when its slowest die has run its experts and its rows have crossed the network, so a
step's MoE time is the busiest die's, layer by layer. Two effects make it busy:
- placement: EPLB (expert-parallel load balancing, as DeepSeek's and CloudMatrix-Infer's) replicates hot experts
  into the redundant slots and spreads them from past statistics; what is left is the drift of the current
  traffic from those statistics. Modeled as each die's expected share drawn lognormal(0, `skew`) per layer —
  `skew` is not published anywhere (0.1 by default: the default EPLB; 0 with `perfect`);
- sampling: a step routes a finite number of token-expert pairs, so even a perfect placement sees multinomial
  noise; a die's rows are Poisson around its expected share (vanishing when rows are many).
`eplb="perfect"` removes both (load 1): what the published prefill figure assumes.

A step's load factor is the mean over its MoE layers of each layer's max-over-dies: layers are independent draws
and their times add. Draws are made once per (group, rows per die) and reused in turn, so a sweep is reproducible
from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_SKEW = 0.1  # lognormal sigma of a die's share after the default EPLB (not published: swept)
EPLB_MODES = ("default", "perfect")
DRAWS = 16  # load factors kept per (dies, rows) and used in turn


@dataclass
class Imbalance:
    eplb: str = "default"
    skew: float = DEFAULT_SKEW
    layers: int = 58  # MoE layers whose maxima a step averages
    seed: int = 0
    _draws: dict[tuple[int, int], list[float]] = field(default_factory=dict, repr=False)
    _turn: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.eplb not in EPLB_MODES:
            raise ValueError(f"eplb {self.eplb!r}: have {', '.join(EPLB_MODES)}")
        if self.skew < 0:
            raise ValueError(f"imbalance skew must be >= 0, got {self.skew}")

    def factors(self, dies: int, rows: float) -> list[float]:
        """The kept load factors of a group of `dies` routed dies receiving `rows` rows each on average."""
        key = (dies, max(1, round(rows)))
        if key not in self._draws:
            self._draws[key] = self._draw(*key)
        return self._draws[key]

    def next(self, dies: int, rows: float) -> float:
        """A step's load factor (>= 1): the kept draws in turn."""
        draws = self.factors(dies, rows)
        key = (dies, max(1, round(rows)))
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        return draws[turn % len(draws)]

    def mean(self, dies: int, rows: float) -> float:
        return float(np.mean(self.factors(dies, rows)))

    def _draw(self, dies: int, rows: int) -> list[float]:
        if self.eplb == "perfect" or dies <= 1:
            return [1.0]
        rng = np.random.default_rng([self.seed, dies, rows])
        share = rng.lognormal(-(self.skew**2) / 2, self.skew, (DRAWS, self.layers, dies)) if self.skew else 1.0
        got = rng.poisson(rows * np.broadcast_to(share, (DRAWS, self.layers, dies)))
        busiest = got.max(axis=-1) / rows
        return [float(x) for x in np.maximum(busiest.mean(axis=-1), 1.0)]
