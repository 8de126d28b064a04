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
3. The reserve adapts to a TPOT target, per decode step (a decode stream's busy period; host gaps shorter
   than `gap_ms` do not end one). A request's TPOT is the mean of the steps it lives through, so the goal of a
   step that ran beside prefill is the target, stretched (up to MAX_STRETCH times) while the moving average of
   all steps is under it — steps that had the chip alone pay for slower contended ones. After each contended
   step the reserve moves halfway to the cores that would have made it take its goal (a memory-bound step's
   time goes as 1 / its cores), within [MIN_DECODE, cores - MIN_PREFILL]. So decode holds the fewest cores that
   keep its TPOT within the target and prefill — TTFT — gets everything else. Where Sarathi-Serve bounds decode
   stalls by capping prefill chunks in time, flex bounds them in space (cores); where DistServe and Splitwise
   size the phases per instance for hours, flex re-sizes them per step on one chip.

The target is on the device time of a step (what the chip controls): set it to the TPOT objective less the
serving engine's host time per step.
"""

from __future__ import annotations

import math
import operator
import weakref

from npu.tasks import Unit
from scheduler.policy import Cores, Dispatch, Quiet
from scheduler.stream import Phase, Stream

ARRIVAL = operator.attrgetter("arrival")
MIN_DECODE = 1  # AI cores decode always keeps while active
MIN_PREFILL = 2  # AI cores the reserve never takes from prefill
SMOOTHING = 0.05  # weight of the latest step in the moving average of steps (about the last 20)
MAX_STRETCH = 2.0  # a contended step may take at most this many targets (when uncontended ones are fast)


class Flex(Quiet):
    name = "flex"

    def __init__(self, tpot_target_ms: float = 50.0, linger_ms: float = 10.0, gap_ms: float = 0.1) -> None:
        if tpot_target_ms <= 0:
            raise ValueError(f"flex policy: tpot_target_ms must be > 0, got {tpot_target_ms}")
        if linger_ms < 0 or gap_ms < 0:
            raise ValueError(f"flex policy: linger_ms and gap_ms must be >= 0, got {linger_ms} and {gap_ms}")
        self.target = tpot_target_ms / 1e3
        self.linger = linger_ms / 1e3
        self.gap = gap_ms / 1e3
        self.reserve: int | None = None  # AI cores kept for decode; half the chip until steps say otherwise
        self.ai_cores = 0
        self.last_decode = -math.inf
        self.contended = False  # prefill held cores during the current decode step
        self.mean_step: float | None = None  # moving average of decode steps: what a request's TPOT averages
        self.steps: weakref.WeakKeyDictionary[Stream, list] = weakref.WeakKeyDictionary()  # [start, drained at]

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
            self._step_begins(entry.stream, now)
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
        return {"decode_reserve": self.reserve, "tpot_target_ms": self.target * 1e3}

    def _step_begins(self, stream: Stream, now: float) -> None:
        step = self.steps.get(stream)
        if step is None:
            self.steps[stream] = [now, None]
        elif step[1] is not None:  # it had drained
            if now - step[1] > self.gap:
                self._adapt(step[1] - step[0])
                step[0] = now
            step[1] = None

    def _adapt(self, step_s: float) -> None:
        """After a decode step: move the reserve halfway to what would have made it take its goal."""
        assert self.reserve is not None
        self.mean_step = step_s if self.mean_step is None else self.mean_step + SMOOTHING * (step_s - self.mean_step)
        contended, self.contended = self.contended, False
        if not contended:
            return  # decode had the chip: the step says nothing about the reserve
        goal = self.target * min(MAX_STRETCH, max(1.0, self.target / self.mean_step))
        wanted = self.reserve * step_s / goal  # a memory-bound step's time goes as 1 / its cores
        move = (wanted - self.reserve) / 2
        move = math.ceil(move) if move > 0 else math.floor(move) if move < -0.5 else 0
        self.reserve = min(max(self.reserve + move, MIN_DECODE), self.ai_cores - MIN_PREFILL)
