"""LLM attention and rotary embeddings: the ops that mark the prefill and decode phases.

Layouts (attr input_layout): "BSH" (default) — query [B, S, N*D], key/value [B, S_kv, N_kv*D]; or "BNSD" —
[B, N, S, D] and [B, N_kv, S_kv, D]. Grouped-query attention: N_kv divides N and each KV head serves N/N_kv
query heads. attr scale_value defaults to 1/sqrt(D).
"""

from __future__ import annotations

import numpy as np

from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, same_dtype, widen
from npu.tasks import Cost

UNBOUNDED = 2147483647


def _heads(op: str, attrs: dict) -> tuple[int, int]:
    n = int(attrs.get("num_heads", 0))
    n_kv = int(attrs.get("num_key_value_heads", 0)) or n
    if n <= 0:
        raise operand_error(op, "attr num_heads", "is required and must be > 0")
    if n % n_kv:
        raise operand_error(op, "attr num_key_value_heads", f"{n_kv} does not divide num_heads {n}")
    return n, n_kv


def _split(op: str, spec: TensorSpec, heads: int, layout: str, name: str) -> tuple[int, int, int]:
    """(batch, sequence, head_dim) of an operand."""
    if layout == "BSH":
        if len(spec.shape) != 3 or spec.shape[2] % heads:
            raise operand_error(op, name, f"shape {list(spec.shape)} is not [B, S, {heads}*D] (layout BSH)")
        return spec.shape[0], spec.shape[1], spec.shape[2] // heads
    if layout == "BNSD":
        if len(spec.shape) != 4 or spec.shape[1] != heads:
            raise operand_error(op, name, f"shape {list(spec.shape)} is not [B, {heads}, S, D] (layout BNSD)")
        return spec.shape[0], spec.shape[2], spec.shape[3]
    raise operand_error(op, "attr input_layout", f"{layout!r} is not BSH or BNSD")


def _to_bnsd(x: np.ndarray, heads: int, layout: str) -> np.ndarray:
    if layout == "BNSD":
        return x
    b, s, h = x.shape
    return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)


def _from_bnsd(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "BNSD":
        return x
    b, n, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)


class Attention(Op):
    def _shapes(self, ins, attrs):
        n, n_kv = _heads(self.name, attrs)
        layout = str(attrs.get("input_layout", "BSH"))
        same_dtype(self.name, ins[:3], ("query", "key", "value"))
        b, s, d = _split(self.name, ins[0], n, layout, "query")
        for name, spec in (("key", ins[1]), ("value", ins[2])):
            bk, s_kv, dk = _split(self.name, spec, n_kv, layout, name)
            if (bk, dk) != (b, d):
                raise operand_error(self.name, name, f"batch/head_dim {bk}/{dk} differ from query's {b}/{d}")
        return n, n_kv, layout, b, s, s_kv, d

    def infer(self, ins, attrs, outs):
        self._shapes(ins, attrs)
        return [ins[0]]

    def _attend(self, q, k, v, attrs, mask: np.ndarray | None):
        n, n_kv, layout = int(attrs["num_heads"]), int(attrs.get("num_key_value_heads", 0)), attrs.get("input_layout")
        layout = str(layout or "BSH")
        n_kv = n_kv or n
        q = _to_bnsd(widen(q), n, layout)
        k = np.repeat(_to_bnsd(widen(k), n_kv, layout), n // n_kv, axis=1)
        v = np.repeat(_to_bnsd(widen(v), n_kv, layout), n // n_kv, axis=1)
        scale = float(attrs.get("scale_value", 1.0 / np.sqrt(q.shape[-1])))
        scores = (q @ np.swapaxes(k, -1, -2)) * scale
        if mask is not None:
            scores = np.where(mask, -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        return [_from_bnsd(weights @ v, layout)]


@register
class PromptFlashAttention(Attention):
    """Prefill attention over the whole prompt. Masking: an optional 4th input atten_mask (nonzero =
    masked, broadcastable to [B, N, S, S_kv]); and the band attrs pre_tokens / next_tokens (query i may see
    key j when -pre_tokens <= j - i <= next_tokens; next_tokens = 0 is causal; both default unbounded)."""

    name = "PromptFlashAttention"
    inputs = (3, 4)
    MASK_TYPES = (np.dtype(np.bool_), np.dtype(np.int8), np.dtype(np.uint8))

    def infer(self, ins, attrs, outs):
        n, _, _, b, s, s_kv, _ = self._shapes(ins, attrs)
        if len(ins) == 4:
            mask, full = ins[3], (b, n, s, s_kv)
            try:
                fits = tuple(np.broadcast_shapes(mask.shape, full)) == full
            except ValueError:
                fits = False
            if not fits or mask.dtype not in self.MASK_TYPES:
                raise operand_error(
                    self.name, "atten_mask", f"is {mask}; it must be bool/int8/uint8 broadcastable to {list(full)}"
                )
        return [ins[0]]

    def _band(self, s: int, s_kv: int, attrs) -> np.ndarray | None:
        pre, nxt = int(attrs.get("pre_tokens", UNBOUNDED)), int(attrs.get("next_tokens", UNBOUNDED))
        if pre >= s - 1 and nxt >= s_kv - 1:  # j - i spans -(s-1) .. s_kv-1: the band hides nothing
            return None
        offset = np.arange(s_kv)[None, :] - np.arange(s)[:, None]
        return (offset > nxt) | (offset < -pre)

    def compute(self, ins, attrs):
        q, k, v = ins[:3]
        n = int(attrs["num_heads"])
        layout = str(attrs.get("input_layout", "BSH"))
        s, s_kv = _to_bnsd(q, n, layout).shape[2], (k.shape[1] if layout == "BSH" else k.shape[2])
        mask = self._band(s, s_kv, attrs)
        if len(ins) == 4:
            user = ins[3].astype(bool)
            mask = user if mask is None else (mask | user)
        return self._attend(q, k, v, attrs, mask)

    def cost(self, ins, outs, attrs):
        n, _, _, b, s, s_kv, d = self._shapes(ins, attrs)
        band = self._band(s, s_kv, attrs)
        visible = s * s_kv if band is None else int((~band).sum())
        return Cost(flops=4.0 * b * n * visible * d, hbm_bytes=sum(t.nbytes for t in (*ins, *outs)))


@register
class IncreFlashAttention(Attention):
    """Decode attention: query length 1 against each request's KV cache. attr actual_seq_lengths (one per
    batch entry, default the whole cache) limits how much of each cache is read."""

    name = "IncreFlashAttention"
    inputs = (3, 3)

    def _lengths(self, b: int, s_kv: int, attrs) -> list[int]:
        lengths = [int(x) for x in attrs.get("actual_seq_lengths", [s_kv] * b)]
        if len(lengths) != b or any(not 0 < n <= s_kv for n in lengths):
            raise operand_error(
                self.name, "attr actual_seq_lengths", f"{lengths} is not {b} lengths in 1..{s_kv} (the cache size)"
            )
        return lengths

    def infer(self, ins, attrs, outs):
        _, _, _, b, s, s_kv, _ = self._shapes(ins, attrs)
        if s != 1:
            raise operand_error(self.name, "query", f"has sequence length {s}; decode attention takes 1")
        self._lengths(b, s_kv, attrs)
        return [ins[0]]

    def compute(self, ins, attrs):
        q, k, v = ins
        layout = str(attrs.get("input_layout", "BSH"))
        seq_axis = 1 if layout == "BSH" else 2
        lengths = self._lengths(q.shape[0], k.shape[seq_axis], attrs)
        # Each request reads only its own tokens: whatever lies past its length in the cache is never touched.
        rows = [
            self._attend(q[i : i + 1], k[i : i + 1].take(range(n), seq_axis), v[i : i + 1].take(range(n), seq_axis),
                         attrs, None)[0]
            for i, n in enumerate(lengths)
        ]  # fmt: skip
        return [np.concatenate(rows, axis=0)]

    def cost(self, ins, outs, attrs):
        n, n_kv, _, b, _, s_kv, d = self._shapes(ins, attrs)
        total = sum(self._lengths(b, s_kv, attrs))
        kv_bytes = 2 * total * n_kv * d * ins[1].dtype.itemsize
        return Cost(flops=4.0 * n * total * d, hbm_bytes=ins[0].nbytes + outs[0].nbytes + kv_bytes)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    a, b = np.split(x, 2, axis=-1)
    return np.concatenate([-b, a], axis=-1)


def _check_rotary(op: str, x: TensorSpec, x_name: str, tables: list[tuple[str, TensorSpec]]) -> None:
    if x.shape[-1] % 2:
        raise operand_error(op, x_name, f"last dim {x.shape[-1]} is odd; rotary needs pairs")
    for name, r in tables:
        try:
            fits = tuple(np.broadcast_shapes(x.shape, r.shape)) == x.shape
        except ValueError:
            fits = False
        if not fits:
            raise operand_error(op, name, f"shape {list(r.shape)} does not broadcast to {x_name} {list(x.shape)}")


@register
class RotaryMul(Op):
    """x * r1 + rotate_half(x) * r2 (r1 = cos, r2 = sin, broadcast to x)."""

    name = "RotaryMul"
    inputs = (3, 3)

    def infer(self, ins, attrs, outs):
        same_dtype(self.name, ins, ("x", "r1", "r2"))
        _check_rotary(self.name, ins[0], "x", [("r1", ins[1]), ("r2", ins[2])])
        return [ins[0]]

    def compute(self, ins, attrs):
        x, cos, sin = (widen(a) for a in ins)
        return [x * cos + _rotate_half(x) * sin]


@register
class ApplyRotaryPosEmb(Op):
    """RotaryMul on query and key with the same cos and sin (layout BSND); outputs query and key."""

    name = "ApplyRotaryPosEmb"
    inputs = (4, 4)

    def infer(self, ins, attrs, outs):
        q, k, cos, sin = ins
        same_dtype(self.name, ins, ("query", "key", "cos", "sin"))
        for name, x in (("query", q), ("key", k)):
            _check_rotary(self.name, x, name, [("cos", cos), ("sin", sin)])
        return [q, k]

    def compute(self, ins, attrs):
        q, k, cos, sin = (widen(a) for a in ins)
        return [q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin]
