"""Physical NPUs: the interface the scheduler drives, the emulated Ascend NPU, and chip profiles."""
