"""Operator-facing commands: vdevctl, benchmarks, process launchers."""
