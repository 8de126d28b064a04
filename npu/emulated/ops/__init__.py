"""The emulated op library: each op's shape/dtype rules, numpy kernel and cost function.

Importing this package registers every op in `REGISTRY`; `bind()` checks a launch description against its op.
"""

from npu.emulated.ops import attention, conv, elementwise, matmul, norm, pool, resize, shape  # noqa: F401  (registers)
from npu.emulated.ops.base import REGISTRY, Kernel, KernelTask, OpNotFound, TensorSpec, bind

__all__ = ["REGISTRY", "Kernel", "KernelTask", "OpNotFound", "TensorSpec", "bind"]
