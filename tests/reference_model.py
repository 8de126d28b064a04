"""A plain numpy implementation of the Qwen2/Llama transformer, written from the Hugging Face code and
independently of workloads/model.py: float64, the whole sequence recomputed for every token (no KV cache, no
paging, no fused ops). Tests compare the NPU's greedy tokens with its own."""

from __future__ import annotations

import numpy as np

from workloads.model import ModelConfig


def reference_logits(c: ModelConfig, w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Hugging Face Qwen2/Llama forward pass in float64 over a whole sequence; the last position's logits."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    n, n_kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    s = len(tokens)

    def norm(x, gain):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + c.rms_norm_eps) * gain

    def linear(x, name, bias=False):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y

    angles = np.arange(s)[:, None] * (1.0 / c.rope_theta ** (np.arange(0, d, 2) / d))[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]  # [S, 1, D/2]

    def rotate(x):  # [S, heads, D]: the two halves of each head rotate as pairs
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    causal = np.triu(np.ones((s, s), bool), k=1)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        bias = c.attention_bias
        q = rotate(linear(h, p + "self_attn.q_proj", bias).reshape(s, n, d))
        k = rotate(linear(h, p + "self_attn.k_proj", bias).reshape(s, n_kv, d))
        v = linear(h, p + "self_attn.v_proj", bias).reshape(s, n_kv, d)
        out = np.empty((s, n, d))
        for head in range(n):
            kv = head // (n // n_kv)
            scores = q[:, head] @ k[:, kv].T / np.sqrt(d)
            scores[causal] = -np.inf
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, head] = probs / probs.sum(axis=-1, keepdims=True) @ v[:, kv]
        x = x + linear(out.reshape(s, n * d), p + "self_attn.o_proj")
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
    head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    return norm(x[-1], w["model.norm.weight"]) @ w[head].T


def reference_greedy(c: ModelConfig, w: dict[str, np.ndarray], prompts: list[list[int]], steps: int):
    out = []
    for prompt in prompts:
        sequence, new = list(prompt), []
        for _ in range(steps + 1):
            logits = reference_logits(c, w, sequence)
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > 1e-4, "a near-tie: float32 on the device may pick either; change the seed"
            new.append(int(np.argmax(logits)))
            sequence.append(new[-1])
        out.append(new)
    return out
