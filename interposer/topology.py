"""The daemon's world: physical NPUs (device + engine driver) and the virtual NPUs carved out of them.

Virtual NPUs come and go at run time (`vdevctl vnpu create|resize|destroy`): the checks live here, next to what
they protect; the device files and the sessions on them are the filesystem's business (vdevfs/fs.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from interposer.handles import AddressSpace
from interposer.ipc import IpcRegistry
from npu.executor import Executor
from scheduler.policies import make_policy
from scheduler.policy import Cores
from scheduler.runner import Runner
from scheduler.stream import Phase, Tenant


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
    tenant: Tenant = field(default_factory=Tenant)  # its core cap and what its kernels used, kept by the engine
    space: AddressSpace = field(init=False)

    def __post_init__(self) -> None:
        self.space = AddressSpace(self.index, self.name)

    def resize(self, memory: int | None = None, cores: int | None = None) -> None:
        """A new quota and core cap for the running sessions too: get_mem_info answers the new total at once, and
        the next kernel dispatched obeys the cap. ValueError, and nothing changed, where it cannot be."""
        chip = self.physical.npu.profile
        if memory is not None:
            if memory < self.used:
                raise ValueError(
                    f"{self.name}: {memory} bytes is below the {self.used} bytes its sessions hold; free memory first"
                )
            check_memory(memory, self.physical)
        if cores is not None:
            check_cores(cores, chip.ai_cores)
        if memory is not None:
            self.quota = memory
        if cores is not None:
            self.tenant.cores = None if cores == chip.ai_cores else cores

    @property
    def cores(self) -> int | None:
        return self.tenant.cores


def check_memory(memory: int, unit: PhysicalUnit) -> None:
    capacity = unit.npu.memory.capacity
    if not 0 < memory <= capacity:
        raise ValueError(f"memory {memory} bytes: must be more than 0 and at most {unit.name}'s {capacity} bytes")


def check_cores(cores: int, ai_cores: int) -> None:
    if not 1 <= cores <= ai_cores:
        raise ValueError(f"cores {cores}: must be 1 to the chip's {ai_cores} AI cores")


@dataclass(eq=False)
class Topology:
    physical: list[PhysicalUnit]
    virtual: list[VirtualNPU]
    time_scale: float
    policy_options: dict[str, dict] = field(default_factory=dict)  # [policy.<name>]: at start and on a switch
    ipc: IpcRegistry = field(default_factory=IpcRegistry)  # IPC keys are the daemon's: any vNPU may import one

    def add(
        self, name: str, physical: str, memory: int, role: Phase = Phase.UNKNOWN, index: int | None = None, **node
    ) -> VirtualNPU:
        """A new virtual NPU (`node`: uid, gid, mode, cores); `index` (its device addresses' span) as an NPU
        process is told it, else the lowest free. ValueError naming what is wrong, and nothing changed, where
        it cannot be."""
        if any(v.name == name for v in self.virtual):
            raise ValueError(f"{name}: a virtual NPU of that name exists")
        units = {p.name: p for p in self.physical}
        unit = units.get(physical)
        if unit is None:
            raise ValueError(f"{physical}: no such physical NPU (have {', '.join(units)})")
        check_memory(memory, unit)
        cores = node.pop("cores", None)
        if cores is not None:
            check_cores(cores, unit.npu.profile.ai_cores)
        taken = {v.index for v in self.virtual}
        if index is None:
            index = next(i for i in range(len(taken) + 1) if i not in taken)
        elif index in taken:
            raise ValueError(f"{name}: address span {index} is another virtual NPU's")
        vdev = VirtualNPU(index, name, unit, memory, role, ipc=self.ipc, **node)
        vdev.resize(cores=cores)
        self.virtual.append(vdev)
        return vdev

    def remove(self, vdev: VirtualNPU) -> None:
        """Forget a virtual NPU whose sessions are all closed."""
        assert not vdev.sessions, "close its sessions first"
        self.virtual.remove(vdev)

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
                    "busy_core_seconds": {phase.value: s for phase, s in p.runner.engine.core_s.items()},
                    "up": True,  # one process serves every physical NPU: it is up while the status answers
                    # the chip's clock now, idle or not: rates over a window of it (vdevctl top) count idle time
                    "modeled_time_s": max(p.runner.engine.t, p.runner.now()),
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
                    "cores": v.cores,
                    "kernels": v.tenant.kernels,
                    "busy_core_seconds": v.tenant.core_s,
                    "sessions": [s.status() for s in v.sessions],
                }
                for v in self.virtual
            ],
        }
