"""DeepSeek-V3/R1 described as data (workloads/deepseek.py) and its operators (MLA, MoE, INT8 W8A8), checked
against a plain numpy implementation of the same architecture written here: full recomputation of each sequence,
MLA in its non-absorbed form (keys and values decompressed), each token's experts one by one — no paging, no
absorption, no dispatch/combine. The quantization is the same arithmetic on both sides (per-token INT8
activations, per-channel INT8 weights), so the greedy tokens must agree."""

from __future__ import annotations

import math

import numpy as np
import pytest

from npu.emulated.ops import REGISTRY, bind
from npu.emulated.ops.base import TensorSpec
from npu.emulated.ops.quant import INT8_EFF, INT8_RATE, quantize
from npu.emulated.timing import alone
from npu.profiles import profile
from workloads.deepseek import (
    BUILTIN,
    DEEPSEEK_R1,
    DRAFT_TOKENS,
    MTP_IDS,
    TINY_DEEPSEEK,
    DeepSeekConfig,
    ExpertLayout,
    forward,
    kv_cache_specs,
    parameter_count,
    rope_tables,
    weight_specs,
)
from workloads.model import (
    BF16,
    BLOCK_TABLES,
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
    buffer_sizes,
    layer_prefix,
)

C = TINY_DEEPSEEK
CACHE = CacheConfig(num_blocks=16, block_size=4)

# deepseek-ai/DeepSeek-R1 config.json (the keys the description reads, and some it does not)
R1_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "vocab_size": 129280,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "max_position_embeddings": 163840,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
}


def test_the_r1_config_json_gives_the_built_in_and_its_671b_parameters():
    assert DeepSeekConfig.from_hf(R1_JSON, name="deepseek-r1") == BUILTIN["deepseek-r1"]
    # DeepSeek-V3 technical report: 671B parameters in total (the MTP module's 14B not counted).
    assert parameter_count(DEEPSEEK_R1) == pytest.approx(671e9, rel=0.002)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"model_type": "qwen2"}, "deepseek_v3"), ({"q_lora_rank": None}, "lacks q_lora_rank")],
)
def test_a_config_json_of_another_architecture_is_refused_by_name(change, match):
    raw = {k: v for k, v in {**R1_JSON, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        DeepSeekConfig.from_hf(raw)


def bind_call(call: OpCall):
    return bind(call.op, [x.spec for x in call.ins], [x.spec for x in call.outs], call.attrs)


@pytest.mark.parametrize(
    ("step", "queries"),
    [(Prefill((1000, 37)), 1), (Decode(tuple(range(1000, 1032)), 9), 2)],
    ids=["prefill", "decode-mtp"],
)
def test_every_call_of_r1_on_an_ep320_die_binds_and_reads_what_was_written_before(step, queries):
    cache = CacheConfig(num_blocks=64, block_size=128)
    layout = ExpertLayout(ep=320, shared_dies=32)
    written = {*weight_specs(DEEPSEEK_R1, layout), *kv_cache_specs(DEEPSEEK_R1, cache)}
    written |= {INPUT_IDS, POSITIONS, SLOTS, BLOCK_TABLES, LAST_TOKENS, MTP_IDS}
    for call in forward(DEEPSEEK_R1, cache, step, layout, mtp=True, queries=queries):
        bind_call(call)
        unwritten = [x.buffer for x in call.ins if x.buffer not in written]
        assert not unwritten, f"{call.op} reads {unwritten} before any call writes them"
        written |= {x.buffer for x in call.outs}
    assert {NEXT_TOKENS, DRAFT_TOKENS} <= written


def test_an_ep320_die_holds_one_routed_expert_and_no_shared_one():
    specs = weight_specs(DEEPSEEK_R1, ExpertLayout(ep=320, shared_dies=32))
    p = layer_prefix(3)
    assert specs[p + "mlp.experts.gate_up.weight"].shape == (1, 4096, 7168)
    assert p + "mlp.shared_experts.gate_up_proj.weight" not in specs
    assert weight_specs(DEEPSEEK_R1, ExpertLayout(ep=32))[p + "mlp.experts.down.weight"].shape == (8, 7168, 2048)


def test_absorbed_decode_reads_each_latent_once_for_all_heads():
    """MLA's point: a decode step's cache traffic is the latents' (576 per token per layer), not 128 heads' keys
    and values; doubling the heads adds query work, not cache bytes."""
    (call,) = [c for c in forward(DEEPSEEK_R1, CACHE, Decode((4,) * 8, 4)) if c.op == "MlaDecodeAttention"][:1]
    cost = bind_call(call).cost
    latent = 8 * 4 * 576 * 2
    weights = 128 * 256 * 512 * 2
    assert latent + weights < cost.hbm_bytes < latent + weights + 2 * 8 * 128 * 192 * 2 + 8 * 4 * 4


def test_an_int8_matmul_outruns_the_bf16_one_by_the_int8_rate_times_its_efficiency_when_compute_bound():
    """The cube's INT8 peak is twice its FP16 peak; the fitted INT8_EFF is what W8A8 GEMMs reach of it."""
    chip = profile("910C")
    f32, i8 = np.dtype(np.float32), np.dtype(np.int8)
    m = k = n = 8192
    int8 = bind(
        "QuantMatMul",
        [TensorSpec(i8, (m, k)), TensorSpec(i8, (n, k)), TensorSpec(f32, (m,)), TensorSpec(f32, (n,))],
        [TensorSpec(BF16, (m, n))],
        {},
    ).cost
    bf16 = bind(
        "MatMulV2",
        [TensorSpec(BF16, (m, k)), TensorSpec(BF16, (n, k))],
        [TensorSpec(BF16, (m, n))],
        {"transpose_x2": True},
    ).cost
    assert alone(chip, bf16) / alone(chip, int8) == pytest.approx(INT8_RATE * INT8_EFF, rel=0.02)
    assert INT8_RATE * INT8_EFF > 1.0


# -- numerics: the tiny model against the reference -------------------------------------------------------------


def random_weights(c: DeepSeekConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, spec in weight_specs(c, mtp=True).items():
        if spec.dtype == np.int8:
            weights[name] = rng.integers(-127, 128, spec.shape, dtype=np.int8)
        elif name.endswith(".scale"):
            fan_in = weight_specs(c, mtp=True)[name.removesuffix(".scale")].shape[-1]
            weights[name] = np.full(spec.shape, 1.0 / (127 * np.sqrt(fan_in / 3)), np.float32)
        elif name.endswith("norm.weight") or "layernorm" in name:
            weights[name] = (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        elif name.endswith("e_score_correction_bias"):
            weights[name] = (0.05 * rng.standard_normal(spec.shape)).astype(np.float32)
        else:
            weights[name] = (rng.standard_normal(spec.shape) / np.sqrt(spec.shape[-1])).astype(np.float32)
    weights[ROPE_COS], weights[ROPE_SIN] = rope_tables(c)
    weights["model.embed_tokens.weight"] *= np.sqrt(c.hidden_size)
    return weights


def run(calls: list[OpCall], buffers: dict[str, np.ndarray]) -> None:
    """Run the calls on host buffers (flat bytes per name), as the emulated NPU runs them in numeric mode."""
    for name, size in buffer_sizes(calls).items():
        if name not in buffers or buffers[name].nbytes < size:
            old = buffers.get(name)
            buffers[name] = np.zeros(size, np.uint8)
            if old is not None:
                buffers[name][: old.nbytes] = old

    def view(t):
        return buffers[t.buffer][t.offset : t.offset + t.spec.nbytes].view(t.spec.dtype).reshape(t.spec.shape)

    for call in calls:
        bind_call(call)
        results = REGISTRY[call.op].compute([view(x).copy() for x in call.ins], call.attrs)
        for out, result in zip(call.outs, results, strict=True):
            view(out)[...] = np.asarray(result).astype(out.spec.dtype).reshape(out.spec.shape)


def as_bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).copy()


def rms(x, w, eps=C.rms_norm_eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def qmm(x, weights, name):
    q, s = quantize(x)
    return (
        (q.astype(np.int64) @ weights[name].astype(np.int64).T).astype(np.float32)
        * s[:, None]
        * weights[name + ".scale"][None, :]
    )


def rotate(x, cos, sin):
    a, b = np.split(x, 2, -1)
    return x * cos + np.concatenate([-b, a], -1) * sin


def ffn(x, w_gu, s_gu, w_dn, s_dn):
    """A SwiGLU expert in W8A8 over rows x."""
    q, s = quantize(x)
    gu = (q.astype(np.int64) @ w_gu.astype(np.int64).T).astype(np.float32) * s[:, None] * s_gu[None, :]
    a, b = np.split(gu, 2, -1)
    sw = a / (1 + np.exp(-a)) * b
    q, s = quantize(sw)
    return (q.astype(np.int64) @ w_dn.astype(np.int64).T).astype(np.float32) * s[:, None] * s_dn[None, :]


def reference_layer(weights, i: int, h: np.ndarray) -> np.ndarray:
    """Layer i over a whole sequence h [S, H] (the residual stream), full recomputation; returns the new stream."""
    c, p = C, layer_prefix(i)
    s_len, n, dn, dr, dv = len(h), c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    x = rms(h, weights[p + "input_layernorm.weight"])
    q_a = rms(qmm(x, weights, p + "self_attn.q_a_proj.weight"), weights[p + "self_attn.q_a_layernorm.weight"])
    latent = rms(qmm(x, weights, p + "self_attn.kv_a_latent.weight"), weights[p + "self_attn.kv_a_layernorm.weight"])
    k_rope = qmm(x, weights, p + "self_attn.kv_a_rope.weight")
    q_nope = qmm(q_a, weights, p + "self_attn.q_b_nope.weight").reshape(s_len, n, dn)
    q_rope = qmm(q_a, weights, p + "self_attn.q_b_rope.weight").reshape(s_len, n, dr)
    cos, sin = (weights[t][:s_len, None, :] for t in (ROPE_COS, ROPE_SIN))
    q_rope, k_rope = rotate(q_rope, cos, sin), rotate(k_rope[:, None, :], cos, sin)
    kv = (latent @ weights[p + "self_attn.kv_b_proj.weight"].T).reshape(s_len, n, dn + dv)
    k = np.concatenate([kv[..., :dn], np.broadcast_to(k_rope, (s_len, n, dr))], -1)
    q = np.concatenate([q_nope, q_rope], -1)
    scores = np.einsum("snd,tnd->nst", q, k) / np.sqrt(dn + dr)
    scores = np.where(np.triu(np.ones((s_len, s_len), bool), 1), -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("nst,tnd->snd", probs, kv[..., dn:]).reshape(s_len, n * dv)
    h = h + qmm(attn, weights, p + "self_attn.o_proj.weight")
    x = rms(h, weights[p + "post_attention_layernorm.weight"])
    if i < c.first_k_dense_replace:
        w = [weights[p + f"mlp.{m}.weight{s}"] for m in ("gate_up_proj", "down_proj") for s in ("", ".scale")]
        return h + ffn(x, w[0], w[1], w[2], w[3])
    scores = 1 / (1 + np.exp(-(x @ weights[p + "mlp.gate.weight"].T)))
    out = ffn(
        x,
        *(
            weights[p + f"mlp.shared_experts.{m}.weight{s}"]
            for m in ("gate_up_proj", "down_proj")
            for s in ("", ".scale")
        ),
    )
    per_group = c.n_routed_experts // c.n_group
    for t in range(s_len):
        biased = scores[t] + weights[p + "mlp.gate.e_score_correction_bias"]
        groups = np.sort(biased.reshape(c.n_group, per_group), -1)[:, -2:].sum(-1)
        keep = np.argsort(-groups, kind="stable")[: c.topk_group]
        allowed = np.where(np.isin(np.arange(c.n_routed_experts) // per_group, keep), biased, -np.inf)
        chosen = np.argsort(-allowed, kind="stable")[: c.num_experts_per_tok]
        gate = scores[t, chosen] / scores[t, chosen].sum() * c.routed_scaling_factor
        for e, g in zip(chosen, gate, strict=True):
            gu, dn_ = p + "mlp.experts.gate_up.weight", p + "mlp.experts.down.weight"
            row = ffn(
                x[t : t + 1], weights[gu][e], weights[gu + ".scale"][e], weights[dn_][e], weights[dn_ + ".scale"][e]
            )
            out[t] += g * row[0]
    return h + out


def reference(weights, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(main model's greedy next token at every position, the MTP layer's draft at every position, fed each
    position's next token: the sequence's own, then the main model's at the end)."""
    h = weights["model.embed_tokens.weight"][tokens]
    for i in range(C.num_hidden_layers):
        h = reference_layer(weights, i, h)
    normed = rms(h, weights["model.norm.weight"])
    nxt = np.argmax(normed @ weights["lm_head.weight"].T, -1)
    p = layer_prefix(C.num_hidden_layers)
    e = rms(weights["model.embed_tokens.weight"][[*tokens[1:], nxt[-1]]], weights[p + "enorm.weight"])
    m = np.concatenate([e, rms(normed, weights[p + "hnorm.weight"])], -1) @ weights[p + "eh_proj.weight"].T
    m = reference_layer(weights, C.num_hidden_layers, m)
    draft = np.argmax(rms(m, weights[p + "shared_head.norm.weight"]) @ weights["lm_head.weight"].T, -1)
    return nxt, draft


PROMPTS = [list(b"DeepSeek on NPUs"), list(b"MLA")]


def test_tiny_deepseek_prefill_decode_and_mtp_give_the_reference_tokens():
    """Prefill two prompts, decode two steps (the second verifying two tokens per request, as MTP's next step
    does): every token — the main model's and the MTP layer's drafts — is the reference's."""
    weights = random_weights(C)
    buffers = {name: as_bytes(a) for name, a in weights.items()}
    for name, spec in kv_cache_specs(C, CACHE).items():
        buffers[name] = np.zeros(spec.nbytes, np.uint8)
    tables = [[0, 1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13]]  # blocks of 4 tokens

    def slots(r: int, positions) -> list[int]:
        return [tables[r][q // CACHE.block_size] * CACHE.block_size + q % CACHE.block_size for q in positions]

    def step_inputs(step, tokens, positions, mtp_ids):
        inputs = {
            INPUT_IDS: sum(tokens, []),
            POSITIONS: sum(positions, []),
            SLOTS: sum((slots(r, q) for r, q in enumerate(positions)), []),
            MTP_IDS: mtp_ids,
        }
        if isinstance(step, Prefill):
            inputs[LAST_TOKENS] = list(np.cumsum(step.prompt_lens) - 1)
        else:
            inputs[BLOCK_TABLES] = np.array([t[: step.max_blocks] for t in tables])
        for name, value in inputs.items():
            buffers[name] = as_bytes(np.asarray(value, np.int32))

    def outputs(name, n):
        return buffers[name][: 4 * n].view(np.int32).tolist()

    seqs = [list(p) for p in PROMPTS]
    expected = [reference(weights, s) for s in seqs]
    # Prefill: the MTP layer sees each position's next token (the prompt's, then the sampled one).
    step = Prefill(tuple(len(s) for s in seqs))
    mtp_ids = sum((s[1:] + [int(e[0][-1])] for s, e in zip(seqs, expected, strict=True)), [])
    step_inputs(step, seqs, [list(range(len(s))) for s in seqs], mtp_ids)
    run(forward(C, CACHE, step, mtp=True), buffers)
    assert outputs(NEXT_TOKENS, 2) == [int(e[0][-1]) for e in expected]
    assert outputs(DRAFT_TOKENS, 2) == [int(e[1][-1]) for e in expected]
    for s, e in zip(seqs, expected, strict=True):
        s.append(int(e[0][-1]))
    # A decode step of one token each, then one verifying two (the sampled token and the reference's next).
    for queries in (1, 2):
        new = [[s[-1]] if queries == 1 else [s[-1], int(reference(weights, s)[0][-1])] for s in seqs]
        if queries == 2:
            for s, n in zip(seqs, new, strict=True):
                s.append(n[1])
        step = Decode(tuple(len(s) for s in seqs), 6)
        positions = [list(range(len(s) - queries, len(s))) for s in seqs]
        expected = [reference(weights, s) for s in seqs]
        mtp_ids = sum((list(e[0][-queries:]) for e in expected), [])
        step_inputs(step, new, positions, [int(x) for x in mtp_ids])
        run(forward(C, CACHE, step, mtp=True, queries=queries), buffers)
        got = outputs(NEXT_TOKENS, 2 * queries)
        assert got == [int(x) for e in expected for x in e[0][-queries:]]
        assert outputs(DRAFT_TOKENS, 2 * queries) == [int(x) for e in expected for x in e[1][-queries:]]
        for s, e in zip(seqs, expected, strict=True):
            s.append(int(e[0][-1]))


def test_the_busiest_die_of_an_ep_group_is_a_loaded_routed_die_or_a_shared_expert_die():
    layout = ExpertLayout(ep=320, shared_dies=32)
    # 96 tokens per die: a routed die gets 96 x 8 x 320 / 288 rows on average, a shared die 96 x 320 / 32
    assert layout.received(DEEPSEEK_R1, 96) == 960
    loaded = ExpertLayout(ep=320, shared_dies=32, load=1.5)
    assert loaded.received(DEEPSEEK_R1, 96) == math.ceil(96 * 8 * 320 / 288 * 1.5)
    assert ExpertLayout().received(DEEPSEEK_R1, 96) == 96 * 8  # one die holds every expert


def test_an_expert_layout_that_cannot_exist_is_refused_by_its_numbers():
    with pytest.raises(ValueError, match="shared_dies 8"):
        ExpertLayout(ep=8, shared_dies=8)
