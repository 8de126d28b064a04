"""AscendCL runtime semantics on top of Clients: set/reset reference counts, the current device and context
per thread, which session each handle belongs to, host memory, copy directions.

The shim (`acl`) only maps pyACL spellings and return conventions onto this. Every method raises AclCallError
on failure; the shim turns that into the return code. Which devices a process sees: devices.py;
FLEXNPU_DIRECT=1 runs the topology of FLEXNPU_CONFIG (default: built in) in this process (direct.py).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from dataclasses import dataclass

from . import codec
from .client import Client, FileTransport
from .codec import COMMANDS, Op, Reply, is_device_address
from .devices import discover
from .errors import AclCallError, AclError
from .reports import Reports

PHASES = {"unknown": 0, "prefill": 1, "decode": 2}
MEMCPY_CHUNK = 64 << 20  # largest copy carried by one record

HOST_TO_HOST, HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE = range(4)  # aclrtMemcpyKind, and the copy made
MEMCPY_KINDS = range(8)  # aclrtMemcpyKind, up to ACL_MEMCPY_INTER_DEVICE_TO_DEVICE
DIRECTIONS = {  # (src on device, dst on device) -> the copy that happens
    (False, False): HOST_TO_HOST,
    (False, True): HOST_TO_DEVICE,
    (True, False): DEVICE_TO_HOST,
    (True, True): DEVICE_TO_DEVICE,
}


def check(reply: Reply) -> memoryview:
    if reply.status != AclError.SUCCESS:
        raise AclCallError(bytes(reply.payload).decode(errors="replace"), reply.status)
    return reply.payload


@dataclass
class Opened:
    client: Client
    refs: int
    default_context: int


class Runtime:
    """Defaults come from the environment (see the module doc); benchmarks and tests pass them explicitly."""

    def __init__(self, direct: bool | None = None, devices: list[str] | None = None, config: str | None = None) -> None:
        self.initialized = False
        self.direct = bool(os.environ.get("FLEXNPU_DIRECT")) if direct is None else direct
        self.config = os.environ.get("FLEXNPU_CONFIG") if config is None else config
        self.phase = PHASES.get(os.environ.get("FLEXNPU_PHASE", "unknown"), 0)
        self._devices = devices
        self._topology = None
        self._opened: dict[int, Opened] = {}
        self._owner: dict[int, int] = {}  # context/stream/event handle -> device id
        self._host: dict[int, ctypes.Array] = {}
        self._local = threading.local()
        self._lock = threading.RLock()
        self.reports = Reports(self)
        self._constants: dict[tuple[int, bytes], int] = {}  # (device, constant operand) -> its device copy

    # -- devices ------------------------------------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        if self._devices is None:
            self._devices = discover(self._direct_topology().names if self.direct else None)
        return self._devices

    def _direct_topology(self):
        if self._topology is None:
            from .direct import DirectTopology  # direct mode only: loads the rest of FlexNPU

            self._topology = DirectTopology(self.config)
        return self._topology

    def _connect(self, device: int) -> Client:
        target = self.devices[device]
        if self.direct:
            return Client(self._direct_topology().transport(target), self.phase)
        return Client(FileTransport(target), self.phase)

    def _check_device(self, device: int) -> None:
        if not 0 <= device < len(self.devices):
            have = (
                f"0-{len(self.devices) - 1}"
                if self.devices
                else "none: is vdevfsd running (vdevctl ls)? in a container, is a FlexNPU file bound at /dev/davinciN?"
            )
            raise AclCallError(
                f"device {device} does not exist (this process sees {have})", AclError.RT_INVALID_DEVICEID
            )

    # -- init ---------------------------------------------------------------------------------------------

    def init(self) -> None:
        if self.initialized:
            raise AclCallError("acl.init called twice", AclError.REPEAT_INITIALIZE)
        self.initialized = True

    def finalize(self) -> None:
        if not self.initialized:
            raise AclCallError("acl.finalize without acl.init (or called twice)", AclError.REPEAT_FINALIZE)
        with self._lock:
            for device in list(self._opened):
                self._close(device)
        self.initialized = False

    # -- devices and contexts -----------------------------------------------------------------------------

    def set_device(self, device: int) -> None:
        with self._lock:
            self._check_device(device)
            opened = self._opened.get(device)
            if opened is None:
                client = self._connect(device)
                context = self._handle(client.call(Op.CONTEXT_CREATE), Op.CONTEXT_CREATE)
                opened = self._opened[device] = Opened(client, 0, context)
                self._owner[context] = device
            opened.refs += 1
            self._local.device, self._local.context = device, opened.default_context

    def reset_device(self, device: int, force: bool = False) -> None:
        with self._lock:
            self._check_device(device)
            opened = self._opened.get(device)
            if opened is None:
                raise AclCallError(f"reset_device({device}): the device was not set", AclError.INVALID_PARAM)
            opened.refs -= 1
            if force or opened.refs <= 0:
                self._close(device)

    def _close(self, device: int) -> None:
        opened = self._opened.pop(device)
        if self._owner.get(getattr(self._local, "limits", None)) == device:
            self._local.limits = None  # its streams are gone with the session
        try:
            check(opened.client.call(Op.DEVICE_SYNC))
        finally:
            opened.client.close()  # closing the session frees everything it held
            self._owner = {h: d for h, d in self._owner.items() if d != device}
            self._constants = {k: p for k, p in self._constants.items() if k[0] != device}
            if getattr(self._local, "device", None) == device:
                self._local.device = self._local.context = None

    def chip(self) -> str:
        """The chip behind the current device, else behind device 0 (asked over a session of its own)."""
        device = getattr(self._local, "device", None)
        if device is not None and device in self._opened:
            return self._opened[device].client.info.chip
        self._check_device(0)
        client = self._connect(0)
        try:
            return client.info.chip
        finally:
            client.close()

    def current_device(self) -> int:
        device = getattr(self._local, "device", None)
        if device is None:
            raise AclCallError("no current device: call acl.rt.set_device first", AclError.RT_CONTEXT_NULL)
        return device

    def client(self, handle: int = 0) -> Client:
        """The session a handle belongs to, or the current device's for 0 (the default stream)."""
        device = self._owner.get(handle) if handle else None
        device = self.current_device() if device is None else device
        opened = self._opened.get(device)
        if opened is None:
            raise AclCallError(
                f"device {device} is not set: call acl.rt.set_device({device})", AclError.RT_CONTEXT_NULL
            )
        return opened.client

    def create_context(self, device: int) -> int:
        self.set_device(device)  # as aclrtCreateContext, this opens the device if needed
        context = self.create(Op.CONTEXT_CREATE)
        self._local.context = context
        return context

    def set_context(self, context: int) -> None:
        if context not in self._owner:
            raise AclCallError(f"context 0x{context:x} does not exist", AclError.RT_INVALID_HANDLE)
        self._local.device, self._local.context = self._owner[context], context

    def current_context(self) -> int:
        context = getattr(self._local, "context", None)
        if context is None:
            raise AclCallError("no current context: call acl.rt.set_device or create_context", AclError.RT_CONTEXT_NULL)
        return context

    # -- generic calls ------------------------------------------------------------------------------------

    def create(self, op: Op, route: int = 0, **args) -> int:
        """Create a context, stream or event on the device of handle `route` (0: the current device)."""
        device = self._owner.get(route) if route else None
        device = self.current_device() if device is None else device
        handle = self._handle(self._opened[device].client.call(op, **args), op)
        self._owner[handle] = device
        return handle

    def adopt(self, handle: int, like: int) -> None:
        """Route a handle the daemon created (a captured graph) to the session of handle `like` (0: current)."""
        device = self._owner.get(like)
        self._owner[handle] = self.current_device() if device is None else device

    def destroy(self, op: Op, handle: int) -> None:
        check(self.client(handle).call(op, handle=handle))
        self._owner.pop(handle, None)
        if getattr(self._local, "context", None) == handle:
            self._local.context = None

    def call(self, op: Op, route: int = 0, **args) -> memoryview:
        """A synchronous call on the session that owns handle `route` (0: the current device's)."""
        return check(self.client(route).call(op, **args))

    def submit(self, op: Op, route: int = 0, data: bytes = b"", landing=None, **args) -> None:
        if "stream" in args:
            self.reports.hold(args["stream"])
        self.client(route).submit(op, data, landing, **args)

    def synchronize_stream(self, stream: int) -> None:
        """The stream's work, then the host callbacks queued on it, are done."""
        self.call(Op.STREAM_SYNC, stream, handle=stream)
        self.reports.hold(stream, blocking_only=False)

    def synchronize_device(self) -> None:
        """The current device's work, then the host callbacks queued on its streams, are done."""
        self.call(Op.DEVICE_SYNC)
        device = self.current_device()
        for stream in self.reports.streams():
            if self._owner.get(stream, device) == device:
                self.reports.hold(stream, blocking_only=False)

    @staticmethod
    def _handle(reply: Reply, op: Op) -> int:
        return COMMANDS[op].reply.parse(check(reply)).handle

    # -- memory -------------------------------------------------------------------------------------------

    def malloc(self, size: int, policy: int) -> int:
        return COMMANDS[Op.MALLOC].reply.parse(self.call(Op.MALLOC, size=size, policy=policy)).ptr

    def free(self, ptr: int) -> None:
        self.call(Op.FREE, ptr=ptr)

    def malloc_host(self, size: int) -> int:
        if size <= 0:
            raise AclCallError(f"malloc_host size must be > 0, got {size}")
        buffer = (ctypes.c_char * size)()
        address = ctypes.addressof(buffer)
        self._host[address] = buffer
        return address

    def free_host(self, ptr: int) -> None:
        if self._host.pop(ptr, None) is None:
            raise AclCallError(f"free_host(0x{ptr:x}): not a pointer malloc_host returned (or already freed)")

    def memcpy(self, dst: int, dst_max: int, src: int, count: int, kind: int, stream: int | None = None) -> None:
        """memcpy (stream None) or memcpy_async: host bytes travel in the record, device bytes in the reply.

        On current CANN `kind` is a reserved argument: the runtime takes the direction from the two addresses
        (aclpythondevg_01_0120, "memcpy"), so a kind that contradicts them copies as the addresses say.
        """
        if count > dst_max:
            raise AclCallError(f"memcpy count {count} exceeds dst_max {dst_max}")
        if count < 0:
            raise AclCallError(f"memcpy count must be >= 0, got {count}")
        if kind not in MEMCPY_KINDS:
            raise AclCallError(f"memcpy kind {kind} is not an aclrtMemcpyKind (0-{max(MEMCPY_KINDS)})")
        kind = DIRECTIONS[is_device_address(src), is_device_address(dst)]
        if kind == HOST_TO_HOST:
            self._host_in_order(stream)
            ctypes.memmove(dst, src, count)
            return
        for offset in range(0, count, MEMCPY_CHUNK) if count else [0]:
            n = min(MEMCPY_CHUNK, count - offset)
            self._copy_chunk(dst + offset, src + offset, n, kind, stream)

    def _host_in_order(self, stream: int | None) -> None:
        """Host-side work queued on a stream runs after everything before it: wait for the stream here."""
        if stream is not None:
            self.reports.hold(stream)
            self.call(Op.STREAM_SYNC, stream, handle=stream)

    def _copy_chunk(self, dst: int, src: int, n: int, kind: int, stream: int | None) -> None:
        if stream is None:
            # Blocking: the host bytes are read in place while the call runs, and land in place.
            data = memoryview((ctypes.c_char * n).from_address(src)).cast("B") if kind == HOST_TO_DEVICE else b""
            op = {HOST_TO_DEVICE: Op.MEMCPY_H2D, DEVICE_TO_HOST: Op.MEMCPY_D2H, DEVICE_TO_DEVICE: Op.MEMCPY_D2D}[kind]
            into = dst if kind == DEVICE_TO_HOST else None
            check(self.client().call(op, data, into=into, dst=dst, src=src, count=n))
            return
        # Asynchronous: the record waits in a batch, so it carries a snapshot of the host bytes.
        data = ctypes.string_at(src, n) if kind == HOST_TO_DEVICE else b""
        op = {
            HOST_TO_DEVICE: Op.MEMCPY_H2D_ASYNC,
            DEVICE_TO_HOST: Op.MEMCPY_D2H_ASYNC,
            DEVICE_TO_DEVICE: Op.MEMCPY_D2D_ASYNC,
        }[kind]
        landing = (dst, n) if kind == DEVICE_TO_HOST else None
        self.submit(op, stream, data, landing, stream=stream, dst=dst, src=src, count=n)

    def memset(self, ptr: int, max_size: int, value: int, count: int, stream: int | None = None) -> None:
        """Device memory is set by the daemon; host memory (malloc_host, or any host address: the pyACL docs
        accept both, aclpythondevg "memset") is set here, in stream order."""
        if count > max_size:
            raise AclCallError(f"memset count {count} exceeds max {max_size}")
        if not is_device_address(ptr):
            if not 0 <= value <= 0xFF:
                raise AclCallError(f"memset value {value} is not a byte (0-255)")
            self._host_in_order(stream)
            ctypes.memset(ptr, value, count)
        elif stream is None:
            self.call(Op.MEMSET, ptr=ptr, value=value, count=count)
        else:
            self.submit(Op.MEMSET_ASYNC, stream, stream=stream, ptr=ptr, value=value, count=count)

    # -- operators ----------------------------------------------------------------------------------------

    def constant(self, data: bytes) -> int:
        """The device address of a constant operand (set_tensor_const), uploaded once per device and session."""
        key = (self.current_device(), data)
        if key not in self._constants:
            ptr = self.malloc(len(data), 0)
            self.memcpy(
                ptr, len(data), ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value, len(data), HOST_TO_DEVICE
            )
            self._constants[key] = ptr
        return self._constants[key]

    def launch(self, op_type: str, ins: list, outs: list, attrs: dict, stream: int) -> None:
        """Launch an operator. ins/outs: (dtype, format, dims, device address) per operand; attrs: name ->
        (AttrKind, value). The description travels once per session; each launch is a template id plus
        addresses."""
        client = self.client(stream)
        key = (op_type, *((d, f, tuple(dims)) for d, f, dims, _ in (*ins, *outs)), "|", *_frozen(attrs))
        template = client.templates.get(key)
        if template is None:
            # Under the lock, and visible to other threads only once its description is queued: a thread that
            # found the id first could launch before the daemon had the description (found in review).
            description = codec.op_description(
                op_type, [(d, f, dims) for d, f, dims, _ in ins], [(d, f, dims) for d, f, dims, _ in outs], attrs
            )
            with self._lock:
                template = client.templates.get(key)
                if template is None:
                    template = len(client.templates) + 1
                    client.submit(Op.OP_TEMPLATE, description, template=template)
                    client.templates[key] = template
        self.reports.hold(stream)
        addresses = [ptr for *_, ptr in (*ins, *outs)]
        packed = struct.pack(f"<{len(addresses)}Q", *addresses)
        limits = getattr(self._local, "limits", None)
        client.submit(
            Op.OP_LAUNCH,
            packed,
            stream=stream,
            template=template,
            count=len(addresses),
            limits=codec.OWN_LIMITS if limits is None else limits,
        )

    # -- core limits --------------------------------------------------------------------------------------

    def use_stream_limits(self, stream: int | None) -> None:
        """aclrtUseStreamResInCurrentThread (None: aclrtUnuseStreamResInCurrentThread): operators launched
        from this thread take `stream`'s core limits, whatever stream they go on."""
        if stream is not None:
            self.client(stream)  # a stream of a device this process has set
        self._local.limits = stream

    # -- IPC memory -----------------------------------------------------------------------------------------

    def ipc_export(self, ptr: int, size: int, flags: int) -> str:
        reply = self.call(Op.IPC_EXPORT, ptr=ptr, size=size, flags=flags)
        return COMMANDS[Op.IPC_EXPORT].reply.parse(reply).key.decode("ascii")

    def ipc_allow(self, key: str, pids: list[int]) -> None:
        packed = struct.pack(f"<{len(pids)}i", *pids)
        check(self.client().call(Op.IPC_ALLOW, packed, key=_key(key)))

    def ipc_import(self, key: str, flags: int) -> int:
        return COMMANDS[Op.IPC_IMPORT].reply.parse(self.call(Op.IPC_IMPORT, key=_key(key), flags=flags)).ptr

    def ipc_close(self, key: str) -> None:
        self.call(Op.IPC_CLOSE, key=_key(key))

    def bare_tgid(self) -> int:
        """The pid the daemon knows this process by (across container pid namespaces): what allow-lists hold."""
        return COMMANDS[Op.BARE_TGID].reply.parse(self.call(Op.BARE_TGID)).pid

    def device_call(self, device: int, op: Op, **args) -> memoryview:
        """A call about a device as a whole (aclrtSetDeviceResLimit names one): it must be set."""
        self._check_device(device)
        opened = self._opened.get(device)
        if opened is None:
            raise AclCallError(
                f"device {device} is not set: call acl.rt.set_device({device})", AclError.RT_CONTEXT_NULL
            )
        return check(opened.client.call(op, **args))


def _key(key: str) -> bytes:
    raw = key.encode("ascii", errors="replace") if isinstance(key, str) else b""
    if len(raw) != 64:
        raise AclCallError(
            f"IPC memory key {key!r:.20}: a key is the 64-character string ipc_mem_get_export_key returned",
            AclError.INVALID_PARAM,
        )
    return raw


def _frozen(attrs: dict) -> list:
    return [(n, k, tuple(v) if isinstance(v, list) else v) for n, (k, v) in sorted(attrs.items())]


RUNTIME = Runtime()
