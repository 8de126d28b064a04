"""DeepSeek-V3 / R1 described as data, like workloads/model.py describes Qwen2: the configuration (a built-in
`deepseek-r1`, a tiny one for numeric tests, or any Hugging Face config.json of model_type deepseek_v3), the
weights and caches one die holds, and for one step the operator calls one die runs, in order.

The architecture (DeepSeek-V3 technical report, arXiv 2412.19437; config.json of deepseek-ai/DeepSeek-R1):
- MLA attention (npu/emulated/ops/mla.py): queries through a low-rank q_a/q_b pair, keys and values from a cached
  latent of kv_lora_rank plus a shared rotary key; prefill decompresses the latent, decode absorbs the
  decompression into the query and reads only the latents.
- The first `first_k_dense_replace` layers have a dense SwiGLU MLP; the others a MoE: a sigmoid gate with a
  load-balancing bias choosing top-k of n_routed_experts within topk_group of n_group groups, plus shared experts.
- Multi-token prediction: `num_nextn_predict_layers` (one) extra decoder layer, fed the main model's last hidden
  state and the next token's embedding, drafts one more token; the next step verifies it (`queries` = 2).

As CloudMatrix-Infer serves it (arXiv 2506.12708): INT8 W8A8 for the large matmuls — activations
quantized per token on the fly (DynamicQuant), weights per output channel (npu/emulated/ops/quant.py); the gate,
kv_b (absorbed into attention) and the LM head stay in the model's dtype. The latent cache is in the model's dtype.

Parallelism (`ExpertLayout`): attention is data-parallel (each die runs whole requests: its own batch, its own
cache), the routed experts are spread over an EP group: a die holds `experts` of them and receives, per MoE layer,
the rows of the group's tokens routed to them (`received`, from the group's size and a load factor — the slowest
die's load over the mean, which the caller draws). The shared expert runs on every die over its own tokens, or on
dedicated dies (`shared_dies`, as CloudMatrix-Infer's decode does), whose work is then not this die's. At ep 1 a die
holds everything and the description computes real numbers (the tiny model's numeric test).

Rotary layout: rotate-half (as workloads/model.py), not DeepSeek's interleaved pairs, and no YaRN scaling: neither
changes a cost, and the numeric test's reference uses the same convention. Two weights are stored split where the
kernels need them apart: q_b_proj into its no-rope and rope rows, kv_a_proj_with_mqa into the latent and the rotary
key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npu.emulated.ops.base import TensorSpec
from workloads.model import (
    BF16,
    BLOCK_TABLES,
    F32,
    HF_DTYPES,
    I32,
    INPUT_IDS,
    LAST_TOKENS,
    NEXT_TOKENS,
    POSITIONS,
    ROPE_COS,
    ROPE_SIN,
    SLOTS,
    CacheConfig,
    Decode,
    OpCall,
    Prefill,
    Tensor,
    layer_prefix,
)

I8 = np.dtype(np.int8)
MTP_IDS, DRAFT_TOKENS = "mtp_input_ids", "draft_tokens"  # the MTP layer's input tokens (the next ones); its output


@dataclass(frozen=True)
class DeepSeekConfig:
    name: str
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int  # the dense layers' MLP
    moe_intermediate_size: int  # one expert's
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    num_nextn_predict_layers: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    dtype: np.dtype

    def __post_init__(self) -> None:
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"{self.name}: first_k_dense_replace {self.first_k_dense_replace} is not within the "
                f"{self.num_hidden_layers} layers"
            )
        if self.n_routed_experts % self.n_group or self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"{self.name}: {self.n_routed_experts} routed experts in {self.n_group} groups, top-"
                f"{self.num_experts_per_tok}: the groups must divide the experts and k must not exceed them"
            )

    @property
    def moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def latent_dim(self) -> int:
        """Cached elements per token per layer: the latent and the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_hf(cls, source: dict | str | Path, name: str = "", dtype: np.dtype | None = None) -> DeepSeekConfig:
        """From a Hugging Face config.json (a dict, or its path) of model_type deepseek_v3."""
        raw = source if isinstance(source, dict) else json.loads(Path(source).read_text())
        if raw.get("model_type") != "deepseek_v3":
            raise ValueError(f"config.json model_type {raw.get('model_type')!r}: expected 'deepseek_v3'")
        torch_dtype = raw.get("torch_dtype", "bfloat16")
        if dtype is None and torch_dtype not in HF_DTYPES:
            raise ValueError(f"config.json torch_dtype {torch_dtype!r}: have {', '.join(HF_DTYPES)}")
        keys = [f for f in cls.__dataclass_fields__ if f not in ("name", "dtype")]
        missing = [k for k in keys if k not in raw]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)} (a deepseek_v3 config has them all)")
        return cls(
            name=name or raw.get("_name_or_path", "deepseek_v3"),
            dtype=np.dtype(dtype) if dtype is not None else HF_DTYPES[torch_dtype],
            **{k: raw[k] for k in keys},
        )


# deepseek-ai/DeepSeek-R1 config.json (the DeepSeek-V3 architecture).
DEEPSEEK_R1 = DeepSeekConfig(
    name="deepseek-r1",
    hidden_size=7168,
    num_hidden_layers=61,
    first_k_dense_replace=3,
    num_attention_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_nextn_predict_layers=1,
    vocab_size=129280,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=163840,
    dtype=BF16,
)
# The same architecture small enough for numeric mode (float32, so a numpy reference matches).
TINY_DEEPSEEK = DeepSeekConfig(
    name="tiny-deepseek",
    hidden_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=96,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_nextn_predict_layers=1,
    vocab_size=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=256,
    dtype=F32,
)
BUILTIN = {c.name: c for c in (DEEPSEEK_R1, TINY_DEEPSEEK)}


@dataclass(frozen=True)
class ExpertLayout:
    """How a die's EP group holds the experts (see the module docstring). The defaults: one die, everything."""

    ep: int = 1  # dies of the EP group
    shared_dies: int = 0  # dies given to the shared expert (0: every die runs it over its own tokens)
    load: float = 1.0  # this die's routed rows over the group's mean (the slowest die's: >= 1)

    def __post_init__(self) -> None:
        if self.ep < 1 or not 0 <= self.shared_dies < self.ep or self.load <= 0:
            raise ValueError(
                f"expert layout: ep {self.ep}, shared_dies {self.shared_dies}, load {self.load}: need ep >= 1, "
                "0 <= shared_dies < ep, load > 0"
            )

    @property
    def routed_dies(self) -> int:
        return self.ep - self.shared_dies

    def experts(self, c: DeepSeekConfig) -> int:
        """Routed experts a die holds (with redundant copies filling the slots when the dies outnumber them)."""
        return math.ceil(c.n_routed_experts / self.routed_dies)

    def received(self, c: DeepSeekConfig, tokens: int) -> int:
        """Rows the busiest die receives per MoE layer when each of the group's dies has `tokens` tokens: a routed
        die's share at `load`, or a shared-expert die's (every token once, spread over the shared dies)."""
        if self.ep == 1:
            return tokens * c.num_experts_per_tok
        routed = tokens * c.num_experts_per_tok * self.ep / self.routed_dies * self.load
        shared = tokens * c.n_shared_experts * self.ep / self.shared_dies if self.shared_dies else 0
        return math.ceil(max(routed, shared))


def _q(*shape: int) -> TensorSpec:
    return TensorSpec(I8, shape)


def weight_specs(c: DeepSeekConfig, layout: ExpertLayout = ExpertLayout(), mtp: bool = True) -> dict[str, TensorSpec]:
    """Every weight buffer one die's forward pass reads: INT8 matmul weights with a float32 `.scale` per output
    channel, the rest in the model's dtype."""
    h, n, dc, dr = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    specs: dict[str, TensorSpec] = {"model.embed_tokens.weight": TensorSpec(c.dtype, (c.vocab_size, h))}

    def quant(name: str, out: int, inp: int, experts: int = 0) -> None:
        lead = (experts,) if experts else ()
        specs[name] = _q(*lead, out, inp)
        specs[name + ".scale"] = TensorSpec(F32, (*lead, out))

    def plain(name: str, *shape: int) -> None:
        specs[name] = TensorSpec(c.dtype, shape)

    layers = c.num_hidden_layers + (c.num_nextn_predict_layers if mtp else 0)
    for i in range(layers):
        p = layer_prefix(i)
        plain(p + "input_layernorm.weight", h)
        quant(p + "self_attn.q_a_proj.weight", c.q_lora_rank, h)
        plain(p + "self_attn.q_a_layernorm.weight", c.q_lora_rank)
        quant(p + "self_attn.q_b_nope.weight", n * c.qk_nope_head_dim, c.q_lora_rank)
        quant(p + "self_attn.q_b_rope.weight", n * dr, c.q_lora_rank)
        quant(p + "self_attn.kv_a_latent.weight", dc, h)
        quant(p + "self_attn.kv_a_rope.weight", dr, h)
        plain(p + "self_attn.kv_a_layernorm.weight", dc)
        plain(p + "self_attn.kv_b_proj.weight", n * (c.qk_nope_head_dim + c.v_head_dim), dc)
        quant(p + "self_attn.o_proj.weight", h, n * c.v_head_dim)
        plain(p + "post_attention_layernorm.weight", h)
        if i < c.first_k_dense_replace:
            quant(p + "mlp.gate_up_proj.weight", 2 * c.intermediate_size, h)
            quant(p + "mlp.down_proj.weight", h, c.intermediate_size)
            continue
        f, experts = c.moe_intermediate_size, layout.experts(c)
        plain(p + "mlp.gate.weight", c.n_routed_experts, h)
        specs[p + "mlp.gate.e_score_correction_bias"] = TensorSpec(F32, (c.n_routed_experts,))
        quant(p + "mlp.experts.gate_up.weight", 2 * f, h, experts)
        quant(p + "mlp.experts.down.weight", h, f, experts)
        if not layout.shared_dies:
            fs = f * c.n_shared_experts
            quant(p + "mlp.shared_experts.gate_up_proj.weight", 2 * fs, h)
            quant(p + "mlp.shared_experts.down_proj.weight", h, fs)
        if i >= c.num_hidden_layers:  # the MTP layer's own input norms and projection
            plain(p + "enorm.weight", h)
            plain(p + "hnorm.weight", h)
            plain(p + "eh_proj.weight", h, 2 * h)
            plain(p + "shared_head.norm.weight", h)
    plain("model.norm.weight", h)
    plain("lm_head.weight", c.vocab_size, h)
    specs[ROPE_COS] = specs[ROPE_SIN] = TensorSpec(c.dtype, (c.max_position_embeddings, dr))
    return specs


def kv_pools(i: int) -> tuple[str, str]:
    """Layer i's latent pool and rotary-key pool."""
    return layer_prefix(i) + "self_attn.c_cache", layer_prefix(i) + "self_attn.r_cache"


def kv_cache_specs(c: DeepSeekConfig, cache: CacheConfig, mtp: bool = True) -> dict[str, TensorSpec]:
    layers = c.num_hidden_layers + (c.num_nextn_predict_layers if mtp else 0)
    specs = {}
    for i in range(layers):
        latent, rope = kv_pools(i)
        specs[latent] = TensorSpec(c.dtype, (cache.num_blocks, cache.block_size, c.kv_lora_rank))
        specs[rope] = TensorSpec(c.dtype, (cache.num_blocks, cache.block_size, c.qk_rope_head_dim))
    return specs


def kv_block_bytes(c: DeepSeekConfig, block_size: int, mtp: bool = True) -> int:
    """Bytes of one KV block across every layer's pools: what a prefill-to-decode transfer moves per block."""
    return sum(s.nbytes for s in kv_cache_specs(c, CacheConfig(1, block_size), mtp).values())


def parameter_count(c: DeepSeekConfig, mtp: bool = False) -> int:
    """Parameters of the whole model (every expert; the per-channel scales and rotary tables are not counted)."""
    specs = weight_specs(c, ExpertLayout(), mtp)
    return sum(s.size for name, s in specs.items() if not name.endswith(".scale") and name not in (ROPE_COS, ROPE_SIN))


@dataclass
class _Builder:
    """Appends one step's calls; holds the step's shapes."""

    c: DeepSeekConfig
    cache: CacheConfig
    step: Prefill | Decode
    layout: ExpertLayout
    queries: int  # decode: tokens per request (1 + draft tokens being verified)
    weights: dict[str, TensorSpec]
    calls: list[OpCall] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.step.tokens if isinstance(self.step, Prefill) else self.step.batch * self.queries

    def call(self, op: str, ins: list[Tensor], outs: list[Tensor], **attrs) -> None:
        self.calls.append(OpCall(op, tuple(ins), tuple(outs), attrs))

    def act(self, buffer: str, *shape: int, dtype: np.dtype | None = None, offset: int = 0) -> Tensor:
        return Tensor(buffer, TensorSpec(self.c.dtype if dtype is None else dtype, shape), offset)

    def rows(self, x: Tensor, start: int, count: int) -> Tensor:
        """Rows start..start+count of a [T, D] activation, as [1, count, D] (one prompt's)."""
        d = x.spec.shape[-1]
        return self.act(x.buffer, 1, count, d, dtype=x.spec.dtype, offset=start * d * x.spec.dtype.itemsize)

    def w(self, name: str) -> Tensor:
        return Tensor(name, self.weights[name])

    def quant(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        rows, cols = x.spec.shape
        q, s = self.act(name + "_q", rows, cols, dtype=I8), self.act(name + "_s", rows, dtype=F32)
        self.call("DynamicQuant", [x], [q, s])
        return q, s

    def qmm(self, xq: tuple[Tensor, Tensor], weight: str, out: str) -> Tensor:
        spec = self.weights[weight]
        y = self.act(out, xq[0].spec.shape[0], spec.shape[0])
        self.call("QuantMatMul", [xq[0], self.w(weight), xq[1], self.w(weight + ".scale")], [y], dtype=self.dt)
        return y

    @property
    def dt(self) -> str:
        return str(self.c.dtype)

    def layer(self, i: int, hidden: Tensor, residual_in: Tensor | None) -> Tensor:
        """Decoder layer i: adds `residual_in` (the previous block's output; None: the first layer) into `hidden`,
        returns its MLP's output."""
        c, t, p = self.c, self.tokens, layer_prefix(i)
        h, n, dn, dr, dc, dv = (
            c.hidden_size,
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.kv_lora_rank,
            c.v_head_dim,
        )
        eps = {"epsilon": c.rms_norm_eps}
        normed, rstd = self.act("normed", t, h), self.act("rstd", t, 1, dtype=F32)
        if residual_in is None:
            self.call("RmsNorm", [hidden, self.w(p + "input_layernorm.weight")], [normed, rstd], **eps)
        else:
            self.call(
                "AddRmsNorm", [residual_in, hidden, self.w(p + "input_layernorm.weight")], [normed, rstd, hidden], **eps
            )
        xq = self.quant(normed, "x")
        q_a = self.qmm(xq, p + "self_attn.q_a_proj.weight", "q_a")
        latent = self.qmm(xq, p + "self_attn.kv_a_latent.weight", "latent")
        k_rope = self.qmm(xq, p + "self_attn.kv_a_rope.weight", "k_rope")
        q_a_n, c_n = self.act("q_a_normed", t, c.q_lora_rank), self.act("c", t, dc)
        self.call(
            "RmsNorm",
            [q_a, self.w(p + "self_attn.q_a_layernorm.weight")],
            [q_a_n, self.act("rstd", t, 1, dtype=F32)],
            **eps,
        )
        self.call(
            "RmsNorm",
            [latent, self.w(p + "self_attn.kv_a_layernorm.weight")],
            [c_n, self.act("rstd", t, 1, dtype=F32)],
            **eps,
        )
        qaq = self.quant(q_a_n, "q_a")
        q_nope = self.qmm(qaq, p + "self_attn.q_b_nope.weight", "q_nope")
        q_rope = self.qmm(qaq, p + "self_attn.q_b_rope.weight", "q_rope")
        q4, k4 = self.act("q_rope", 1, t, n, dr), self.act("k_rope", 1, t, 1, dr)
        cos, sin = self.act("cos", 1, t, 1, dr), self.act("sin", 1, t, 1, dr)
        self.call("ApplyRotaryPosEmb", [q4, k4, cos, sin], [q4, k4])
        pools = kv_pools(i)
        slots = self.act(SLOTS, t, dtype=I32)
        for pool, new, d in zip(pools, (c_n, k_rope), (dc, dr), strict=True):
            rows = Tensor(pool, TensorSpec(c.dtype, (self.cache.num_blocks * self.cache.block_size, d)))
            self.call("ScatterUpdate", [rows, slots, new], [rows])
        kv_b = self.w(p + "self_attn.kv_b_proj.weight")
        heads = {"num_heads": n}
        if isinstance(self.step, Prefill):
            start = 0
            for length, cached in zip(self.step.prompt_lens, self.step.starts, strict=True):
                if cached:
                    raise ValueError("the DeepSeek description prefills whole prompts (no chunks with a cached start)")
                one = [self.rows(x, start, length) for x in (q_nope, q_rope, c_n, k_rope)]
                attn = self.rows(self.act("attn", t, n * dv), start, length)
                self.call("MlaPrefillAttention", [*one, kv_b], [attn], next_tokens=0, **heads)
                start += length
        else:
            b, s = self.step.batch, self.queries
            self.call(
                "MlaDecodeAttention",
                [
                    self.act("q_nope", b, s, n * dn),
                    self.act("q_rope", b, s, n * dr),
                    *(
                        Tensor(pool, TensorSpec(c.dtype, (self.cache.num_blocks, self.cache.block_size, d)))
                        for pool, d in zip(pools, (dc, dr), strict=True)
                    ),
                    kv_b,
                    self.act(BLOCK_TABLES, b, self.step.max_blocks, dtype=I32),
                ],
                [self.act("attn", b, s, n * dv)],
                actual_seq_lengths=list(self.step.context_lens),
                block_size=self.cache.block_size,
                **heads,
            )
        o = self.qmm(self.quant(self.act("attn", t, n * dv), "attn"), p + "self_attn.o_proj.weight", "o")
        self.call(
            "AddRmsNorm", [o, hidden, self.w(p + "post_attention_layernorm.weight")], [normed, rstd, hidden], **eps
        )
        xq = self.quant(normed, "x")
        if i < c.first_k_dense_replace:
            gate_up = self.qmm(xq, p + "mlp.gate_up_proj.weight", "gate_up")
            swiglu = self.act("swiglu", t, c.intermediate_size)
            self.call("SwiGlu", [gate_up], [swiglu], dim=-1)
            return self.qmm(self.quant(swiglu, "swiglu"), p + "mlp.down_proj.weight", "mlp")
        return self.moe(i, normed, xq)

    def moe(self, i: int, normed: Tensor, xq: tuple[Tensor, Tensor]) -> Tensor:
        c, t, p, layout = self.c, self.tokens, layer_prefix(i), self.layout
        h, k, f, experts = c.hidden_size, c.num_experts_per_tok, c.moe_intermediate_size, layout.experts(c)
        logits = self.act("router_logits", t, c.n_routed_experts)
        self.call("MatMulV2", [normed, self.w(p + "mlp.gate.weight")], [logits], transpose_x2=True)
        gate_w, ids = self.act("gate_weights", t, k, dtype=F32), self.act("expert_ids", t, k, dtype=I32)
        self.call(
            "MoeGatingTopK",
            [logits, self.w(p + "mlp.gate.e_score_correction_bias")],
            [gate_w, ids],
            k=k,
            groups=c.n_group,
            topk_groups=c.topk_group,
            routed_scaling_factor=c.routed_scaling_factor,
            norm=c.norm_topk_prob,
        )
        r = layout.received(c, t)
        ep = {"ep": layout.ep, "experts": experts, "received": r}
        rows, row_s = self.act("rows_q", r, h, dtype=I8), self.act("rows_s", r, dtype=F32)
        counts, source = self.act("group_list", experts, dtype=I32), self.act("row_source", r, dtype=I32)
        self.call("MoeDispatch", [xq[0], xq[1], ids], [rows, row_s, counts, source], **ep)
        w_gu, w_dn = p + "mlp.experts.gate_up.weight", p + "mlp.experts.down.weight"
        gu = self.act("expert_gate_up", r, 2 * f)
        self.call("GroupedMatMul", [rows, self.w(w_gu), row_s, self.w(w_gu + ".scale"), counts], [gu], dtype=self.dt)
        sw = self.act("expert_swiglu", r, f)
        self.call("SwiGlu", [gu], [sw], dim=-1)
        swq = self.quant(sw, "expert_swiglu")
        y = self.act("expert_out", r, h)
        self.call("GroupedMatMul", [swq[0], self.w(w_dn), swq[1], self.w(w_dn + ".scale"), counts], [y], dtype=self.dt)
        routed = self.act("routed", t, h)
        self.call("MoeCombine", [y, source, gate_w], [routed], **ep)
        if layout.shared_dies:
            return routed  # the shared expert runs on its own dies
        fs = f * c.n_shared_experts
        gate_up = self.qmm(xq, p + "mlp.shared_experts.gate_up_proj.weight", "shared_gate_up")
        swiglu = self.act("shared_swiglu", t, fs)
        self.call("SwiGlu", [gate_up], [swiglu], dim=-1)
        shared = self.qmm(self.quant(swiglu, "shared_swiglu"), p + "mlp.shared_experts.down_proj.weight", "shared")
        mlp = self.act("mlp", t, h)
        self.call("Add", [routed, shared], [mlp])
        return mlp

    def head(self, hidden: Tensor, mlp: Tensor, norm: str, out: str) -> None:
        """Final norm, the rows to sample (a prompt's last token; every decode query), LM head, greedy sampling."""
        c, t = self.c, self.tokens
        normed = self.act("normed", t, c.hidden_size)
        eps = {"epsilon": c.rms_norm_eps}
        self.call("AddRmsNorm", [mlp, hidden, self.w(norm)], [normed, self.act("rstd", t, 1, dtype=F32), hidden], **eps)
        sampled, rows = normed, t
        if isinstance(self.step, Prefill):
            rows = self.step.batch
            sampled = self.act("last", rows, c.hidden_size)
            self.call("GatherV2", [normed, self.act(LAST_TOKENS, rows, dtype=I32)], [sampled])
        logits = self.act("logits", rows, c.vocab_size)
        self.call("MatMulV2", [sampled, self.w("lm_head.weight")], [logits], transpose_x2=True)
        self.call("ArgMaxV2", [logits], [self.act(out, rows, dtype=I32)], dimension=-1, dtype=3)


def forward(
    c: DeepSeekConfig,
    cache: CacheConfig,
    step: Prefill | Decode,
    layout: ExpertLayout = ExpertLayout(),
    mtp: bool = False,
    queries: int = 1,
) -> list[OpCall]:
    """One die's operator calls for a step, in order. Prefill: whole prompts. Decode: `queries` tokens per request
    (the last accepted token and the draft tokens to verify; context_lens count them). `mtp`: the MTP layer runs
    after the main model over the same tokens (fed each next token, MTP_IDS) and drafts a token per sampled row."""
    if queries < 1 or (queries > 1 and isinstance(step, Prefill)):
        raise ValueError(f"queries {queries}: a decode step verifies >= 1 tokens per request; a prefill takes 1")
    b = _Builder(c, cache, step, layout, queries, weight_specs(c, layout, mtp))
    t, h, dr = b.tokens, c.hidden_size, c.qk_rope_head_dim
    hidden = b.act("hidden", t, h)
    b.call("GatherV2", [b.w("model.embed_tokens.weight"), b.act(INPUT_IDS, t, dtype=I32)], [hidden])
    positions = b.act(POSITIONS, t, dtype=I32)
    b.call("GatherV2", [b.w(ROPE_COS), positions], [b.act("cos", t, dr)])
    b.call("GatherV2", [b.w(ROPE_SIN), positions], [b.act("sin", t, dr)])
    mlp = None
    for i in range(c.num_hidden_layers):
        mlp = b.layer(i, hidden, mlp)
    b.head(hidden, mlp, "model.norm.weight", NEXT_TOKENS)
    if not mtp:
        return b.calls
    for i in range(c.num_hidden_layers, c.num_hidden_layers + c.num_nextn_predict_layers):
        p, eps = layer_prefix(i), {"epsilon": c.rms_norm_eps}
        emb, en, hn = b.act("mtp_embed", t, h), b.act("mtp_enorm", t, h), b.act("mtp_hnorm", t, h)
        b.call("GatherV2", [b.w("model.embed_tokens.weight"), b.act(MTP_IDS, t, dtype=I32)], [emb])
        b.call("RmsNorm", [emb, b.w(p + "enorm.weight")], [en, b.act("rstd", t, 1, dtype=F32)], **eps)
        b.call("RmsNorm", [b.act("normed", t, h), b.w(p + "hnorm.weight")], [hn, b.act("rstd", t, 1, dtype=F32)], **eps)
        both = b.act("mtp_concat", t, 2 * h)
        b.call("ConcatD", [en, hn], [both], concat_dim=1)
        b.call("MatMulV2", [both, b.w(p + "eh_proj.weight")], [hidden], transpose_x2=True)
        mlp = b.layer(i, hidden, None)
        b.head(hidden, mlp, p + "shared_head.norm.weight", DRAFT_TOKENS)
    return b.calls


def rope_tables(c: DeepSeekConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin per position over the rotary dims, rotate-half layout (as workloads/model.py's)."""
    d = c.qk_rope_head_dim
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(np.arange(c.max_position_embeddings, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(c.dtype), np.sin(angles).astype(c.dtype)


def model_config(name: str) -> DeepSeekConfig:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ValueError(f"model {name!r}: no such built-in DeepSeek model (have {', '.join(BUILTIN)})") from None
