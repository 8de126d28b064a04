"""The `pyacl` backend: a physical NPU driven through a vendor pyACL module (`import acl` on an Ascend host).

Memory is the device's: allocations are `acl.rt.malloc`s, bytes move with `acl.rt.memcpy`. Each task the engine
starts goes to a vendor stream (one per task running at once, from a pool) after the stream is given the core
limits the policy chose (`acl.rt.set_stream_res_limit`, ACL_RT_DEV_RES_CUBE_CORE / VECTOR_CORE); an event
recorded after it tells when it is done. Completions are found by polling the events (`query_event_status`),
every POLL_S of modeled time while work is out, so the engine's time is the host's clock, as it must be with
a real device.

The tests' vendor is this project's own shim in direct mode, so all of this runs for real without hardware.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from npu.emulated import dtypes
from npu.emulated.ops import KernelTask
from npu.errors import AclError, FlexNPUError, InvalidParam, NotSupported, OutOfMemory
from npu.executor import Job
from npu.memory import Buffer, rounded_size
from npu.profiles import ChipProfile
from npu.tasks import DeviceToDevice, DeviceToHost, Fill, HostToDevice

POLL_S = 50e-6
ACL_HBM_MEM = 1
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE = 1, 2, 3
ACL_FORMAT_ND = 2
CUBE_CORE, VECTOR_CORE = 0, 1  # aclrtDevResLimitType
EVENT_COMPLETE = 1  # ACL_EVENT_RECORDED_STATUS_COMPLETE


class VendorError(FlexNPUError):
    """A vendor call failed: its code is the vendor's."""


def checked(what: str, result):
    """pyACL returns `ret` or a tuple with `ret` last: raise on failure, return the rest."""
    if isinstance(result, tuple):
        *values, ret = result
    else:
        values, ret = [], result
    if ret != 0:
        raise VendorError(f"vendor pyACL {what} failed with {ret}", ret)
    return values[0] if len(values) == 1 else values


class VendorMemory:
    """Device memory of the vendor's device; also the Store its buffers read and write through."""

    def __init__(self, acl) -> None:
        self.acl = acl
        self.backed = True
        self.used = 0
        _, self.capacity = checked("get_mem_info", acl.rt.get_mem_info(ACL_HBM_MEM))

    def alloc(self, size: int) -> Buffer:
        if size <= 0:
            raise InvalidParam(f"malloc size must be > 0, got {size}")
        real = rounded_size(size)
        if self.used + real > self.capacity:
            free = self.capacity - self.used
            raise OutOfMemory(f"physical device out of memory: {real} bytes requested, {free} free")
        address = checked("rt.malloc", self.acl.rt.malloc(size, 0))
        self.used += real
        return Buffer(real, None, address=address, store=self, home=self)

    def free(self, buffer: Buffer) -> None:
        if not buffer.let_go():
            return
        buffer.freed = True
        self.used -= buffer.size
        checked("rt.free", self.acl.rt.free(buffer.address))

    def read(self, address: int, size: int) -> bytes:
        acl = self.acl
        host = checked("rt.malloc_host", acl.rt.malloc_host(size))
        try:
            checked("rt.memcpy", acl.rt.memcpy(host, size, address, size, DEVICE_TO_HOST))
            return acl.util.ptr_to_bytes(host, size)
        finally:
            acl.rt.free_host(host)

    def write(self, address: int, data) -> None:
        data = bytes(data)
        if data:
            checked(
                "rt.memcpy",
                self.acl.rt.memcpy(address, len(data), self.acl.util.bytes_to_ptr(data), len(data), HOST_TO_DEVICE),
            )


@dataclass(eq=False)
class _Out:
    """A job on a vendor stream, and what must live until it completes."""

    job: Job
    stream: int
    event: int
    keep: list = field(default_factory=list)  # tensor descs, data buffers, attr, host bytes


class PyaclNPU:
    def __init__(self, name: str, profile: ChipProfile, module: str = "acl", device: int = 0) -> None:
        self.name = name
        self.profile = profile  # what the policies plan with: the configured chip
        self.mode = "numeric"
        self.acl = acl = importlib.import_module(module)
        ret = acl.init()
        if ret not in (0, AclError.REPEAT_INITIALIZE):
            raise VendorError(f"vendor pyACL init failed with {ret}", ret)
        checked("rt.set_device", acl.rt.set_device(device))
        self.memory = VendorMemory(acl)
        self.t = 0.0
        self.out: list[_Out] = []
        self.done: list[Job] = []
        self.streams: list[int] = []  # idle vendor streams

    # -- Executor ------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.out or self.done)

    def start(self, job: Job, t: float) -> None:
        job.started_at = self.t
        if isinstance(job.task, HostToDevice | DeviceToHost):  # through VendorMemory: blocking vendor copies
            self._run_now(job)
            return
        stream = self.streams.pop() if self.streams else checked("rt.create_stream", self.acl.rt.create_stream())
        keep: list = []
        try:
            self._limit(stream, job)
            self._forward(job, stream, keep)
            event = checked("rt.create_event", self.acl.rt.create_event())
            checked("rt.record_event", self.acl.rt.record_event(event, stream))
        except FlexNPUError as exc:
            self._release(keep)
            self.streams.append(stream)
            self._finish(job, exc)
            return
        self.out.append(_Out(job, stream, event, keep))

    def _run_now(self, job: Job) -> None:
        try:
            job.task.run()
        except FlexNPUError as exc:
            self._finish(job, exc)
            return
        self._finish(job)

    def _finish(self, job: Job, failure: FlexNPUError | None = None) -> None:
        job.failure = failure
        job.finished_at = self.t
        if not isinstance(job.task, HostToDevice | DeviceToHost):
            # The vendor runtime does not say which cores a kernel's blocks held: its core limit is the bound.
            job.core_s = job.cube_limit * (job.finished_at - job.started_at)
        self.done.append(job)

    def next_event(self) -> float | None:
        if self.done:
            return self.t
        return self.t + POLL_S if self.out else None

    def advance(self, t: float) -> list[Job]:
        self.t = max(self.t, t)
        still = []
        for out in self.out:
            status = checked("rt.query_event_status", self.acl.rt.query_event_status(out.event))
            if status == EVENT_COMPLETE:
                self.acl.rt.destroy_event(out.event)
                self._release(out.keep)
                self.streams.append(out.stream)
                self._finish(out.job)
            else:
                still.append(out)
        self.out = still
        done, self.done = self.done, []
        return done

    # -- forwarding ----------------------------------------------------------------------------------------

    def _limit(self, stream: int, job: Job) -> None:
        """The policy's limits on the vendor stream (_launch makes them apply)."""
        rt = self.acl.rt
        checked("rt.set_stream_res_limit", rt.set_stream_res_limit(stream, CUBE_CORE, job.cube_limit))
        checked("rt.set_stream_res_limit", rt.set_stream_res_limit(stream, VECTOR_CORE, job.vector_limit))

    def _forward(self, job: Job, stream: int, keep: list) -> None:
        acl, task = self.acl, job.task
        if isinstance(task, KernelTask):
            self._launch(task, stream, keep)
        elif isinstance(task, DeviceToDevice):
            size = task.dst.size
            checked(
                "rt.memcpy_async",
                acl.rt.memcpy_async(task.dst.address, size, task.src.address, size, DEVICE_TO_DEVICE, stream),
            )
        elif isinstance(task, Fill):
            size = task.dst.size
            checked("rt.memset_async", acl.rt.memset_async(task.dst.address, size, task.value, size, stream))
        else:
            raise NotSupported(f"the pyacl backend cannot forward a {task.name} task")

    def _launch(self, task: KernelTask, stream: int, keep: list) -> None:
        acl, kernel = self.acl, task.kernel

        def operands(specs, regions):
            descs = [acl.create_tensor_desc(dtypes.CODES[s.dtype], list(s.shape), ACL_FORMAT_ND) for s in specs]
            bufs = [acl.create_data_buffer(r.address, r.size) for r in regions]
            keep.extend(("desc", d) for d in descs)
            keep.extend(("buffer", b) for b in bufs)
            return descs, bufs

        in_descs, in_bufs = operands(kernel.ins, task.inputs)
        out_descs, out_bufs = operands(kernel.outs, task.outputs)
        attr = acl.op.create_attr()
        keep.append(("attr", attr))
        for name, value in kernel.attrs.items():
            checked(f"op.set_attr {name}", _setter(acl, value)(attr, name, value))
        # CANN applies a stream's limits to kernels launched from a thread that uses them (aclrtSetStreamResLimit's
        # notes): this thread does, for this launch only.
        checked("rt.use_stream_res_in_current_thread", acl.rt.use_stream_res_in_current_thread(stream))
        try:
            ret = acl.op.execute_v2(kernel.op_type, in_descs, in_bufs, out_descs, out_bufs, attr, stream)
        finally:
            acl.rt.unuse_stream_res_in_current_thread(stream)
        checked(f"op.execute_v2 {kernel.op_type}", ret)

    def _release(self, keep: list) -> None:
        acl = self.acl
        destroy = {"desc": acl.destroy_tensor_desc, "buffer": acl.destroy_data_buffer, "attr": acl.op.destroy_attr}
        for kind, handle in keep:
            destroy[kind](handle)
        keep.clear()


def _setter(acl, value):
    """The acl.op.set_attr_* call for a Python attribute value."""
    op = acl.op
    if isinstance(value, bool):
        return op.set_attr_bool
    if isinstance(value, int):
        return op.set_attr_int
    if isinstance(value, float):
        return op.set_attr_float
    if isinstance(value, str):
        return op.set_attr_string
    first = value[0] if value else 0
    if isinstance(first, bool):
        return op.set_attr_list_bool
    return op.set_attr_list_float if isinstance(first, float) else op.set_attr_list_int
