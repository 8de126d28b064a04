"""Mixture-of-experts: routing (DeepSeek-V3's grouped top-k gate), token dispatch to the experts and combine back
(all-to-all over the supernode's network under expert parallelism), and the experts' grouped INT8 matmul.

Expert parallelism: an EP group of `ep` dies holds the routed experts, `experts` of them on each die. A die's
tokens go to the dies of their top-k experts (dispatch), each die runs its experts over the rows it received
(GroupedMatMul, rows sorted by expert), and the rows return to their tokens weighted by the gate (combine). How
many rows a die receives (attr `received`) depends on the routing of the whole group: the caller gives it (its
mean, or its slowest die's). Numerics exist for ep = 1 (a die holding every expert: dispatch sorts the token-expert
pairs by expert, combine puts them back) — what a numeric test of the architecture needs. The ops' costs are a
die's own work: HBM traffic, and the rows it sends or receives across the network (peer bytes); the network's
latency is the supernode model's (sim/cloudmatrix/network.py).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, streaming_cost, widen
from npu.emulated.ops.quant import I8, int8_gemm_cost, out_dtype
from npu.tasks import Unit

F32, I32 = np.dtype(np.float32), np.dtype(np.int32)


def _positive(op: str, attrs: dict, name: str, default: int | None = None) -> int:
    value = int(attrs.get(name, default if default is not None else 0))
    if value <= 0:
        raise operand_error(op, f"attr {name}", f"must be > 0, got {value}")
    return value


@register
class MoeGatingTopK(Op):
    """DeepSeek-V3's router (noaux_tc): scores = sigmoid(logits); experts are chosen by scores + bias
    (the load-balancing bias), among the `topk_groups` of `groups` expert groups whose two best biased scores sum
    highest; the chosen experts' unbiased scores, normalized to sum 1 if attr norm (default true), times
    `routed_scaling_factor`, are the weights. ins: logits [T, E], bias float32 [E]; outs: weights float32 [T, k],
    expert ids int32 [T, k] (best first). attrs: k, groups (default 1), topk_groups (default groups)."""

    name = "MoeGatingTopK"
    inputs = (2, 2)

    def _geometry(self, ins, attrs) -> tuple[int, int, int, int, int]:
        logits, bias = ins
        if logits.dtype not in dtypes.FLOATS or len(logits.shape) != 2:
            raise operand_error(self.name, "logits", f"is {logits}; it must be float [T, experts]")
        t, e = logits.shape
        if bias != TensorSpec(F32, (e,)):
            raise operand_error(self.name, "bias", f"is {bias}; it must be float32 [{e}]")
        k = _positive(self.name, attrs, "k")
        groups = _positive(self.name, attrs, "groups", 1)
        topk_groups = _positive(self.name, attrs, "topk_groups", groups)
        if e % groups or topk_groups > groups or k > topk_groups * (e // groups):
            raise operand_error(
                self.name, "attrs", f"k={k} of {e} experts in {topk_groups} of {groups} groups does not fit"
            )
        return t, e, k, groups, topk_groups

    def infer(self, ins, attrs, outs):
        t, _, k, _, _ = self._geometry(ins, attrs)
        return [TensorSpec(F32, (t, k)), TensorSpec(I32, (t, k))]

    def compute(self, ins, attrs):
        t, e, k, groups, topk_groups = self._geometry([TensorSpec(a.dtype, a.shape) for a in ins], attrs)
        scores = 1.0 / (1.0 + np.exp(-widen(ins[0]).astype(np.float32)))
        biased = scores + ins[1][None, :]
        by_group = biased.reshape(t, groups, e // groups)
        group_score = np.sort(by_group, axis=-1)[..., -2:].sum(-1) if e // groups > 1 else by_group[..., 0]
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :topk_groups]
        allowed = np.zeros((t, groups), bool)
        np.put_along_axis(allowed, keep, True, axis=-1)
        masked = np.where(np.repeat(allowed, e // groups, axis=-1), biased, -np.inf)
        ids = np.argsort(-masked, axis=-1, kind="stable")[:, :k]
        weights = np.take_along_axis(scores, ids, axis=-1)
        if attrs.get("norm", True):
            weights = weights / weights.sum(-1, keepdims=True)
        weights = weights * float(attrs.get("routed_scaling_factor", 1.0))
        return [weights.astype(np.float32), ids.astype(np.int32)]

    def cost(self, ins, outs, attrs):
        rows = ins[0].shape[0]
        return streaming_cost(sum(t.nbytes for t in (*ins, *outs)), tiles=max(rows, 1))


def _rows(op: str, attrs: dict, t: int, k: int) -> tuple[int, int, int]:
    """(ep, local experts, rows received) of a dispatch or combine; at ep 1 every token-expert pair is local."""
    ep = _positive(op, attrs, "ep", 1)
    experts = _positive(op, attrs, "experts")
    received = int(attrs.get("received", t * k))
    if received < 0 or (ep == 1 and received != t * k):
        raise operand_error(op, "attr received", f"{received} rows; at ep 1 a die receives its {t}x{k} pairs")
    return ep, experts, received


@register
class MoeDispatch(Op):
    """Send each token's row to its top-k experts' dies. ins: x int8 [T, H], x_scale float32 [T], expert ids
    int32 [T, k]; outs: rows int8 [R, H] sorted by local expert, their scales float32 [R], rows per local expert
    int32 [experts], and each row's source (t * k + j) int32 [R], which combine needs. attrs: experts (local),
    ep (default 1), received (R; default T * k, the only value at ep 1)."""

    name = "MoeDispatch"
    inputs = (3, 3)

    def _geometry(self, ins, attrs):
        x, scale, ids = ins
        if x.dtype != I8 or len(x.shape) != 2:
            raise operand_error(self.name, "x", f"is {x}; it must be int8 [T, hidden]")
        t, h = x.shape
        if scale != TensorSpec(F32, (t,)):
            raise operand_error(self.name, "x_scale", f"is {scale}; it must be float32 [{t}]")
        if ids.dtype != I32 or len(ids.shape) != 2 or ids.shape[0] != t:
            raise operand_error(self.name, "expert_ids", f"is {ids}; it must be int32 [{t}, k]")
        return (t, h, ids.shape[1], *_rows(self.name, attrs, t, ids.shape[1]))

    def infer(self, ins, attrs, outs):
        _, h, _, _, experts, r = self._geometry(ins, attrs)
        return [TensorSpec(I8, (r, h)), TensorSpec(F32, (r,)), TensorSpec(I32, (experts,)), TensorSpec(I32, (r,))]

    def compute(self, ins, attrs):
        x, scale, ids = ins
        k, experts = ids.shape[1], int(attrs["experts"])
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= experts):
            raise operand_error(self.name, "expert_ids", f"values outside [0, {experts})")
        order = np.argsort(flat, kind="stable").astype(np.int32)
        counts = np.bincount(flat, minlength=experts).astype(np.int32)
        return [x[order // k], scale[order // k], counts, order]

    def cost(self, ins, outs, attrs):
        t, h, k, ep, _, r = self._geometry(ins, attrs)
        row = h * I8.itemsize + F32.itemsize
        cost = streaming_cost(t * row + ins[2].nbytes + r * row + outs[3].nbytes, tiles=max(r, 1))
        return _networked(cost, t * k * row if ep > 1 else 0)


@register
class MoeCombine(Op):
    """Return the experts' output rows to their tokens, weighted by the gate, summed over the token's k experts.
    ins: rows [R, H] float, sources int32 [R] (dispatch's), weights float32 [T, k]; out [T, H] in the rows'
    dtype. attrs as dispatch's."""

    name = "MoeCombine"
    inputs = (3, 3)

    def _geometry(self, ins, attrs):
        y, source, weights = ins
        if y.dtype not in dtypes.FLOATS or len(y.shape) != 2:
            raise operand_error(self.name, "rows", f"is {y}; it must be float [R, hidden]")
        if weights.dtype != F32 or len(weights.shape) != 2:
            raise operand_error(self.name, "weights", f"is {weights}; it must be float32 [T, k]")
        t, k = weights.shape
        ep, experts, r = _rows(self.name, attrs, t, k)
        if y.shape[0] != r or source != TensorSpec(I32, (r,)):
            raise operand_error(self.name, "rows", f"{y} with sources {source}: expected {r} rows (attr received)")
        return t, y.shape[1], k, ep, r

    def infer(self, ins, attrs, outs):
        t, h, _, _, _ = self._geometry(ins, attrs)
        return [TensorSpec(ins[0].dtype, (t, h))]

    def compute(self, ins, attrs):
        y, source, weights = ins
        t, k = weights.shape
        flat = np.zeros((t * k, y.shape[1]), np.float32)
        flat[source] = widen(y)
        return [(flat.reshape(t, k, -1) * weights[..., None]).sum(axis=1)]

    def cost(self, ins, outs, attrs):
        t, h, k, ep, r = self._geometry(ins, attrs)
        row = h * ins[0].dtype.itemsize
        cost = streaming_cost(r * row + ins[1].nbytes + ins[2].nbytes + t * k * row + outs[0].nbytes, tiles=t)
        return _networked(cost, t * k * row if ep > 1 else 0)


def _networked(cost, peer_bytes: int):
    """A vector kernel whose rows also cross the network (dispatch and combine push them over the UB)."""
    return replace(cost, peer_bytes=peer_bytes, unit=Unit.VECTOR)


@register
class GroupedMatMul(Op):
    """The experts of a die, each over its rows: x int8 [R, K] (rows sorted by expert), w int8 [E, N, K], x_scale
    float32 [R], w_scale float32 [E, N], rows per expert int32 [E] -> out [R, N] in attr dtype (default bfloat16).
    Dequantized as QuantMatMul."""

    name = "GroupedMatMul"
    inputs = (5, 5)

    def _dims(self, ins):
        x, w, xs, ws, counts = ins
        if x.dtype != I8 or len(x.shape) != 2 or w.dtype != I8 or len(w.shape) != 3:
            raise operand_error(self.name, "x/w", f"are {x} and {w}; they must be int8 [R, K] and [E, N, K]")
        (r, k), (e, n, k2) = x.shape, w.shape
        if k != k2:
            raise operand_error(self.name, "w", f"contraction size {k2} does not match x's {k}")
        for name, spec, want in (("x_scale", xs, (r,)), ("w_scale", ws, (e, n))):
            if spec != TensorSpec(F32, want):
                raise operand_error(self.name, name, f"is {spec}; it must be float32 {list(want)}")
        if counts != TensorSpec(I32, (e,)):
            raise operand_error(self.name, "group_list", f"is {counts}; it must be int32 [{e}]")
        return r, k, n, e

    def infer(self, ins, attrs, outs):
        r, _, n, _ = self._dims(ins)
        return [TensorSpec(out_dtype(self.name, attrs), (r, n))]

    def compute(self, ins, attrs):
        x, w, xs, ws, counts = ins
        if counts.min(initial=0) < 0 or counts.sum() != x.shape[0]:
            raise operand_error(self.name, "group_list", f"{counts.tolist()} does not add up to {x.shape[0]} rows")
        out = np.zeros((x.shape[0], w.shape[1]), np.float32)
        start = 0
        for e, n in enumerate(counts.tolist()):
            rows = slice(start, start + n)
            acc = x[rows].astype(np.int64) @ w[e].astype(np.int64).T
            out[rows] = acc.astype(np.float32) * xs[rows, None] * ws[e][None, :]
            start += n
        return [out]

    def cost(self, ins, outs, attrs):
        r, k, n, e = self._dims(ins)
        return int8_gemm_cost(ins, outs, e, max(1, math.ceil(r / e)), k, n)
