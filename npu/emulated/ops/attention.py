"""LLM attention and rotary embeddings: the ops that mark the prefill and decode phases.

Layouts (attr input_layout): "BSH" (default) — query [B, S, N*D], key/value [B, S_kv, N_kv*D]; or "BNSD" —
[B, N, S, D] and [B, N_kv, S_kv, D]. Grouped-query attention: N_kv divides N and each KV head serves N/N_kv
query heads. attr scale_value defaults to 1/sqrt(D).
"""

from __future__ import annotations

import numpy as np

from npu.emulated import dtypes
from npu.emulated.ops.base import Op, TensorSpec, operand_error, register, same_dtype, widen
from npu.errors import InvalidParam
from npu.tasks import Cost, Unit

UNBOUNDED = 2147483647

# Prompt attention cuts the queries of each (batch, head) into blocks of FA_QUERY_BLOCK rows, the query tile
# of the PTO flash attention kernel for A2/A3 (S0 = 128); the blocks are the tiles the cores share.
FA_QUERY_BLOCK = 128
# Cube efficiency of a query block over its key loop: FA_EFF_MAX * L / (L + FA_L0), L the keys a query row
# sees on average. Fitted to the per-core figures of the hand-written PTO flash attention on one A2/A3 core
# (1 AIC + 2 AIV), S0 = 128, D = 128 (github.com/cannmirror/pto-isa, kernels/manual/a2a3/flash_atten/README.md):
# S1 = 4096 -> 6.13 TFLOPS, 8192 -> 7.20 TFLOPS of the core's 14.75 (0.42, 0.49). Check against torch_npu's
# fused attention on a 910B2 (pto-isa demos/torch_jit/flash/README.md, B = 1, one head, D = 128): Sq x Sk =
# 3072 x 16384 measured 221 us wall (156 us less the ~65 us wall floor of a tiny call), modeled 139 us;
# 2048 x 16384 measured 177 us (111 us), modeled 139 us. Measurements are few and noisy: treat as +-30 %.
FA_EFF_MAX = 0.59
FA_L0 = 1640
# Rows of scores the numeric kernel holds at once, as elements (B x N x rows x S_kv float32): memory stays
# O(chunk x S_kv) however long the prompt.
SCORE_CHUNK = 1 << 22
# Decode attention (flash decoding): each (batch, KV head) cache is cut into splits of at most
# IFA_SPLIT_TOKENS tokens read by different cores, their partial softmaxes combined at the end, so a long
# cache of a small batch still spreads over the chip. Not calibrated: no public IncreFlashAttention
# measurement on 910B was found; the split length is this model's choice (memory-bound either way).
IFA_SPLIT_TOKENS = 512


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

    def _attend(self, q, k, v, attrs, mask=None):
        """Softmax attention in chunks of query rows; `mask(start, stop)` gives the masked (True) keys of
        rows start..stop-1, broadcastable to [B, N, rows, S_kv], or None."""
        n, n_kv, layout = int(attrs["num_heads"]), int(attrs.get("num_key_value_heads", 0)), attrs.get("input_layout")
        layout = str(layout or "BSH")
        n_kv = n_kv or n
        q = _to_bnsd(widen(q), n, layout)
        k = np.repeat(_to_bnsd(widen(k), n_kv, layout), n // n_kv, axis=1)
        v = np.repeat(_to_bnsd(widen(v), n_kv, layout), n // n_kv, axis=1)
        scale = float(attrs.get("scale_value", 1.0 / np.sqrt(q.shape[-1])))
        b, _, s, _ = q.shape
        out = np.empty(q.shape[:3] + v.shape[-1:], np.result_type(q, v))
        rows = max(1, SCORE_CHUNK // max(b * n * k.shape[2], 1))
        for start in range(0, s, rows):
            stop = min(start + rows, s)
            scores = (q[:, :, start:stop] @ np.swapaxes(k, -1, -2)) * scale
            masked = mask(start, stop) if mask is not None else None
            if masked is not None:
                scores = np.where(masked, -np.inf, scores)
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores, out=scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            out[:, :, start:stop] = weights @ v
        return [_from_bnsd(out, layout)]

    def _mix_cost(self, flops: float, hbm_bytes: float, tiles: int, keys_per_row: float) -> Cost:
        efficiency = FA_EFF_MAX * keys_per_row / (keys_per_row + FA_L0) if keys_per_row else FA_EFF_MAX
        return Cost(flops=flops, hbm_bytes=hbm_bytes, unit=Unit.MIX, tiles=max(tiles, 1), efficiency=efficiency)


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

    @staticmethod
    def _window(attrs) -> tuple[int, int]:
        return int(attrs.get("pre_tokens", UNBOUNDED)), int(attrs.get("next_tokens", UNBOUNDED))

    def compute(self, ins, attrs):
        q, k, v = ins[:3]
        pre, nxt = self._window(attrs)
        user = None
        if len(ins) == 4:  # as [B|1, N|1, S|1, S_kv|1], so its query rows can be sliced
            user = ins[3].astype(bool)
            user = user.reshape((1,) * (4 - user.ndim) + user.shape)
        s_kv = k.shape[1] if str(attrs.get("input_layout", "BSH")) == "BSH" else k.shape[2]

        def mask(start: int, stop: int) -> np.ndarray:
            offset = np.arange(s_kv)[None, :] - np.arange(start, stop)[:, None]  # j - i
            band = (offset > nxt) | (offset < -pre)
            if user is not None:
                band = band | (user if user.shape[2] == 1 else user[:, :, start:stop])
            return band

        return self._attend(q, k, v, attrs, mask)

    def cost(self, ins, outs, attrs):
        n, _, _, b, s, s_kv, d = self._shapes(ins, attrs)
        visible = band_pairs(s, s_kv, *self._window(attrs))
        return self._mix_cost(
            flops=4.0 * b * n * visible * d,
            hbm_bytes=sum(t.nbytes for t in (*ins, *outs)),  # the mask, if any, is read once too
            tiles=b * n * -(-s // FA_QUERY_BLOCK),
            keys_per_row=visible / s,
        )


def band_pairs(s: int, s_kv: int, pre: int, nxt: int) -> int:
    """How many (query i, key j), 0 <= i < s, 0 <= j < s_kv, satisfy -pre <= j - i <= nxt: in O(1)."""
    return max(0, _pairs_upto(s, s_kv, nxt) - _pairs_upto(s, s_kv, -pre - 1))


def _pairs_upto(s: int, s_kv: int, h: int) -> int:
    """Pairs with j - i <= h: row i sees clamp(i + h + 1, 0, s_kv) keys; summed over the s rows."""

    def clamped(count: int) -> int:  # sum of clamp(t, 0, s_kv) over t = 0 .. count - 1
        count = max(count, 0)
        linear = min(count, s_kv + 1)
        return linear * (linear - 1) // 2 + s_kv * (count - linear)

    return clamped(h + 1 + s) - clamped(h + 1)


@register
class IncreFlashAttention(Attention):
    """Decode attention: query length 1 against each request's KV cache. attr actual_seq_lengths (one per
    batch entry, default the whole cache) limits how much of each cache is read.

    Paged mode (Ascend's PagedAttention layout), when a 4th input block_table (int32 [B, max_blocks]) is given:
    key and value are pools of blocks [num_blocks, block_size, N_kv*D] (layout BSH) shared by every request,
    attr block_size is their length, and request b's token t lies in block block_table[b, t // block_size], row
    t % block_size. A request's capacity is max_blocks * block_size; table entries past its length are unread."""

    name = "IncreFlashAttention"
    inputs = (3, 4)

    def _lengths(self, b: int, s_kv: int, attrs) -> list[int]:
        lengths = [int(x) for x in attrs.get("actual_seq_lengths", [s_kv] * b)]
        if len(lengths) != b or any(not 0 < n <= s_kv for n in lengths):
            raise operand_error(
                self.name, "attr actual_seq_lengths", f"{lengths} is not {b} lengths in 1..{s_kv} (the cache size)"
            )
        return lengths

    def _geometry(self, ins, attrs) -> tuple[int, int, int, int, list[int]]:
        """(N, N_kv, B, D, each request's length), checked."""
        if len(ins) == 3:
            n, n_kv, _, b, s, s_kv, d = self._shapes(ins, attrs)
        else:
            n, n_kv, b, s, s_kv, d = self._paged_shapes(ins, attrs)
        if s != 1:
            raise operand_error(self.name, "query", f"has sequence length {s}; decode attention takes 1")
        return n, n_kv, b, d, self._lengths(b, s_kv, attrs)

    def _paged_shapes(self, ins, attrs) -> tuple[int, int, int, int, int, int]:
        n, n_kv = _heads(self.name, attrs)
        if str(attrs.get("input_layout", "BSH")) != "BSH":
            raise operand_error(self.name, "attr input_layout", "paged mode (a block_table input) takes BSH")
        same_dtype(self.name, ins[:3], ("query", "key", "value"))
        b, s, d = _split(self.name, ins[0], n, "BSH", "query")
        block_size = int(attrs.get("block_size", 0))
        if block_size <= 0:
            raise operand_error(self.name, "attr block_size", "is required in paged mode and must be > 0")
        for name, spec in (("key", ins[1]), ("value", ins[2])):
            if len(spec.shape) != 3 or spec.shape[1:] != (block_size, n_kv * d):
                raise operand_error(
                    self.name, name, f"shape {list(spec.shape)} is not [num_blocks, {block_size}, {n_kv * d}] (paged)"
                )
        table = ins[3]
        if table.dtype != np.int32 or len(table.shape) != 2 or table.shape[0] != b:
            raise operand_error(self.name, "block_table", f"is {table}; it must be int32 [{b}, max_blocks]")
        return n, n_kv, b, s, table.shape[1] * block_size, d

    def infer(self, ins, attrs, outs):
        self._geometry(ins, attrs)
        return [ins[0]]

    def compute(self, ins, attrs):
        q, k, v = ins[:3]
        layout = str(attrs.get("input_layout", "BSH"))
        if len(ins) == 4:
            lengths = self._lengths(q.shape[0], ins[3].shape[1] * k.shape[1], attrs)
            cache = _paged_reader(ins[3], k.shape[0], k.shape[1])
        else:
            seq_axis = 1 if layout == "BSH" else 2
            lengths = self._lengths(q.shape[0], k.shape[seq_axis], attrs)

            def cache(pool, i, n):
                return pool[i : i + 1].take(range(n), seq_axis)

        # Each request reads only its own tokens: whatever lies past its length in the cache is never touched.
        rows = [
            self._attend(q[i : i + 1], cache(k, i, n), cache(v, i, n), attrs, None)[0] for i, n in enumerate(lengths)
        ]
        return [np.concatenate(rows, axis=0)]

    def cost(self, ins, outs, attrs):
        n, n_kv, b, d, lengths = self._geometry(ins, attrs)
        total = sum(lengths)
        kv_bytes = 2 * total * n_kv * d * ins[1].dtype.itemsize  # only the tokens in use, paged or not
        table_bytes = ins[3].nbytes if len(ins) == 4 else 0
        return self._mix_cost(
            flops=4.0 * n * total * d,
            hbm_bytes=ins[0].nbytes + outs[0].nbytes + kv_bytes + table_bytes,
            tiles=n_kv * sum(-(-length // IFA_SPLIT_TOKENS) for length in lengths),
            keys_per_row=total / b,
        )


def _paged_reader(table: np.ndarray, num_blocks: int, block_size: int):
    """reader(pool, i, n): request i's first n tokens, [1, n, N_kv*D], gathered from its blocks of `pool`."""

    def read(pool: np.ndarray, i: int, n: int) -> np.ndarray:
        blocks = table[i, : -(-n // block_size)]
        if blocks.min() < 0 or blocks.max() >= num_blocks:
            raise InvalidParam(f"IncreFlashAttention block_table: row {i} names blocks outside [0, {num_blocks})")
        return pool[blocks].reshape(1, -1, pool.shape[-1])[:, :n]

    return read


def _rotate_half(x: np.ndarray) -> np.ndarray:
    a, b = np.split(x, 2, axis=-1)
    return np.concatenate([-b, a], axis=-1)


def _check_rotary(op: str, x: TensorSpec, x_name: str, tables: list[tuple[str, TensorSpec]]) -> None:
    if x.dtype not in dtypes.FLOATS:
        raise operand_error(op, x_name, f"needs a float dtype, got {dtypes.name(x.dtype)}")
    if not x.shape:
        raise operand_error(op, x_name, "is a scalar; rotary needs a last dim of pairs")
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
