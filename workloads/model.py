"""A decoder-only transformer (the Qwen2 / Llama layout) described once, as data: its configuration, its weights'
names and shapes, and for one step's batch shape the operator calls of the whole forward pass, in the order they
run.

Nothing here touches a device. The pyACL executor (acl_executor.py) runs these calls on an NPU; a simulator can
feed them to the engine as they are (each call's op type, TensorSpecs and attrs are what `npu.emulated.ops.bind`
checks). A tensor is a named buffer (a weight, a KV-cache pool, a step input or an activation) seen with a shape,
at a byte offset: the same buffer may be seen with different shapes by different calls (the flat [T, N*D]
queries are [1, T, N, D] to the rotary op), as device memory is.

The step: the tokens of all its requests are packed in one [T, hidden] batch. A prefill step takes whole prompts
(no cached prefix), a decode step one token per request. Each layer writes its new keys and values into a paged
KV cache (pools of blocks, [num_blocks, block_size, N_kv*D] per layer) at the token's slot (block * block_size
+ row) with ScatterUpdate, which seeing the pool as [num_slots, N_kv*D] needs no new op. Prefill attention runs
one PromptFlashAttention per prompt (causal) on the step's own keys; decode attention reads the cache through
each request's block table (IncreFlashAttention, paged mode). Greedy sampling (ArgMaxV2) ends the step; prefill
takes the logits of each prompt's last token only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from npu.emulated.ops.base import TensorSpec

F32, I32 = np.dtype(np.float32), np.dtype(np.int32)
BF16 = np.dtype(ml_dtypes.bfloat16)
HF_DTYPES = {"float32": F32, "bfloat16": BF16, "float16": np.dtype(np.float16)}

# The step's inputs, written by the host before each step, and its output.
INPUT_IDS, POSITIONS, SLOTS = "input_ids", "positions", "slot_mapping"
BLOCK_TABLES, LAST_TOKENS = "block_tables", "last_token_index"
CONTEXT_SLOTS = "context_slot_mapping"  # a chunked prefill: the slots of each chunk's whole context, prompt order
NEXT_TOKENS = "next_tokens"
STEP_INPUTS = (INPUT_IDS, POSITIONS, SLOTS, BLOCK_TABLES, LAST_TOKENS, CONTEXT_SLOTS)
CONTEXT_KV = ("context_k", "context_v")  # a chunk's context, gathered from the pools for its attention

# Weights that are not Hugging Face tensors: the fused gate/up projection (SwiGlu takes both halves in one
# tensor) and the rotary tables, derived from the config.
GATE_UP = "mlp.gate_up_proj.weight"
ROPE_COS, ROPE_SIN = "rope.cos", "rope.sin"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # biases on the q, k and v projections: Qwen2 has them, Llama not
    dtype: np.dtype
    head_dim: int = 0  # 0: hidden_size / num_attention_heads

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.name}: num_key_value_heads {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_hf(cls, source: dict | str | Path, name: str = "", dtype: np.dtype | None = None) -> ModelConfig:
        """From a Hugging Face config.json (a dict, or its path); `dtype` overrides its torch_dtype."""
        raw = source if isinstance(source, dict) else json.loads(Path(source).read_text())
        model_type = raw.get("model_type", "")
        if model_type not in ("qwen2", "llama"):
            raise ValueError(f"config.json model_type {model_type!r}: only 'qwen2' and 'llama' layouts are known")
        torch_dtype = raw.get("torch_dtype", "bfloat16")
        if dtype is None and torch_dtype not in HF_DTYPES:
            raise ValueError(f"config.json torch_dtype {torch_dtype!r}: have {', '.join(HF_DTYPES)}")
        return cls(
            name=name or raw.get("_name_or_path", model_type),
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 10000.0),
            max_position_embeddings=raw["max_position_embeddings"],
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or raw.get("attention_bias", False),
            dtype=np.dtype(dtype) if dtype is not None else HF_DTYPES[torch_dtype],
            head_dim=raw.get("head_dim") or 0,
        )


BUILTIN = {
    # Byte-level and small enough for numeric mode in tests. float32, so that a plain numpy reference gives the
    # same greedy tokens: in bf16 every op's rounding would have to be mimicked to the bit.
    "tiny": ModelConfig(
        name="tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attention_bias=True,
        dtype=F32,
    ),
    # Qwen/Qwen2.5-7B-Instruct config.json.
    "qwen2.5-7b": ModelConfig(
        name="qwen2.5-7b",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        attention_bias=True,
        dtype=BF16,
    ),
}


def model_config(name: str) -> ModelConfig:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ValueError(f"model {name!r}: no such built-in model (have {', '.join(BUILTIN)})") from None


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: each layer has a key pool and a value pool of num_blocks blocks of block_size tokens."""

    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class Prefill:
    """A batch of prompts, or chunks of them (chunked prefill): the tokens each request computes now, and how many
    of its tokens are in the KV cache already (`starts`; empty: none, whole prompts). A chunk attends to its
    cached context and, causally, to itself."""

    prompt_lens: tuple[int, ...]
    starts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.starts:
            object.__setattr__(self, "starts", (0,) * len(self.prompt_lens))
        if len(self.starts) != len(self.prompt_lens):
            raise ValueError(f"Prefill: {len(self.starts)} starts for {len(self.prompt_lens)} prompts")

    @property
    def batch(self) -> int:
        return len(self.prompt_lens)

    @property
    def tokens(self) -> int:
        return sum(self.prompt_lens)


@dataclass(frozen=True)
class Decode:
    """One new token for each running request. context_lens: each request's tokens, this step's included;
    max_blocks: the width of the block table."""

    context_lens: tuple[int, ...]
    max_blocks: int

    @property
    def batch(self) -> int:
        return len(self.context_lens)

    @property
    def tokens(self) -> int:
        return len(self.context_lens)


@dataclass(frozen=True)
class Tensor:
    """A view of a named buffer: its spec, at `offset` bytes."""

    buffer: str
    spec: TensorSpec
    offset: int = 0


@dataclass(frozen=True)
class OpCall:
    op: str
    ins: tuple[Tensor, ...]
    outs: tuple[Tensor, ...]
    attrs: dict = field(default_factory=dict, hash=False)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def weight_specs(c: ModelConfig) -> dict[str, TensorSpec]:
    """Every weight buffer the forward pass reads. Linear weights keep Hugging Face's [out, in] layout (the
    MatMuls take them with transpose_x2). A tied LM head reads the embedding table: it has no buffer of its own."""
    h, d, q, kv, ff = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size

    def spec(*shape: int) -> TensorSpec:
        return TensorSpec(c.dtype, shape)

    specs = {"model.embed_tokens.weight": spec(c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = layer_prefix(i)
        specs[p + "input_layernorm.weight"] = spec(h)
        for name, heads in (("q", q), ("k", kv), ("v", kv)):
            specs[p + f"self_attn.{name}_proj.weight"] = spec(heads * d, h)
            if c.attention_bias:
                specs[p + f"self_attn.{name}_proj.bias"] = spec(heads * d)
        specs[p + "self_attn.o_proj.weight"] = spec(h, q * d)
        specs[p + "post_attention_layernorm.weight"] = spec(h)
        specs[p + GATE_UP] = spec(2 * ff, h)
        specs[p + "mlp.down_proj.weight"] = spec(h, ff)
    specs["model.norm.weight"] = spec(h)
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = spec(c.vocab_size, h)
    specs[ROPE_COS] = specs[ROPE_SIN] = spec(c.max_position_embeddings, d)
    return specs


def kv_pools(i: int) -> tuple[str, str]:
    """Layer i's key pool and value pool."""
    return layer_prefix(i) + "self_attn.k_cache", layer_prefix(i) + "self_attn.v_cache"


def kv_pool_spec(c: ModelConfig, cache: CacheConfig) -> TensorSpec:
    return TensorSpec(c.dtype, (cache.num_blocks, cache.block_size, c.num_key_value_heads * c.head_dim))


def kv_cache_specs(c: ModelConfig, cache: CacheConfig) -> dict[str, TensorSpec]:
    return {name: kv_pool_spec(c, cache) for i in range(c.num_hidden_layers) for name in kv_pools(i)}


def kv_block_bytes(c: ModelConfig, block_size: int) -> int:
    """Bytes of one KV block across every layer's key and value pools: what a handover moves per block."""
    one = kv_pool_spec(c, CacheConfig(1, block_size)).nbytes
    return 2 * c.num_hidden_layers * one


def forward(c: ModelConfig, cache: CacheConfig, step: Prefill | Decode) -> list[OpCall]:
    """The operator calls of one step's forward pass, in order."""
    t, b = step.tokens, step.batch
    h, d, n, n_kv, ff = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    calls: list[OpCall] = []

    def call(op: str, ins: list[Tensor], outs: list[Tensor], **attrs) -> None:
        calls.append(OpCall(op, tuple(ins), tuple(outs), attrs))

    def act(buffer: str, *shape: int, dtype: np.dtype = c.dtype, offset: int = 0) -> Tensor:
        return Tensor(buffer, TensorSpec(dtype, shape), offset)

    weights = weight_specs(c)

    def w(name: str) -> Tensor:
        return Tensor(name, weights[name])

    eps = {"epsilon": c.rms_norm_eps}
    heads = {"num_heads": n, "num_key_value_heads": n_kv, "input_layout": "BSH"}
    hidden, normed, rstd = act("hidden", t, h), act("normed", t, h), act("rstd", t, 1, dtype=F32)
    q, k, v = act("q", t, n * d), act("k", t, n_kv * d), act("v", t, n_kv * d)
    attn, o, mlp = act("attn", t, n * d), act("o", t, h), act("mlp", t, h)
    slots = act(SLOTS, t, dtype=I32)
    pool_spec = kv_pool_spec(c, cache)
    slot_rows = TensorSpec(c.dtype, (cache.num_blocks * cache.block_size, n_kv * d))  # a pool seen a token a row

    call("GatherV2", [w("model.embed_tokens.weight"), act(INPUT_IDS, t, dtype=I32)], [hidden])
    positions = act(POSITIONS, t, dtype=I32)
    call("GatherV2", [w(ROPE_COS), positions], [act("cos", t, d)])
    call("GatherV2", [w(ROPE_SIN), positions], [act("sin", t, d)])
    for i in range(c.num_hidden_layers):
        p = layer_prefix(i)
        # The residual stream lives in `hidden`: AddRmsNorm adds the previous block's output into it in place.
        if i == 0:
            call("RmsNorm", [hidden, w(p + "input_layernorm.weight")], [normed, rstd], **eps)
        else:
            call("AddRmsNorm", [mlp, hidden, w(p + "input_layernorm.weight")], [normed, rstd, hidden], **eps)
        for name, out in (("q", q), ("k", k), ("v", v)):
            bias = [w(p + f"self_attn.{name}_proj.bias")] if c.attention_bias else []
            call("MatMulV2", [normed, w(p + f"self_attn.{name}_proj.weight"), *bias], [out], transpose_x2=True)
        q4, k4 = act("q", 1, t, n, d), act("k", 1, t, n_kv, d)
        call("ApplyRotaryPosEmb", [q4, k4, act("cos", 1, t, 1, d), act("sin", 1, t, 1, d)], [q4, k4])
        pools = [Tensor(name, pool_spec) for name in kv_pools(i)]
        for pool, new in zip(pools, (k, v), strict=True):
            rows = Tensor(pool.buffer, slot_rows)
            call("ScatterUpdate", [rows, slots, new], [rows])
        if isinstance(step, Prefill):
            start, context_start = 0, 0
            for length, cached in zip(step.prompt_lens, step.starts, strict=True):
                one = [
                    act(x.buffer, 1, length, x.spec.shape[1], offset=start * x.spec.shape[1] * c.dtype.itemsize)
                    for x in (q, k, v, attn)
                ]
                if cached:  # a later chunk: its keys and values are the pools' rows for its whole context
                    span = cached + length
                    index = act(CONTEXT_SLOTS, span, dtype=I32, offset=context_start * I32.itemsize)
                    context = [act(name, span, n_kv * d) for name in CONTEXT_KV]
                    for pool, out in zip(pools, context, strict=True):
                        call("GatherV2", [Tensor(pool.buffer, slot_rows), index], [out])
                    one[1:3] = [act(name, 1, span, n_kv * d) for name in CONTEXT_KV]
                    context_start += span
                # Query row i (position cached + i) sees keys up to position cached + i: the band's upper edge.
                call("PromptFlashAttention", one[:3], one[3:], next_tokens=cached, **heads)
                start += length
        else:
            table = act(BLOCK_TABLES, b, step.max_blocks, dtype=I32)
            call(
                "IncreFlashAttention",
                [act("q", b, 1, n * d), *pools, table],
                [act("attn", b, 1, n * d)],
                actual_seq_lengths=list(step.context_lens),
                block_size=cache.block_size,
                **heads,
            )
        call("MatMulV2", [attn, w(p + "self_attn.o_proj.weight")], [o], transpose_x2=True)
        call("AddRmsNorm", [o, hidden, w(p + "post_attention_layernorm.weight")], [normed, rstd, hidden], **eps)
        gate_up = act("gate_up", t, 2 * ff)
        call("MatMulV2", [normed, w(p + GATE_UP)], [gate_up], transpose_x2=True)
        call("SwiGlu", [gate_up], [act("swiglu", t, ff)], dim=-1)
        call("MatMulV2", [act("swiglu", t, ff), w(p + "mlp.down_proj.weight")], [mlp], transpose_x2=True)
    call("AddRmsNorm", [mlp, hidden, w("model.norm.weight")], [normed, rstd, hidden], **eps)
    sampled = normed
    if isinstance(step, Prefill):  # only each prompt's last token is sampled
        sampled = act("last", b, h)
        call("GatherV2", [normed, act(LAST_TOKENS, b, dtype=I32)], [sampled])
    head = w("model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight")
    logits = act("logits", b, c.vocab_size)
    call("MatMulV2", [sampled, head], [logits], transpose_x2=True)
    call("ArgMaxV2", [logits], [act(NEXT_TOKENS, b, dtype=I32)], dimension=-1, dtype=3)
    return calls


def buffer_sizes(calls: list[OpCall]) -> dict[str, int]:
    """The bytes each buffer the calls name must hold."""
    sizes: dict[str, int] = {}
    for c in calls:
        for x in (*c.ins, *c.outs):
            sizes[x.buffer] = max(sizes.get(x.buffer, 0), x.offset + x.spec.nbytes)
    return sizes


def step_inputs(
    step: Prefill | Decode, tokens: list[list[int]], block_tables: list[list[int]], block_size: int
) -> dict[str, np.ndarray]:
    """The host data of a step's inputs. tokens: each request's new tokens (a prompt or a chunk of it, or one
    token); block_tables: each request's blocks, in order, enough for its context."""

    def slots(table: list[int], positions: np.ndarray) -> np.ndarray:
        return np.asarray(table)[positions // block_size] * block_size + positions % block_size

    if isinstance(step, Prefill):
        positions = [np.arange(start, start + n) for start, n in zip(step.starts, step.prompt_lens, strict=True)]
    else:
        positions = [np.array([length - 1]) for length in step.context_lens]
    inputs = {
        INPUT_IDS: np.concatenate([np.asarray(x) for x in tokens]),
        POSITIONS: np.concatenate(positions),
        SLOTS: np.concatenate([slots(t, p) for t, p in zip(block_tables, positions, strict=True)]),
    }
    if isinstance(step, Prefill):
        inputs[LAST_TOKENS] = np.cumsum(step.prompt_lens) - 1
        if any(step.starts):  # each later chunk's whole context, as the forward pass gathers it
            chunks = zip(block_tables, step.starts, step.prompt_lens, strict=True)
            inputs[CONTEXT_SLOTS] = np.concatenate([slots(t, np.arange(s + n)) for t, s, n in chunks if s])
    else:
        padded = np.zeros((step.batch, step.max_blocks), I32)  # entries past a request's blocks are never read
        for row, table in zip(padded, block_tables, strict=True):
            row[: len(table)] = table
        inputs[BLOCK_TABLES] = padded
    return {name: np.ascontiguousarray(x, dtype=I32) for name, x in inputs.items()}


def rope_tables(c: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin per position, [max_positions, head_dim], in the rotate-half layout of Hugging Face's Llama and
    Qwen2 (each frequency twice: for the first and the second half of the head)."""
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
    angles = np.outer(np.arange(c.max_position_embeddings, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(c.dtype), np.sin(angles).astype(c.dtype)


def parameter_count(c: ModelConfig) -> int:
    """Parameters of the model (the rotary tables are not parameters)."""
    return sum(s.size for name, s in weight_specs(c).items() if name not in (ROPE_COS, ROPE_SIN))
