"""The daemon's world: physical NPUs (device + engine driver) and the virtual NPUs carved out of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from interposer.handles import AddressSpace
from interposer.ipc import IpcRegistry
from npu.executor import Executor
from scheduler.policies import make_policy
from scheduler.policy import Cores
from scheduler.runner import Runner
from scheduler.stream import Phase


@dataclass(eq=False)
class PhysicalUnit:
    name: str
    npu: Executor
    runner: Runner
    policy: str  # the name of the policy its engine runs

    def cores(self) -> dict:
        """AI cores the kernels on the chip hold now, by side: decode, and the rest (prefill and unknown)."""
        held = Cores.of(self.runner.engine.running, self.npu.profile)
        return {"decode": held.decode[0], "prefill": held.rest[0], "total": self.npu.profile.ai_cores}

    def switch_policy(self, name: str, options: dict) -> None:
        """Run policy `name` from now on: queued work stays queued, in order; what runs finishes as it started.
        ValueError, and nothing changed, if its options do not fit this chip."""
        self.runner.set_policy(make_policy(name, **options))
        self.policy = name


@dataclass(eq=False)
class VirtualNPU:
    index: int
    name: str
    physical: PhysicalUnit
    quota: int  # bytes of device memory this virtual NPU may hold
    role: Phase  # UNKNOWN: any; otherwise every stream on it runs in this phase
    uid: int = 0
    gid: int = 0
    mode: int = 0o666  # file mode of its device node
    used: int = 0
    sessions: dict = field(default_factory=dict)  # live Translators (as keys: a close is O(1))
    ipc: IpcRegistry = field(default_factory=IpcRegistry)  # shared by every virtual NPU of one daemon
    space: AddressSpace = field(init=False)

    def __post_init__(self) -> None:
        self.space = AddressSpace(self.index, self.name)


@dataclass(eq=False)
class Topology:
    physical: list[PhysicalUnit]
    virtual: list[VirtualNPU]
    time_scale: float
    policy_options: dict[str, dict] = field(default_factory=dict)  # [policy.<name>]: at start and on a switch

    def status(self) -> dict:
        """What `vdevctl ls` shows; JSON-serialisable."""
        return {
            "physical": [
                {
                    "name": p.name,
                    "chip": p.npu.profile.name,
                    "mode": p.npu.mode,
                    "policy": p.policy,
                    "policy_state": p.runner.engine.policy.status(),
                    "memory_used": p.npu.memory.used,
                    "memory_total": p.npu.memory.capacity,
                    "queued": p.runner.engine.queued,
                    "running": len(p.runner.engine.running),
                    "cores": p.cores(),
                    "modeled_time_s": p.runner.engine.t,
                }
                for p in self.physical
            ],
            "virtual": [
                {
                    "name": v.name,
                    "physical": v.physical.name,
                    "chip": v.physical.npu.profile.name,
                    "role": "any" if v.role is Phase.UNKNOWN else v.role.value,
                    "memory_used": v.used,
                    "memory_quota": v.quota,
                    "sessions": [s.status() for s in v.sessions],
                }
                for v in self.virtual
            ],
        }
