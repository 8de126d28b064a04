"""`static`: fixed core partitions per phase, like vNPU templates — static prefill/decode co-location.

Prefill gets `prefill_cores` AI cores (each with its two vector cores), decode the rest. A stream of unknown
phase shares the prefill partition (a virtual NPU with no role is a general-purpose tenant). A kernel launches
with its partition as its core limit and is dispatched only when all of its blocks fit in what its partition
has free, so no phase ever holds a core of the other's — even while the other's partition sits idle, which is
what static co-location costs.
"""

from __future__ import annotations

from npu.profiles import ChipProfile
from npu.tasks import Unit
from scheduler.policy import Cores, Dispatch, Quiet
from scheduler.stream import Phase

PREFILL_SIDE = (Phase.PREFILL, Phase.UNKNOWN)


class Static(Quiet):
    name = "static"

    def __init__(self, prefill_cores: int | None = None) -> None:
        if prefill_cores is not None and prefill_cores < 1:
            raise ValueError(f"static policy: prefill_cores must be at least 1, got {prefill_cores}")
        self.prefill_cores = prefill_cores  # None: half the chip

    def check(self, chip: ChipProfile) -> None:
        if self.prefill_cores is not None and self.prefill_cores >= chip.ai_cores:
            raise ValueError(
                f"static policy: prefill_cores {self.prefill_cores} leaves decode no core of the {chip.ai_cores} on "
                f"{chip.name} (use 1-{chip.ai_cores - 1})"
            )

    def partitions(self, chip: ChipProfile) -> dict[tuple[Phase, ...], tuple[int, int]]:
        """(cube, vector) cores of each side."""
        prefill = chip.ai_cores // 2 if self.prefill_cores is None else self.prefill_cores
        ratio = chip.vector_cores // chip.ai_cores
        return {
            PREFILL_SIDE: (prefill, prefill * ratio),
            (Phase.DECODE,): (chip.ai_cores - prefill, (chip.ai_cores - prefill) * ratio),
        }

    def select(self, ready, running, chip, now):
        cores = Cores.of(running, chip)
        chosen = []
        for side, (cube, vector) in self.partitions(chip).items():
            blocked = False  # in order within the partition: a later kernel does not overtake one that waits
            for entry in sorted((e for e in ready if e.phase in side), key=lambda e: e.arrival):
                copy = entry.task.cost().unit is Unit.DMA  # a copy holds no core: it never waits for one
                if copy or (not blocked and cores.claim(entry, cube, vector, (cube, vector))):
                    chosen.append(Dispatch(entry, cube, vector))
                else:
                    blocked = True
        return sorted(chosen, key=lambda d: d.entry.arrival)

    def status(self):
        return {"prefill_cores": self.prefill_cores or "half"}
