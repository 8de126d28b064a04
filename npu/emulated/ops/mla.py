"""Multi-head latent attention (DeepSeek-V2/V3): keys and values are decompressed from a per-token latent of
`dc` (kv_lora_rank, 512) plus a shared rotary key of `dr` (qk_rope_head_dim, 64), which is all the cache holds.

- Prefill (MlaPrefillAttention): the latent is decompressed (c @ w_kv_b^T -> per head a key part of dn and a value
  of dv) and ordinary attention runs with keys [k_nope | k_rope] (the rotary key broadcast to every head), as the
  prompt's tokens are many and the decompression is one GEMM over them.
- Decode (MlaDecodeAttention): the absorbed form (DeepSeek-V2 paper, section 2.1.3; CANN's FusedInferAttentionScore
  MLA mode and vllm-ascend's MLA decode): w_kv_b's key part is folded into the query (q_nope @ W_UK -> a latent
  query of dc per head), scores are q_latent . c + q_rope . k_rope, the softmax-weighted latent is taken back
  through W_UV. The paged cache is read once for all heads — a decode step's bytes are the latents', not 128
  heads' keys and values — and the work becomes compute-heavier per byte. Queries may be several tokens per
  request (multi-token prediction verifies a draft token): query s of S sees the context up to its own position.

Layouts: BSH — q_nope [B, S, N*dn], q_rope [B, S, N*dr]; prefill c [B, S_kv, dc], k_rope [B, S_kv, dr]; decode
pools [num_blocks, block_size, dc] and [num_blocks, block_size, dr] with a block table as IncreFlashAttention's
paged mode. w_kv_b [N*(dn+dv), dc] (Hugging Face's kv_b_proj.weight). Output [B, S, N*dv]. attr scale_value
defaults to 1/sqrt(dn + dr).

Costs: the decompression or absorption GEMMs at the cube's GEMM efficiency, the attention itself at the flash
attention efficiency of attention.py; the kernel's efficiency is the one that gives the sum of both times.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from npu.emulated.ops.attention import FA_QUERY_BLOCK, IFA_SPLIT_TOKENS, Attention, band_pairs
from npu.emulated.ops.base import TensorSpec, operand_error, register, same_dtype, widen
from npu.emulated.ops.matmul import CUBE_EFF_MAX, CUBE_K0
from npu.errors import InvalidParam

UNBOUNDED = 2147483647
# Cube efficiency of the absorbed decode kernel's attention (its 2 x 128 query rows per request against the latents):
# no per-kernel measurement is public. Fitted (with sim/cloudmatrix's other two fitted constants) to CloudMatrix-
# Infer's decode figure at 96 requests per NPU, 4K prompts, MTP on: TPOT 49.4 ms (arXiv 2506.12708).
MLA_DECODE_EFF = 0.60


def _dims(op: str, spec: TensorSpec, name: str, per: int | None = None) -> tuple[int, int, int]:
    if len(spec.shape) != 3 or (per is not None and spec.shape[2] % per):
        raise operand_error(op, name, f"shape {list(spec.shape)} is not [B, S, {'N*' if per else ''}D] (BSH)")
    return spec.shape


def _softmax_attend(scores: np.ndarray, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        scores = np.where(mask, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ values


class _Mla(Attention):
    inputs = (5, 6)

    def _heads_dims(self, ins, attrs) -> tuple[int, int, int, int, int, int, int]:
        """(N, B, S, dn, dr, dc, dv), checked."""
        n = int(attrs.get("num_heads", 0))
        if n <= 0:
            raise operand_error(self.name, "attr num_heads", "is required and must be > 0")
        same_dtype(self.name, ins[:5], ("q_nope", "q_rope", "c", "k_rope", "w_kv_b"))
        b, s, qn = _dims(self.name, ins[0], "q_nope", n)
        b2, s2, qr = _dims(self.name, ins[1], "q_rope", n)
        if (b2, s2) != (b, s):
            raise operand_error(self.name, "q_rope", f"batch/seq {b2}/{s2} differ from q_nope's {b}/{s}")
        dn, dr, dc = qn // n, qr // n, ins[2].shape[-1]
        w = ins[4]
        if len(w.shape) != 2 or w.shape[1] != dc or w.shape[0] % n or w.shape[0] // n <= dn:
            raise operand_error(self.name, "w_kv_b", f"shape {list(w.shape)} is not [{n}*({dn}+dv), {dc}]")
        if ins[3].shape[-1] != dr:
            raise operand_error(self.name, "k_rope", f"last dim {ins[3].shape[-1]} is not q_rope's {dr}")
        return n, b, s, dn, dr, dc, w.shape[0] // n - dn

    def _scale(self, attrs, dn: int, dr: int) -> float:
        return float(attrs.get("scale_value", 1.0 / np.sqrt(dn + dr)))

    def _split_w(self, w: np.ndarray, n: int, dn: int) -> tuple[np.ndarray, np.ndarray]:
        """W_UK [N, dn, dc] and W_UV [N, dv, dc]."""
        w = widen(w).reshape(n, -1, w.shape[-1])
        return w[:, :dn], w[:, dn:]

    def _mla_cost(self, gemm_flops, gemm_k, attn_flops, hbm_bytes, tiles, keys_per_row, attn_eff=None):
        attn = self._mix_cost(attn_flops, hbm_bytes, tiles, keys_per_row)
        if attn_eff:
            attn = replace(attn, efficiency=attn_eff)
        gemm_eff = CUBE_EFF_MAX * gemm_k / (gemm_k + CUBE_K0)
        seconds_per_peak_flop = gemm_flops / gemm_eff + attn_flops / attn.efficiency
        total = gemm_flops + attn_flops
        return replace(attn, flops=total, efficiency=total / seconds_per_peak_flop if total else 1.0)


@register
class MlaPrefillAttention(_Mla):
    """Prefill MLA: ins q_nope, q_rope, c, k_rope, w_kv_b; attrs num_heads, next_tokens (as PromptFlashAttention's
    band: 0 = causal; default unbounded), scale_value."""

    name = "MlaPrefillAttention"
    inputs = (5, 5)

    def infer(self, ins, attrs, outs):
        n, b, s, dn, dr, dc, dv = self._heads_dims(ins, attrs)
        bk, s_kv, _ = _dims(self.name, ins[2], "c")
        if ins[3].shape != (bk, s_kv, dr) or bk != b:
            raise operand_error(self.name, "c/k_rope", f"are {ins[2]} and {ins[3]}; expected [{b}, S_kv, dc/dr]")
        return [TensorSpec(ins[0].dtype, (b, s, n * dv))]

    def compute(self, ins, attrs):
        q_nope, q_rope, c, k_rope, w = (widen(x) for x in ins)
        n = int(attrs["num_heads"])
        b, s, _ = q_nope.shape
        s_kv = c.shape[1]
        dn, dr = q_nope.shape[-1] // n, q_rope.shape[-1] // n
        w_uk, w_uv = self._split_w(w, n, dn)
        k_nope = np.einsum("bsc,ndc->bnsd", c, w_uk)
        v = np.einsum("bsc,ndc->bnsd", c, w_uv)
        q = np.concatenate([q_nope.reshape(b, s, n, dn), q_rope.reshape(b, s, n, dr)], -1).transpose(0, 2, 1, 3)
        k_r = np.broadcast_to(k_rope[:, None], (b, n, s_kv, dr))
        k = np.concatenate([k_nope, k_r], -1)
        scores = (q @ np.swapaxes(k, -1, -2)) * self._scale(attrs, dn, dr)
        nxt = int(attrs.get("next_tokens", UNBOUNDED))
        mask = (np.arange(s_kv)[None, :] - np.arange(s)[:, None]) > nxt
        out = _softmax_attend(scores, v, mask)
        return [out.transpose(0, 2, 1, 3).reshape(b, s, -1)]

    def cost(self, ins, outs, attrs):
        n, b, s, dn, dr, dc, dv = self._heads_dims(ins, attrs)
        s_kv = ins[2].shape[1]
        visible = band_pairs(s, s_kv, UNBOUNDED, int(attrs.get("next_tokens", UNBOUNDED)))
        return self._mla_cost(
            gemm_flops=2.0 * b * s_kv * dc * n * (dn + dv),
            gemm_k=dc,
            attn_flops=2.0 * b * n * visible * (dn + dr + dv),
            hbm_bytes=sum(t.nbytes for t in (*ins, *outs)),
            tiles=b * n * -(-s // FA_QUERY_BLOCK),
            keys_per_row=visible / max(s, 1),
        )


@register
class MlaDecodeAttention(_Mla):
    """Absorbed decode MLA over the paged latent cache: ins q_nope, q_rope, c pool, k_rope pool, w_kv_b,
    block_table; attrs num_heads, block_size, actual_seq_lengths (each request's context, this step's S tokens
    included), scale_value."""

    name = "MlaDecodeAttention"
    inputs = (6, 6)

    def _lengths(self, ins, attrs) -> tuple[list[int], int]:
        n, b, s, dn, dr, dc, dv = self._heads_dims(ins, attrs)
        block_size = int(attrs.get("block_size", 0))
        if block_size <= 0:
            raise operand_error(self.name, "attr block_size", "is required and must be > 0")
        for name, spec, d in (("c", ins[2], dc), ("k_rope", ins[3], dr)):
            if len(spec.shape) != 3 or spec.shape[1:] != (block_size, d):
                raise operand_error(self.name, name, f"pool {list(spec.shape)} is not [num_blocks, {block_size}, {d}]")
        table = ins[5]
        if table.dtype != np.int32 or len(table.shape) != 2 or table.shape[0] != b:
            raise operand_error(self.name, "block_table", f"is {table}; it must be int32 [{b}, max_blocks]")
        capacity = table.shape[1] * block_size
        lengths = [int(x) for x in attrs.get("actual_seq_lengths", [capacity] * b)]
        if len(lengths) != b or any(not s <= x <= capacity for x in lengths):
            raise operand_error(
                self.name, "attr actual_seq_lengths", f"{lengths} is not {b} lengths in {s}..{capacity}"
            )
        return lengths, block_size

    def infer(self, ins, attrs, outs):
        n, b, s, _, _, _, dv = self._heads_dims(ins, attrs)
        self._lengths(ins, attrs)
        return [TensorSpec(ins[0].dtype, (b, s, n * dv))]

    def compute(self, ins, attrs):
        q_nope, q_rope, c_pool, r_pool, w, table = ins
        n = int(attrs["num_heads"])
        specs = [TensorSpec(x.dtype, x.shape) for x in ins]
        lengths, block_size = self._lengths(specs, attrs)
        b, s, _ = q_nope.shape
        dn, dr = q_nope.shape[-1] // n, q_rope.shape[-1] // n
        w_uk, w_uv = self._split_w(w, n, dn)
        scale = self._scale(attrs, dn, dr)
        out = np.empty((b, s, n, w_uv.shape[1]), np.float32)
        for i, length in enumerate(lengths):
            blocks = table[i, : -(-length // block_size)]
            if blocks.min() < 0 or blocks.max() >= c_pool.shape[0]:
                raise InvalidParam(f"{self.name} block_table: row {i} names blocks outside [0, {c_pool.shape[0]})")
            c = widen(c_pool[blocks].reshape(-1, c_pool.shape[-1])[:length])
            r = widen(r_pool[blocks].reshape(-1, r_pool.shape[-1])[:length])
            qn = widen(q_nope[i]).reshape(s, n, dn)
            qr = widen(q_rope[i]).reshape(s, n, dr)
            q_latent = np.einsum("snd,ndc->snc", qn, w_uk)
            scores = (np.einsum("snc,tc->snt", q_latent, c) + np.einsum("snd,td->snt", qr, r)) * scale
            mask = np.arange(length)[None, None, :] > (length - s + np.arange(s))[:, None, None]
            latent = _softmax_attend(scores, c, mask)  # [S, N, dc]
            out[i] = np.einsum("snc,nvc->snv", latent, w_uv)
        return [out.reshape(b, s, -1)]

    def cost(self, ins, outs, attrs):
        n, b, s, dn, dr, dc, dv = self._heads_dims(ins, attrs)
        lengths, _ = self._lengths(ins, attrs)
        total = sum(lengths)
        latent_bytes = total * (dc + dr) * ins[2].dtype.itemsize  # once per request, for all of its heads
        return self._mla_cost(
            gemm_flops=2.0 * b * s * n * dc * (dn + dv),
            gemm_k=dc,
            attn_flops=2.0 * s * n * total * (dc + dr + dc),
            hbm_bytes=ins[0].nbytes + ins[1].nbytes + ins[4].nbytes + ins[5].nbytes + outs[0].nbytes + latent_bytes,
            tiles=sum(-(-length // IFA_SPLIT_TOKENS) for length in lengths) * max(1, n * s // FA_QUERY_BLOCK),
            keys_per_row=total / b,
            attn_eff=MLA_DECODE_EFF,
        )
