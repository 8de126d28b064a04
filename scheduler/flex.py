"""`flex`: dynamic prefill/decode co-location on one chip.

Decode is memory-bound and latency-bound (a token per step, every running request waits for the step);
prefill is compute-bound and throughput-bound (its queue is TTFT). On an Ascend chip a kernel's block holds
an AI core until done, so a decode kernel queued behind a long prefill kernel waits for all of it (fifo), and
a fixed split (static) leaves one phase's cores idle while the other queues. Flex plans per dispatch:

1. Decode first, without waiting. While decode is active (a decode-phase stream has work queued or running,
   or had within `linger_ms`), `reserve` AI cores (and their vector cores) are kept from prefill: a prefill
   kernel launches with a core limit of the rest, so the reserve is free whenever a decode kernel arrives and
   it starts at once. Decode kernels take every free core they can use (their tiles) when no prefill work
   is waiting, and their reserve when some is.
2. Prefill gets the rest — all of the chip when decode is not active — and launches only when all of its
   blocks fit on free cores, so it never sits on the chip holding back the next decode kernel (the lesson of
   Orion's pairing of compute- and memory-bound kernels: co-run them, but never queue the latency-critical one
   behind the other's blocks).
3. The reserve is sized per decode step (a decode stream's busy period; host gaps shorter than `gap_ms` do not
   end one), before the step runs: when a step begins, its kernels are queued (a graph replay, or a serving
   engine's step submitted at once), and the chip's own cost model (npu/emulated/timing.alone) predicts the
   step's time on r cores. The reserve is the fewest cores whose prediction, times the slowdown measured on
   earlier steps that ran beside prefill (HBM shared with it, host gaps inside the step), meets the step's
   goal, within [MIN_DECODE, cores - MIN_PREFILL]. So decode is protected before it suffers, not one step
   after, and prefill — TTFT — gets every other core. The goal is `tpot_target_ms`, or, with
   `tpot_isolated_pct`, at most that much over the step alone on the whole chip (the paper's "TPOT nearly
   unchanged", asked for directly; the smaller of the two when both are set).

   Prior art, and what was taken: Sarathi-Serve bounds decode stalls by capping prefill chunks in time; flex
   bounds them in space (cores), sized from each step's predicted cost as Nexus sizes phase partitions from a
   cost model; DuetServe's and Tally's idea of predicting a kernel's time before dispatch to keep the
   latency-critical side within its target; DistServe and Splitwise size the phases per instance for hours,
   flex per step on one chip.

The target is on the device time of a step (what the chip controls): set it to the TPOT objective less the
serving engine's host time per step.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections import Counter

from npu.emulated.timing import alone
from npu.profiles import ChipProfile
from npu.tasks import Cost, Unit
from scheduler.policy import Cores, Dispatch, Quiet
from scheduler.stream import Phase, Stream, TaskEntry, ceiling

ARRIVAL = operator.attrgetter("arrival")
MIN_DECODE = 1  # AI cores decode always keeps while active
MIN_PREFILL = 2  # AI cores the reserve never takes from prefill
ALONE_CACHE = 4096  # kernels whose times by cores are kept
SMOOTHING = 0.2  # weight of the latest contended step in the moving average of slowdowns (about the last 5)


class Flex(Quiet):
    name = "flex"

    def __init__(
        self,
        tpot_target_ms: float = 40.0,
        tpot_isolated_pct: float = 0.0,
        linger_ms: float = 10.0,
        gap_ms: float = 0.1,
    ) -> None:
        if tpot_target_ms <= 0:
            raise ValueError(f"flex policy: tpot_target_ms must be > 0, got {tpot_target_ms}")
        if tpot_isolated_pct < 0:
            raise ValueError(f"flex policy: tpot_isolated_pct must be >= 0 (0: off), got {tpot_isolated_pct}")
        if linger_ms < 0 or gap_ms < 0:
            raise ValueError(f"flex policy: linger_ms and gap_ms must be >= 0, got {linger_ms} and {gap_ms}")
        self.target = tpot_target_ms / 1e3
        self.isolated_pct = tpot_isolated_pct
        self.linger = linger_ms / 1e3
        self.gap = gap_ms / 1e3
        self.reserve: int | None = None  # AI cores kept for decode; half the chip until a step is sized
        self.ai_cores = 0
        self.last_decode = -math.inf
        self.contended = False  # prefill held cores during the current decode step
        self.slowdown = 1.0  # moving average of measured / predicted (at least 1), over steps beside prefill
        self._alone: dict[Cost, list[float]] = {}  # kernels' times alone by cores (flex runs on one chip)
        self.steps: weakref.WeakKeyDictionary[Stream, list] = weakref.WeakKeyDictionary()  # per decode stream, below

    def select(self, ready, running, chip, now):
        if self.reserve is None:
            self.reserve, self.ai_cores = chip.ai_cores // 2, chip.ai_cores
        ratio = chip.vector_cores // chip.ai_cores
        cores = Cores.of(running, chip)
        decode, prefill = [], []
        for entry in ready:
            (decode if entry.phase is Phase.DECODE else prefill).append(entry)
        decode.sort(key=ARRIVAL)
        prefill.sort(key=ARRIVAL)
        for entry in decode:
            self._step_begins(entry.stream, chip, now)
        decoding = bool(decode) or cores.decode != [0, 0]
        if decoding:
            self.last_decode = now
        active = now - self.last_decode <= self.linger
        prefill_busy = bool(prefill) or cores.rest != [0, 0]
        self.contended |= decoding and prefill_busy
        reserve = self.reserve if active else 0

        chosen = []
        cap = (reserve, reserve * ratio) if prefill_busy else (chip.ai_cores, chip.vector_cores)
        blocked = False  # in arrival order per phase: a kernel that waits holds back later ones, not copies
        for entry in decode:
            if entry.task.cost().unit is Unit.DMA:  # a copy holds no core: nothing to wait for
                chosen.append(Dispatch(entry, cap[0] or 1, cap[1] or 1))
                continue
            (dc, dv), (rc, rv) = cores.decode, cores.rest
            cube = max(1, min(cap[0] - dc, chip.ai_cores - dc - rc))
            vector = max(1, min(cap[1] - dv, chip.vector_cores - dv - rv))
            if blocked or not cores.claim(entry, cube, vector, cap):
                blocked = True
                continue
            chosen.append(Dispatch(entry, cube, vector))
        cap = (chip.ai_cores - reserve, chip.vector_cores - reserve * ratio)
        blocked = False
        for entry in prefill:
            copy = entry.task.cost().unit is Unit.DMA
            if copy or (not blocked and cores.claim(entry, *cap, cap)):
                chosen.append(Dispatch(entry, *cap))
            else:
                blocked = True
        return chosen

    def drained(self, stream: Stream, now: float) -> None:
        if stream.phase is not Phase.DECODE:
            return
        self.last_decode = now  # linger counts from the end of decode work
        step = self.steps.get(stream)
        if step is not None:
            step[1] = now

    def status(self):
        state = {"decode_reserve": self.reserve, "tpot_target_ms": self.target * 1e3}
        if self.isolated_pct:
            state["tpot_isolated_pct"] = self.isolated_pct
        return state

    def _step_begins(self, stream: Stream, chip: ChipProfile, now: float) -> None:
        step = self.steps.get(stream)
        if step is None:
            step = self.steps[stream] = [now, None, None]  # start, drained at, predicted time
        elif step[1] is not None:  # it had drained
            if now - step[1] <= self.gap:
                step[1] = None
                return  # a host gap inside the step
            self._measure(step)
            step[0], step[1], step[2] = now, None, None
        elif step[2] is not None:
            return  # sized already
        self._size(stream, step, chip)  # or again: its kernels may follow its first copies (records come one by one)

    def _measure(self, step: list) -> None:
        """After a decode step that ran beside prefill: how much slower than predicted it was. The prediction is
        the step alone on its reserve, a floor for a step held to it; a step that ran faster had more cores while
        prefill paused, which says nothing about the reserve, so it counts as on time."""
        start, end, predicted = step
        if predicted is None:
            return  # a step of copies (a token read on another stream): the contention seen is a sized step's
        contended, self.contended = self.contended, False
        if contended:
            self.slowdown += SMOOTHING * (max(1.0, (end - start) / predicted) - self.slowdown)

    def _size(self, stream: Stream, step: list, chip: ChipProfile) -> None:
        """A step begins: the fewest cores that make its queued kernels meet the goal, as far as known. A step of
        copies alone (a decode engine reading its sampled tokens back on another stream) needs no core and leaves
        the reserve to the steps that do."""
        kernels = [e for e in stream.queue if isinstance(e, TaskEntry)]
        costs = Counter(e.task.cost() for e in kernels)  # layers repeat kernels
        if all(cost.unit is Unit.DMA for cost in costs):
            return  # unsized: the next ready head tries again
        # A capped tenant's step runs on its cap however many cores are reserved: reserve no more than that.
        most = max(MIN_DECODE, ceiling(kernels[0], chip)[0])
        rows = [(n, cost, self._times(chip, cost)) for cost, n in costs.items()]
        ratio = chip.vector_cores // chip.ai_cores

        def predict(cores: int) -> float:
            total = 0.0
            for n, cost, times in rows:
                t = times[cores]
                if t is None:
                    t = times[cores] = alone(chip, cost, cores, cores * ratio)
                total += n * t
            return total

        goal = self.target
        if self.isolated_pct:
            goal = min(goal, predict(most) * (1 + self.isolated_pct / 100))
        low, high = MIN_DECODE, min(self.ai_cores - MIN_PREFILL, most)
        while low < high:  # the prediction only falls as cores grow
            mid = (low + high) // 2
            if predict(mid) * self.slowdown <= goal:
                high = mid
            else:
                low = mid + 1
        self.reserve = low
        step[2] = predict(low)

    def _times(self, chip: ChipProfile, cost: Cost) -> list[float | None]:
        """A kernel's time alone on r AI cores (and their vector cores), filled in as asked: steps repeat their
        kernels, and a search asks a few r of each."""
        times = self._alone.get(cost)
        if times is None:
            if len(self._alone) > ALONE_CACHE:  # attention costs vary with lengths: keep the cache bounded
                self._alone.clear()
            times = self._alone[cost] = [None] * (chip.ai_cores + 1)
        return times
