"""The emulated op library: each op's shape/dtype rules, numpy kernel and cost function.

Importing this package registers every op in `REGISTRY`; `bind()` checks a launch description against its op.
"""

# Importing a module registers its ops (mla, moe, quant: DeepSeek-V3's attention, experts and INT8 W8A8).
from npu.emulated.ops import (  # noqa: F401
    attention,
    conv,
    elementwise,
    matmul,
    mla,
    moe,
    norm,
    pool,
    quant,
    resize,
    shape,
)
from npu.emulated.ops.base import REGISTRY, Kernel, KernelTask, OpNotFound, TensorSpec, bind

__all__ = ["REGISTRY", "Kernel", "KernelTask", "OpNotFound", "TensorSpec", "bind"]
