"""A serving step as the tasks the chip runs: the model description's operator calls, costed by the emulated op
library's cost functions (the same `bind` the daemon checks launches with), numerics left out.

A 7B model's step is ~340 kernels; a simulated hour of 16 NPUs is millions of steps, so costs are kept per step
shape: the whole forward pass once per decode bucket or prefill token count, one layer of it as the template of
every layer after the first; only attention depends on the requests' lengths, and it is costed per step. With
`fold` > 1, `fold` consecutive layers' launches of one kernel become one task (Cost.repeated: the same blocks run
them back to back), so events drop `fold`-fold; what is lost is interleaving inside those layers (another stream's
kernel can start only between tasks), which bench pd measures against fold 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from npu.emulated.ops import bind
from npu.emulated.ops.base import REGISTRY
from npu.tasks import Cost
from workloads.batching import StepKind, StepPlan
from workloads.model import CONTEXT_KV, CacheConfig, Decode, ModelConfig, OpCall, Prefill, forward

ATTENTION = {"PromptFlashAttention", "IncreFlashAttention"}


def _attends(call: OpCall) -> bool:
    """An attention kernel, or a chunk's gather of its context for one (the slot whose cost depends on lengths)."""
    return call.op in ATTENTION or call.outs[0].buffer in CONTEXT_KV


@dataclass(frozen=True, slots=True)
class SimTask:
    """A task with a cost and no numerics."""

    name: str
    price: Cost

    def cost(self) -> Cost:
        return self.price

    def run(self) -> None:
        pass


def _repeats_attention(call: OpCall, before: OpCall | None) -> bool:
    return call.op in ATTENTION and before is not None and before.op in ATTENTION


def _cost(call: OpCall) -> Cost:
    return bind(call.op, [t.spec for t in call.ins], [t.spec for t in call.outs], call.attrs).cost


class StepCosts:
    def __init__(self, config: ModelConfig, cache: CacheConfig, max_blocks: int, fold: int = 1) -> None:
        layers = config.num_hidden_layers
        if fold < 1 or layers % fold:
            raise ValueError(f"fold {fold} must divide the {layers} layers of {config.name}")
        self.config, self.cache, self.max_blocks, self.fold = config, cache, max_blocks, fold
        # Sizes of the pass: the ops before the first layer, per layer, after the last (from 1- and 2-layer passes).
        one, two = (len(forward(replace(config, num_hidden_layers=n), cache, Decode((1,), 1))) for n in (1, 2))
        self.per_layer = two - one
        self.pre = 3  # the embedding and the two rotary-table gathers
        self._shapes: dict[tuple, tuple] = {}
        self._decode: dict[int, OpCall] = {}  # a decode bucket's attention call
        self._prefill: dict[tuple[int, int], tuple[Cost, ...]] = {}  # one prompt's or chunk's, by (tokens, start)

    def tasks(self, plan: StepPlan) -> list[SimTask]:
        if plan.kind is StepKind.DECODE:
            lens = tuple(e.start + 1 for e in plan.entries) + (1,) * plan.padding  # padding decodes a scratch block
            shape = self._shape(Decode((1,) * len(lens), self.max_blocks))
            return self._assemble(shape, self._attention(Decode(lens, self.max_blocks)))
        chunks = tuple(e.num_tokens for e in plan.entries)  # prompts, or chunks of them after their `start` tokens
        shape = self._shape(Prefill((sum(chunks) - len(chunks) + 1,) + (1,) * (len(chunks) - 1)))
        return self._assemble(shape, self._attention(Prefill(chunks, tuple(e.start for e in plan.entries))))

    def _shape(self, step: Prefill | Decode) -> tuple[list[SimTask], list[SimTask], list[SimTask]]:
        """(the ops before the layers, a layer's ops folded, the ops after); attention is left as a slot (its
        cost depends on the lengths). Every layer is costed as the second is: the first differs only in adding
        no residual into its first norm. Kept per batch shape: tokens and requests (what the GEMMs and the
        sampling ops depend on)."""
        key = (type(step), step.tokens, step.batch)
        if key not in self._shapes:
            calls = forward(replace(self.config, num_hidden_layers=2), self.cache, step)
            # One attention slot per layer, however many prompts (a prefill has one attention call per prompt).
            two = [c for c, before in zip(calls, [None, *calls], strict=False) if not _repeats_attention(c, before)]
            layer = self.pre + self.per_layer
            parts = two[: self.pre], two[layer : layer + self.per_layer], two[layer + self.per_layer :]
            fold = (1, self.fold, 1)
            self._shapes[key] = tuple(
                [SimTask(c.op, None if c.op in ATTENTION else _cost(c).repeated(n)) for c in part]
                for part, n in zip(parts, fold, strict=True)
            )
        return self._shapes[key]

    def _attention(self, step: Prefill | Decode) -> tuple[Cost, ...]:
        """One layer's attention kernels for these lengths, folded: a decode step's one kernel (its cost from
        the bucket's call with this step's lengths), a prefill step's one per prompt or chunk, after a chunk's
        gathers of its context (kept per length and start)."""
        if isinstance(step, Decode):
            if step.batch not in self._decode:
                (self._decode[step.batch],) = self._layer_calls(Decode((1,) * step.batch, self.max_blocks))
            call = self._decode[step.batch]
            attrs = dict(call.attrs, actual_seq_lengths=list(step.context_lens))
            cost = REGISTRY[call.op].cost([t.spec for t in call.ins], [t.spec for t in call.outs], attrs)
            return (cost.repeated(self.fold),)
        return tuple(
            cost
            for n, start in zip(step.prompt_lens, step.starts, strict=True)
            for cost in self._prefill_attention(n, start)
        )

    def _prefill_attention(self, n: int, start: int) -> tuple[Cost, ...]:
        key = (n, start)
        if key not in self._prefill:
            calls = self._layer_calls(Prefill((n,), (start,)))
            self._prefill[key] = tuple(_cost(c).repeated(self.fold) for c in calls)
        return self._prefill[key]

    def _layer_calls(self, step: Prefill | Decode) -> list[OpCall]:
        """The attention slot's calls in a one-layer pass of this step."""
        calls = forward(replace(self.config, num_hidden_layers=1), self.cache, step)
        return [c for c in calls if _attends(c)]

    def _assemble(self, shape, attention: tuple[Cost, ...]) -> list[SimTask]:
        pre, layer, post = shape
        tasks = []
        for task in layer:
            if task.price is None:  # the attention slot: one kernel per prompt (prefill), or one (decode)
                tasks += [SimTask(task.name, c) for c in attention]
            else:
                tasks.append(task)
        return pre + tasks * (self.config.num_hidden_layers // self.fold) + post
