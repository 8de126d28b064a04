"""AscendCL runtime semantics on top of Clients: device discovery and numbering, set/reset reference counts,
the current device and context per thread, which session each handle belongs to, host memory.

The shim (`interposer/shim/acl`) only maps pyACL spellings and return conventions onto this. Every method
raises FlexNPUError on failure; the shim turns that into the return code.

Devices a process sees, numbered from 0 as ASCEND_RT_VISIBLE_DEVICES renumbers them on a real host:
  FLEXNPU_DEVICES   comma-separated device files (set by `vdevctl run --devices`), or virtual NPU names
                    in direct mode;
  otherwise         /dev/davinci<N> files that are FlexNPU nodes (a container with bound nodes), else the
                    davinci<N> files under FLEXNPU_MOUNT (default /dev/flexnpu);
  FLEXNPU_DIRECT=1  no daemon: the topology of FLEXNPU_CONFIG (default: built in) runs in this process.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass

from interposer import wire
from interposer.client import Client, DirectTransport, FileTransport
from interposer.handles import is_device_address
from interposer.translate import Translator
from interposer.wire import COMMANDS, Op, Reply
from npu.errors import AclError, FlexNPUError, InvalidParam

DEFAULT_MOUNT = "/dev/flexnpu"
PHASES = {"unknown": 0, "prefill": 1, "decode": 2}
MEMCPY_CHUNK = 64 << 20  # largest copy carried by one record

HOST_TO_HOST, HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE, DEFAULT = range(5)


def _numbered(paths: list[str]) -> list[str]:
    def key(path: str) -> int:
        return int(re.search(r"([0-9]+)$", path).group(1))

    return sorted((p for p in paths if re.search(r"/davinci[0-9]+$", p)), key=key)


def visible(devices: list[str], spec: str | None) -> list[str]:
    """Apply ASCEND_RT_VISIBLE_DEVICES: logical ids, parsing stops at the first invalid entry."""
    if spec is None:
        return devices
    chosen = []
    for item in spec.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) >= len(devices) or devices[int(item)] in chosen:
            break
        chosen.append(devices[int(item)])
    return chosen


def discover(direct_names: list[str] | None = None) -> list[str]:
    """Device files (or, in direct mode, virtual NPU names) this process sees, in logical order."""
    explicit = os.environ.get("FLEXNPU_DEVICES")
    if explicit:
        devices = [d.strip() for d in explicit.split(",") if d.strip()]
    elif direct_names is not None:
        devices = direct_names
    else:
        # Bound FlexNPU nodes are regular files; real driver nodes are character devices and are not ours.
        bound = [p for p in _numbered(glob.glob("/dev/davinci*")) if stat.S_ISREG(os.stat(p).st_mode)]
        mount = os.environ.get("FLEXNPU_MOUNT", DEFAULT_MOUNT)
        devices = bound or _numbered(glob.glob(os.path.join(mount, "davinci*")))
    return visible(devices, os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))


def check(reply: Reply) -> memoryview:
    if reply.status != AclError.SUCCESS:
        raise FlexNPUError(bytes(reply.payload).decode(errors="replace"), AclError(reply.status))
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

    # -- devices ------------------------------------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        if self._devices is None:
            names = [v.name for v in self._direct_topology().virtual] if self.direct else None
            self._devices = discover(names)
        return self._devices

    def _direct_topology(self):
        if self._topology is None:
            from vdevfs import config  # direct mode only: builds the daemon's topology in this process

            self._topology = config.build(config.load(self.config), driver="sync")
        return self._topology

    def _connect(self, device: int) -> Client:
        target = self.devices[device]
        if self.direct:
            vdevs = {v.name: v for v in self._direct_topology().virtual}
            if target not in vdevs:
                raise FlexNPUError(f"{target}: no such virtual NPU (have {', '.join(vdevs)})", AclError.RT_NO_DEVICE)
            return Client(DirectTransport(Translator(vdevs[target], os.getpid())), self.phase)
        return Client(FileTransport(target), self.phase)

    def _check_device(self, device: int) -> None:
        if not 0 <= device < len(self.devices):
            have = f"0-{len(self.devices) - 1}" if self.devices else "none: is vdevfsd running? see `vdevctl ls`"
            raise FlexNPUError(
                f"device {device} does not exist (this process sees {have})", AclError.RT_INVALID_DEVICEID
            )

    # -- init ---------------------------------------------------------------------------------------------

    def init(self) -> None:
        if self.initialized:
            raise FlexNPUError("acl.init called twice", AclError.REPEAT_INITIALIZE)
        self.initialized = True

    def finalize(self) -> None:
        if not self.initialized:
            raise FlexNPUError("acl.finalize without acl.init (or called twice)", AclError.REPEAT_FINALIZE)
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
                raise FlexNPUError(f"reset_device({device}): the device was not set", AclError.INVALID_PARAM)
            opened.refs -= 1
            if force or opened.refs <= 0:
                self._close(device)

    def _close(self, device: int) -> None:
        opened = self._opened.pop(device)
        try:
            check(opened.client.call(Op.DEVICE_SYNC))
        finally:
            opened.client.close()  # closing the session frees everything it held
            self._owner = {h: d for h, d in self._owner.items() if d != device}
            if getattr(self._local, "device", None) == device:
                self._local.device = self._local.context = None

    def current_device(self) -> int:
        device = getattr(self._local, "device", None)
        if device is None:
            raise FlexNPUError("no current device: call acl.rt.set_device first", AclError.RT_CONTEXT_NULL)
        return device

    def client(self, handle: int = 0) -> Client:
        """The session a handle belongs to, or the current device's for 0 (the default stream)."""
        device = self._owner.get(handle) if handle else None
        device = self.current_device() if device is None else device
        opened = self._opened.get(device)
        if opened is None:
            raise FlexNPUError(
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
            raise FlexNPUError(f"context 0x{context:x} does not exist", AclError.RT_INVALID_HANDLE)
        self._local.device, self._local.context = self._owner[context], context

    def current_context(self) -> int:
        context = getattr(self._local, "context", None)
        if context is None:
            raise FlexNPUError("no current context: call acl.rt.set_device or create_context", AclError.RT_CONTEXT_NULL)
        return context

    # -- generic calls ------------------------------------------------------------------------------------

    def create(self, op: Op, **args) -> int:
        """Create a context, stream or event on the current device."""
        device = self.current_device()
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
        self.client(route).submit(op, data, landing, **args)

    @staticmethod
    def _handle(reply: Reply, op: Op) -> int:
        return COMMANDS[op].reply.parse(check(reply)).handle

    # -- memory -------------------------------------------------------------------------------------------

    def malloc(self, size: int, policy: int) -> int:
        return COMMANDS[Op.MALLOC].reply.parse(self.call(Op.MALLOC, size=size, policy=policy)).ptr

    def malloc_host(self, size: int) -> int:
        if size <= 0:
            raise InvalidParam(f"malloc_host size must be > 0, got {size}")
        buffer = (ctypes.c_char * size)()
        address = ctypes.addressof(buffer)
        self._host[address] = buffer
        return address

    def free_host(self, ptr: int) -> None:
        if self._host.pop(ptr, None) is None:
            raise InvalidParam(f"free_host(0x{ptr:x}): not a pointer malloc_host returned (or already freed)")

    def memcpy(self, dst: int, dst_max: int, src: int, count: int, kind: int, stream: int | None = None) -> None:
        """memcpy (stream None) or memcpy_async: host bytes travel in the record, device bytes in the reply."""
        if count > dst_max:
            raise InvalidParam(f"memcpy count {count} exceeds dst_max {dst_max}")
        if count < 0:
            raise InvalidParam(f"memcpy count must be >= 0, got {count}")
        if kind == DEFAULT:
            kind = {
                (False, False): HOST_TO_HOST,
                (False, True): HOST_TO_DEVICE,
                (True, False): DEVICE_TO_HOST,
                (True, True): DEVICE_TO_DEVICE,
            }[is_device_address(src), is_device_address(dst)]
        if kind not in (HOST_TO_HOST, HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE):
            raise InvalidParam(f"memcpy kind {kind} is not an aclrtMemcpyKind (0-4)")
        if kind == HOST_TO_HOST:
            ctypes.memmove(dst, src, count)
            return
        for offset in range(0, count, MEMCPY_CHUNK) if count else [0]:
            n = min(MEMCPY_CHUNK, count - offset)
            self._copy_chunk(dst + offset, src + offset, n, kind, stream)

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
        if count > max_size:
            raise InvalidParam(f"memset count {count} exceeds max {max_size}")
        if stream is None:
            self.call(Op.MEMSET, ptr=ptr, value=value, count=count)
        else:
            self.submit(Op.MEMSET_ASYNC, stream, stream=stream, ptr=ptr, value=value, count=count)

    # -- operators ----------------------------------------------------------------------------------------

    def launch(self, op_type: str, ins: list, outs: list, attrs: dict, stream: int) -> None:
        """Launch an operator. ins/outs: (dtype, format, dims, device address) per operand; attrs: name ->
        (AttrKind, value). The description travels once per session; each launch is a template id plus
        addresses."""
        client = self.client(stream)
        key = (op_type, *((d, f, tuple(dims)) for d, f, dims, _ in (*ins, *outs)), "|", *_frozen(attrs))
        template = client.templates.get(key)
        if template is None:
            template = client.templates[key] = len(client.templates) + 1
            description = wire.OpDescription.build(
                {
                    "op_type": op_type,
                    "inputs": [{"dtype": d, "format": f, "dims": list(dims)} for d, f, dims, _ in ins],
                    "outputs": [{"dtype": d, "format": f, "dims": list(dims)} for d, f, dims, _ in outs],
                    "attrs": [{"name": n, "kind": k, "value": v} for n, (k, v) in attrs.items()],
                }
            )
            client.submit(Op.OP_TEMPLATE, description, template=template)
        addresses = [ptr for *_, ptr in (*ins, *outs)]
        packed = struct.pack(f"<{len(addresses)}Q", *addresses)
        client.submit(Op.OP_LAUNCH, packed, stream=stream, template=template, count=len(addresses))


def _frozen(attrs: dict) -> list:
    return [(n, k, tuple(v) if isinstance(v, list) else v) for n, (k, v) in sorted(attrs.items())]


RUNTIME = Runtime()
