"""The emulated Ascend NPU: real numerics with numpy (numeric mode) or shapes only (timing mode)."""
