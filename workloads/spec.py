"""What a serving deployment is, without running it: the deployments there are, and a `ServeSpec` — the model,
its KV cache and batch sizes, the chips' policy — from which the live coordinator (workloads/deploy.py) and the
simulator (sim/) both build their engines' batching cores. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from workloads.batching import BatchingConfig, Role
from workloads.model import ModelConfig, kv_block_bytes, model_config, parameter_count

DEPLOYMENTS = ("direct", "colocated", "disaggregated")
GiB = 1 << 30


@dataclass(frozen=True)
class ServeSpec:
    """What to serve and how big its KV cache and batches are."""

    model: str = "tiny"
    num_blocks: int = 256
    block_size: int = 16
    max_num_seqs: int = 16
    max_model_len: int = 256
    # Prompt tokens one prefill step may carry (vLLM's max_num_batched_tokens); a longer prompt is prefilled in
    # chunks over several steps. 0: no chunking, a prompt is prefilled whole in one step.
    max_num_batched_tokens: int = 0
    seed: int = 0
    timing: bool = False  # shapes only (a 7B model's weights cost no host memory); tokens are then meaningless
    time_scale: float = 1.0  # wall seconds per modeled second of the emulated NPUs
    policy: str = "fifo"  # the chips' scheduling policy (scheduler/policies.py) and its options
    policy_options: dict = field(default_factory=dict, hash=False)

    @classmethod
    def for_model(cls, model: str | ModelConfig, **changes) -> ServeSpec:
        """Sizes that fit the model on a 910B2 virtual NPU (32 GiB, two per chip): the tiny model computes real
        tokens; a 7B-class model runs in timing mode, its KV cache what its weights leave of the quota."""
        config = model if isinstance(model, ModelConfig) else model_config(model)
        model = config.name
        if config.name == "tiny":
            return replace(cls(model=model, max_model_len=config.max_position_embeddings), **changes)
        block_size = 128
        kv_bytes = 32 * GiB * 0.9 - parameter_count(config) * config.dtype.itemsize  # a tenth for activations
        defaults = cls(
            model=model,
            num_blocks=int(kv_bytes // kv_block_bytes(config, block_size)),
            block_size=block_size,
            max_num_seqs=64,
            max_model_len=min(8192, config.max_position_embeddings),
            timing=True,
        )
        return replace(defaults, **changes)

    def batching(self, role: Role) -> BatchingConfig:
        """The batching core's configuration of an engine in `role` (the live workers and the simulator alike)."""
        return BatchingConfig(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or self.max_model_len,
            max_model_len=self.max_model_len,
            role=role,
            chunked_prefill=bool(self.max_num_batched_tokens),
        )
