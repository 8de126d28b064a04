"""Per-physical-NPU scheduling: stream queues, events, phases and pluggable dispatch policies."""
