"""A model's weights on the host: deterministic from a seed, or a Hugging Face safetensors checkpoint; and the
buffers the forward pass reads, made from them (model.weight_specs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.numpy

from npu.emulated.ops.base import TensorSpec
from workloads.model import GATE_UP, ROPE_COS, ROPE_SIN, ModelConfig, rope_tables, weight_specs


def checkpoint_specs(c: ModelConfig) -> dict[str, TensorSpec]:
    """The tensors of a Hugging Face checkpoint of this model: gate and up projections apart, no rotary tables."""
    specs = {}
    for name, spec in weight_specs(c).items():
        if name.endswith(GATE_UP):
            prefix = name.removesuffix(GATE_UP)
            half = TensorSpec(spec.dtype, (c.intermediate_size, c.hidden_size))
            specs[prefix + "mlp.gate_proj.weight"] = specs[prefix + "mlp.up_proj.weight"] = half
        elif name not in (ROPE_COS, ROPE_SIN):
            specs[name] = spec
    return specs


def random_checkpoint(c: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Weights that keep activations near unit scale through the layers: linear weights N(0, 1/in), biases
    small, norm gains near 1, embeddings N(0, 1)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, spec in checkpoint_specs(c).items():
        if name.endswith("norm.weight"):
            x = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        elif name.endswith(".bias"):
            x = 0.1 * rng.standard_normal(spec.shape)
        elif name == "model.embed_tokens.weight":
            x = rng.standard_normal(spec.shape)
        else:
            x = rng.standard_normal(spec.shape) / np.sqrt(spec.shape[1])
        tensors[name] = x.astype(spec.dtype)
    return tensors


def load_checkpoint(c: ModelConfig, path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file with Hugging Face's tensor names, checked against the model and cast to its dtype."""
    tensors = safetensors.numpy.load_file(str(path))
    specs = checkpoint_specs(c)
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors of {c.name} are missing, first {missing[0]!r}")
    for name, spec in specs.items():
        if tensors[name].shape != spec.shape:
            raise ValueError(f"{path}: {name} has shape {list(tensors[name].shape)}, {c.name} needs {list(spec.shape)}")
    return {name: tensors[name].astype(spec.dtype) for name, spec in specs.items()}


def device_weights(c: ModelConfig, checkpoint: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weight buffers of model.weight_specs, from a checkpoint's tensors."""
    cos, sin = rope_tables(c)
    weights = {ROPE_COS: cos, ROPE_SIN: sin}
    for name in weight_specs(c):
        if name.endswith(GATE_UP):
            p = name.removesuffix(GATE_UP)
            weights[name] = np.concatenate(
                [checkpoint[p + "mlp.gate_proj.weight"], checkpoint[p + "mlp.up_proj.weight"]]
            )
        elif name not in weights:
            weights[name] = checkpoint[name]
    return {name: np.ascontiguousarray(x) for name, x in weights.items()}
