"""The registry of dispatch policies, by the name a config or `vdevctl policy` uses, and their options."""

from __future__ import annotations

import inspect

from scheduler.flex import Flex
from scheduler.policy import Fifo, Policy
from scheduler.static import Static

POLICIES: dict[str, type] = {cls.name: cls for cls in (Fifo, Static, Flex)}


def options(name: str) -> list[str]:
    """The options a policy takes (its constructor's keyword arguments)."""
    return [p for p in inspect.signature(POLICIES[name]).parameters]


def make_policy(name: str, **opts) -> Policy:
    """A fresh policy; an unknown name or option raises ValueError naming the valid ones."""
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r} (have {', '.join(POLICIES)})")
    unknown = set(opts) - set(options(name))
    if unknown:
        have = ", ".join(options(name)) or "none"
        raise ValueError(f"policy {name!r} has no option {', '.join(sorted(unknown))} (its options: {have})")
    return POLICIES[name](**opts)
