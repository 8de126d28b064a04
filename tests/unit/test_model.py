"""The model described as data (workloads/model.py), its weights, and its pyACL executor in direct mode, checked
against a plain numpy implementation of the same transformer written here from the Hugging Face Qwen2 code
(full recomputation of every sequence: no KV cache, no paging, no fused ops)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from npu.emulated.ops import bind
from tests.conftest import ROOT
from tests.reference_model import reference_greedy
from tools.launch import one_npu_config
from tools.vdevctl import SHIM_PATH
from workloads.generate import block_tables, generate
from workloads.model import (
    BLOCK_TABLES,
    BUILTIN,
    INPUT_IDS,
    LAST_TOKENS,
    NEXT_TOKENS,
    POSITIONS,
    ROPE_COS,
    ROPE_SIN,
    SLOTS,
    CacheConfig,
    Decode,
    ModelConfig,
    OpCall,
    Prefill,
    forward,
    kv_cache_specs,
    model_config,
    parameter_count,
    step_inputs,
    weight_specs,
)
from workloads.weights import checkpoint_specs, device_weights, load_checkpoint, random_checkpoint

TINY, QWEN = model_config("tiny"), model_config("qwen2.5-7b")
PROMPTS = [list(b"Hello, NPU"), list(b"abc")]  # two prompts of different lengths
STEPS = 5

# Qwen/Qwen2.5-7B-Instruct config.json (the keys this layer reads, and some it does not)
QWEN_JSON = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 152064,
}
# meta-llama/Llama-3.2-1B config.json (abridged)
LLAMA_JSON = {
    "model_type": "llama",
    "attention_bias": False,
    "head_dim": 64,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


# -- configuration ----------------------------------------------------------------------------------------


def test_qwen2_config_json_gives_the_built_in_qwen25_7b(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN_JSON))
    assert ModelConfig.from_hf(path, name="qwen2.5-7b") == QWEN
    assert QWEN.head_dim == 128 and QWEN.attention_bias and not QWEN.tie_word_embeddings
    assert parameter_count(QWEN) == pytest.approx(7.62e9, rel=1e-3)  # the model card's 7.62 B
    per_token = sum(s.nbytes for s in kv_cache_specs(QWEN, CacheConfig(1, 1)).values())
    assert per_token == 56 << 10  # 28 layers x (K + V) x 4 KV heads x 128 x 2 bytes


def test_llama_config_json_has_no_attention_bias_and_may_tie_its_head():
    llama = ModelConfig.from_hf(LLAMA_JSON)
    assert (llama.hidden_size, llama.head_dim, llama.num_key_value_heads) == (2048, 64, 8)
    assert not llama.attention_bias and llama.tie_word_embeddings
    names = weight_specs(llama)
    assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_proj.bias" not in names
    head = forward(llama, CacheConfig(4, 16), Decode((3,), 1))[-2]
    assert head.op == "MatMulV2" and head.ins[1].buffer == "model.embed_tokens.weight"


@pytest.mark.parametrize(
    ("change", "match"),
    [({"model_type": "gpt2"}, "model_type 'gpt2'"), ({"torch_dtype": "int4"}, "torch_dtype 'int4'")],
)
def test_an_unknown_config_json_is_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**QWEN_JSON, **change})


# -- the description --------------------------------------------------------------------------------------


def bind_call(call: OpCall):
    return bind(call.op, [x.spec for x in call.ins], [x.spec for x in call.outs], call.attrs)


STEPS_7B = [Prefill((1000, 37)), Decode(tuple(range(1000, 1032)), 9)]


@pytest.mark.parametrize("step", STEPS_7B, ids=["prefill", "decode"])
def test_every_call_of_qwen25_7b_binds_and_reads_what_was_written_before(step):
    """bind() accepts each call as it is (what a simulator will feed the engine), and every activation a call
    reads was written by an earlier call: the order is a forward pass."""
    cache = CacheConfig(num_blocks=64, block_size=128)
    weights, pools = weight_specs(QWEN), kv_cache_specs(QWEN, cache)
    written = {*weights, *pools, INPUT_IDS, POSITIONS, SLOTS, BLOCK_TABLES, LAST_TOKENS}
    for call in forward(QWEN, cache, step):
        bind_call(call)
        unwritten = [x.buffer for x in call.ins if x.buffer not in written]
        assert not unwritten, f"{call.op} reads {unwritten} before any call writes them"
        written |= {x.buffer for x in call.outs}
    assert NEXT_TOKENS in written


def test_a_decode_step_reads_every_weight_once_and_only_the_cache_in_use():
    cache = CacheConfig(num_blocks=300, block_size=128)
    step = Decode((1024,) * 32, 8)
    calls = forward(QWEN, cache, step)
    reads: dict[str, int] = {}
    for call in calls:
        for x in call.ins:
            reads[x.buffer] = reads.get(x.buffer, 0) + 1
    weights = set(weight_specs(QWEN)) - {ROPE_COS, ROPE_SIN}  # the rotary tables are gathered, a row a token
    assert {name: reads.get(name) for name in weights} == dict.fromkeys(weights, 1)
    attention = [c for c in calls if c.op == "IncreFlashAttention"]
    assert len(attention) == QWEN.num_hidden_layers
    assert attention[0].attrs["actual_seq_lengths"] == [1024] * 32 and attention[0].attrs["block_size"] == 128
    kernel = bind_call(attention[0])
    kv_bytes = 2 * 32 * 1024 * 4 * 128 * 2  # K and V of 32 requests x 1024 tokens x 4 heads x 128, bf16
    assert kv_bytes < kernel.cost.hbm_bytes < kv_bytes * 1.01  # not the 300-block pools


def test_prefill_attends_within_each_prompt_and_samples_its_last_token():
    calls = forward(TINY, CacheConfig(8, 4), Prefill((5, 3)))
    prompt = [c for c in calls if c.op == "PromptFlashAttention"][:2]
    row = TINY.num_attention_heads * TINY.head_dim * 4  # bytes of one token's queries
    assert [(c.ins[0].offset, c.ins[0].spec.shape) for c in prompt] == [(0, (1, 5, 64)), (5 * row, (1, 3, 64))]
    assert all(c.attrs["next_tokens"] == 0 for c in prompt)  # causal
    inputs = step_inputs(Prefill((5, 3)), [[1] * 5, [2] * 3], [[6, 2], [7]], 4)
    assert inputs[LAST_TOKENS].tolist() == [4, 7]
    assert inputs[SLOTS].tolist() == [24, 25, 26, 27, 8, 28, 29, 30]  # block 6 then 2; block 7


def test_a_decode_token_goes_to_the_slot_of_its_position():
    inputs = step_inputs(Decode((5, 1), 3), [[9], [8]], [[6, 2], [7]], 4)
    assert inputs[POSITIONS].tolist() == [4, 0]
    assert inputs[SLOTS].tolist() == [2 * 4 + 0, 7 * 4 + 0]
    assert inputs[BLOCK_TABLES].tolist() == [[6, 2, 0], [7, 0, 0]]


# -- weights ----------------------------------------------------------------------------------------------


def test_a_safetensors_checkpoint_loads_as_the_same_weights(tmp_path):
    weights = random_checkpoint(TINY, seed=3)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(weights, str(path))
    loaded = load_checkpoint(TINY, path)
    assert loaded.keys() == weights.keys()
    assert all(np.array_equal(loaded[k], weights[k]) for k in weights)


def test_a_checkpoint_that_is_not_the_model_is_refused_by_tensor(tmp_path):
    weights = random_checkpoint(TINY, seed=3)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, str(path))
    with pytest.raises(ValueError, match="'model.norm.weight'"):
        load_checkpoint(TINY, path)
    weights["lm_head.weight"] = weights["lm_head.weight"][:10]
    safetensors.numpy.save_file(weights, str(path))
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \[10, 64\]"):
        load_checkpoint(TINY, path)


def test_device_weights_fuse_gate_and_up_and_match_the_description():
    hf = random_checkpoint(TINY, seed=0)
    assert set(hf) == set(checkpoint_specs(TINY))
    weights = device_weights(TINY, hf)
    specs = weight_specs(TINY)
    assert {k: (v.dtype, v.shape) for k, v in weights.items()} == {k: (s.dtype, s.shape) for k, s in specs.items()}
    gate_up = weights["model.layers.1.mlp.gate_up_proj.weight"]
    assert np.array_equal(gate_up[: TINY.intermediate_size], hf["model.layers.1.mlp.gate_proj.weight"])


@pytest.fixture(scope="module")
def expected():
    return reference_greedy(TINY, random_checkpoint(TINY, seed=0), PROMPTS, STEPS)


# -- the executor -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl(direct_acl):
    """`import acl` as an interposed program gets it, in direct mode (the built-in numeric NPUs)."""
    assert direct_acl.init() == 0
    yield direct_acl
    assert direct_acl.finalize() == 0


def tiny_model(acl, seed: int = 0, buckets: tuple[int, ...] = ()):
    from workloads.acl_executor import AclModel

    tables = block_tables([len(p) + STEPS for p in PROMPTS], 4)
    cache = CacheConfig(num_blocks=sum(map(len, tables)) + 2, block_size=4)  # the last one: graphs' scratch
    return AclModel(TINY, cache, device_weights(TINY, random_checkpoint(TINY, seed)), buckets=buckets)


def test_tiny_model_through_pyacl_gives_the_reference_tokens(acl, expected):
    """Prefill of two prompts of different lengths, then batched decode steps reading the paged cache."""
    model = tiny_model(acl)
    try:
        assert generate(model, PROMPTS, STEPS) == expected
    finally:
        model.close()


@pytest.mark.parametrize("buckets", [(2,), (4,)], ids=["bucket-fits", "bucket-padded"])
def test_decode_as_captured_graphs_gives_the_reference_tokens(acl, expected, buckets):
    """Each decode step replays the bucket's graph, its attention updated with the step's lengths; a batch
    smaller than its bucket is padded (the padding writes into the scratch block)."""
    model = tiny_model(acl, buckets=buckets)
    try:
        assert generate(model, PROMPTS, STEPS) == expected
        assert set(model.graphs) == set(buckets)  # captured once, replayed every step
    finally:
        model.close()


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_prefill_gives_the_reference_tokens(acl, expected, chunk):
    """Prompts prefilled a chunk at a time: each later chunk attends to the context already in the paged cache
    (gathered from the pools) and causally to itself, so the tokens are the whole prompt's."""
    model = tiny_model(acl)
    try:
        assert generate(model, PROMPTS, STEPS, chunk=chunk) == expected
    finally:
        model.close()


def test_tiny_model_gives_the_same_tokens_whatever_blocks_it_is_given(acl, expected):
    """Scattered, interleaved blocks (the pool's last ones first) read the same cache as contiguous ones."""
    model = tiny_model(acl)
    try:
        blocks = list(range(model.cache.num_blocks))[::-1]
        tables = [blocks[0::2][:4], blocks[1::2][:4]]  # 4 blocks of 4 hold each request's 10 + 5 tokens
        assert generate(model, PROMPTS, STEPS, tables) == expected
    finally:
        model.close()


def run_program(*args: str, env: dict | None = None) -> dict:
    """python -m workloads.generate ARGS as an interposed program in direct mode; its JSON line."""
    env = {**os.environ, "FLEXNPU_DIRECT": "1", "PYTHONPATH": SHIM_PATH, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "workloads.generate", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_safetensors_checkpoint_gives_the_reference_tokens(tmp_path, expected):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_checkpoint(TINY, seed=0), str(path))
    prompts = [arg for p in PROMPTS for arg in ("--prompt", bytes(p).decode())]
    out = run_program("tokens", "--checkpoint", str(path), *prompts, "--steps", str(STEPS))
    assert out["tokens"] == expected


TIMING = one_npu_config("timing")


def test_a_qwen25_7b_decode_step_of_batch_32_runs_in_timing_mode(tmp_path):
    """28 layers, 32 requests of 1024 tokens: the step is bound by reading the weights and the KV cache."""
    config = tmp_path / "timing.toml"
    config.write_text(TIMING)
    out = run_program(
        "decode", "--batch", "32", "--context", "1024", "--steps", "2", env={"FLEXNPU_CONFIG": str(config)}
    )
    hbm = 32 * 24 * 1.8e9  # 910B2: 32 B/cycle x 24 AI cores x 1.8 GHz
    read = parameter_count(QWEN) * 2 + 32 * 1025 * (56 << 10)
    assert read / hbm * 1e3 < out["device_ms"][-1] < 1.5 * read / hbm * 1e3


def test_the_built_ins_are_what_their_names_say():
    assert set(BUILTIN) == {"tiny", "qwen2.5-7b"}
    with pytest.raises(ValueError, match="no such built-in model"):
        model_config("gpt-5")
