"""acl.rt: devices, contexts, streams, events and memory, with pyACL's names and return conventions."""

from __future__ import annotations

from acl._ret import code, value
from flexnpu_client.codec import COMMANDS, Op
from flexnpu_client.runtime import RUNTIME

ACL_DEVICE, ACL_HOST = 0, 1
# aclrtEventStatus, what the older query_event answers
ACL_EVENT_STATUS_COMPLETE, ACL_EVENT_STATUS_NOT_READY = 0, 1
# aclrtEventRecordedStatus, what query_event_status answers (aclpythondevg "query_event_status")
ACL_EVENT_RECORDED_STATUS_NOT_READY, ACL_EVENT_RECORDED_STATUS_COMPLETE = 0, 1
# aclrtEventWaitStatus, what query_event_wait_status answers
ACL_EVENT_WAIT_STATUS_COMPLETE, ACL_EVENT_WAIT_STATUS_NOT_READY = 0, 1
# event flags (create_event_with_flag); every event here can be timed and waited on, whatever its flags
ACL_EVENT_SYNC, ACL_EVENT_CAPTURE_STREAM_PROGRESS, ACL_EVENT_TIME_LINE = 0x1, 0x2, 0x8
ACL_CALLBACK_NO_BLOCK, ACL_CALLBACK_BLOCK = 0, 1


# -- devices -----------------------------------------------------------------------------------------------


@code
def set_device(device_id: int) -> None:
    RUNTIME.set_device(device_id)


@code
def reset_device(device_id: int) -> None:
    RUNTIME.reset_device(device_id)


@code
def reset_device_force(device_id: int) -> None:
    RUNTIME.reset_device(device_id, force=True)


@value(0)
def get_device_count() -> int:
    return len(RUNTIME.devices)


@value(-1)
def get_device() -> int:
    return RUNTIME.current_device()


@value(ACL_HOST)
def get_run_mode() -> int:
    return ACL_HOST  # the application runs on the host, the NPU is a device behind it


@code
def synchronize_device() -> None:
    RUNTIME.synchronize_device()


# -- contexts ----------------------------------------------------------------------------------------------


@value(0)
def create_context(device_id: int) -> int:
    return RUNTIME.create_context(device_id)


@code
def destroy_context(context: int) -> None:
    RUNTIME.destroy(Op.CONTEXT_DESTROY, context)


@code
def set_context(context: int) -> None:
    RUNTIME.set_context(context)


@value(0)
def get_context() -> int:
    return RUNTIME.current_context()


# -- streams -----------------------------------------------------------------------------------------------


@value(0)
def create_stream() -> int:
    return RUNTIME.create(Op.STREAM_CREATE, priority=0, flag=0)


@value(0)
def create_stream_with_config(priority: int, flag: int) -> int:
    return RUNTIME.create(Op.STREAM_CREATE, priority=priority, flag=flag)


@code
def destroy_stream(stream: int) -> None:
    RUNTIME.destroy(Op.STREAM_DESTROY, stream)


@code
def synchronize_stream(stream: int) -> None:
    RUNTIME.synchronize_stream(stream)


# -- events ------------------------------------------------------------------------------------------------

_recorded: set[int] = set()  # events with a record_event not undone by reset_event


@value(0)
def create_event() -> int:
    return RUNTIME.create(Op.EVENT_CREATE)


@value(0)
def create_event_with_flag(flag: int) -> int:
    """Every event here can be waited on, timed and queried, so the flags change nothing."""
    return RUNTIME.create(Op.EVENT_CREATE)


create_event_ex_with_flag = create_event_with_flag  # aclrtCreateEventExWithFlag: the same, without a count limit


@code
def destroy_event(event: int) -> None:
    RUNTIME.destroy(Op.EVENT_DESTROY, event)
    _recorded.discard(event)


@code
def record_event(event: int, stream: int) -> None:
    RUNTIME.submit(Op.EVENT_RECORD, event, event=event, stream=stream)
    _recorded.add(event)


@code
def reset_event(event: int, stream: int) -> None:
    RUNTIME.submit(Op.EVENT_RESET, event, event=event, stream=stream)
    _recorded.discard(event)


@code
def stream_wait_event(stream: int, event: int) -> None:
    RUNTIME.submit(Op.EVENT_WAIT, event, event=event, stream=stream)


@code
def synchronize_event(event: int) -> None:
    RUNTIME.call(Op.EVENT_SYNC, event, handle=event)


def _completed(event: int) -> bool:
    return bool(COMMANDS[Op.EVENT_QUERY].reply.parse(RUNTIME.call(Op.EVENT_QUERY, event, handle=event)).completed)


@value(ACL_EVENT_RECORDED_STATUS_NOT_READY)
def query_event_status(event: int) -> int:
    """aclrtQueryEventStatus: has the work before the event's record completed? An event never recorded is
    NOT_READY (aclrtEventRecordedStatus)."""
    done = _completed(event) and event in _recorded
    return ACL_EVENT_RECORDED_STATUS_COMPLETE if done else ACL_EVENT_RECORDED_STATUS_NOT_READY


@value(ACL_EVENT_STATUS_NOT_READY)
def query_event(event: int) -> int:
    """aclrtQueryEvent, the older call, with the older aclrtEventStatus values."""
    return ACL_EVENT_STATUS_COMPLETE if _completed(event) else ACL_EVENT_STATUS_NOT_READY


@value(ACL_EVENT_WAIT_STATUS_NOT_READY)
def query_event_wait_status(event: int) -> int:
    """aclrtQueryEventWaitStatus: would a stream waiting on the event go on now?"""
    return ACL_EVENT_WAIT_STATUS_COMPLETE if _completed(event) else ACL_EVENT_WAIT_STATUS_NOT_READY


@value(0.0)
def event_elapsed_time(start: int, end: int) -> float:
    reply = COMMANDS[Op.EVENT_ELAPSED].reply.parse(RUNTIME.call(Op.EVENT_ELAPSED, start, start=start, end=end))
    return reply.ns / 1e6


# -- memory ------------------------------------------------------------------------------------------------


@value(0)
def malloc(size: int, policy: int) -> int:
    return RUNTIME.malloc(size, policy)


@code
def free(ptr: int) -> None:
    RUNTIME.free(ptr)


@value(0)
def malloc_host(size: int) -> int:
    return RUNTIME.malloc_host(size)


@code
def free_host(ptr: int) -> None:
    RUNTIME.free_host(ptr)


@code
def memcpy(dst: int, dst_max: int, src: int, count: int, kind: int) -> None:
    RUNTIME.memcpy(dst, dst_max, src, count, kind)


@code
def memcpy_async(dst: int, dst_max: int, src: int, count: int, kind: int, stream: int) -> None:
    RUNTIME.memcpy(dst, dst_max, src, count, kind, stream)


@code
def memset(ptr: int, max_size: int, value: int, count: int) -> None:
    RUNTIME.memset(ptr, max_size, value, count)


@code
def memset_async(ptr: int, max_size: int, value: int, count: int, stream: int) -> None:
    RUNTIME.memset(ptr, max_size, value, count, stream)


@value(0, 0)
def get_mem_info(attr: int) -> tuple[int, int]:
    reply = COMMANDS[Op.MEM_INFO].reply.parse(RUNTIME.call(Op.MEM_INFO, attr=attr))
    return reply.free, reply.total


# -- core limits: how many cube / vector cores a stream's kernels may use (Ascend's lever for sharing a chip) --

ACL_RT_DEV_RES_CUBE_CORE, ACL_RT_DEV_RES_VECTOR_CORE = 0, 1  # aclrtDevResLimitType


@code
def set_stream_res_limit(stream: int, type: int, value: int) -> None:  # noqa: A002  (pyACL's parameter name)
    RUNTIME.call(Op.STREAM_LIMIT_SET, stream, stream=stream, kind=type, value=value)


@value(0)
def get_stream_res_limit(stream: int, type: int) -> int:  # noqa: A002
    reply = RUNTIME.call(Op.STREAM_LIMIT_GET, stream, stream=stream, kind=type)
    return COMMANDS[Op.STREAM_LIMIT_GET].reply.parse(reply).value


@code
def use_stream_res_in_current_thread(stream: int) -> None:
    RUNTIME.use_stream_limits(stream)


@code
def unuse_stream_res_in_current_thread(stream: int) -> None:
    RUNTIME.use_stream_limits(None)


@code
def set_device_res_limit(device_id: int, type: int, value: int) -> None:  # noqa: A002
    RUNTIME.device_call(device_id, Op.DEVICE_LIMIT_SET, kind=type, value=value)


@value(0)
def get_device_res_limit(device_id: int, type: int) -> int:  # noqa: A002
    reply = RUNTIME.device_call(device_id, Op.DEVICE_LIMIT_GET, kind=type)
    return COMMANDS[Op.DEVICE_LIMIT_GET].reply.parse(reply).value


# -- IPC memory: device memory one process shares with others on the same NPU, no copy -----------------------

ACL_RT_IPC_MEM_EXPORT_FLAG_DEFAULT, ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION = 0, 1
ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS = 1


@value("")
def ipc_mem_get_export_key(dev_ptr: int, size: int, flags: int) -> str:
    return RUNTIME.ipc_export(dev_ptr, size, flags)


@code
def ipc_mem_set_import_pid(key: str, pid: list) -> None:
    RUNTIME.ipc_allow(key, [int(p) for p in pid])


@value(0)
def ipc_mem_import_by_key(key: str, flags: int) -> int:
    return RUNTIME.ipc_import(key, flags)


@code
def ipc_mem_close(key: str) -> None:
    RUNTIME.ipc_close(key)


@value(0)
def device_get_bare_tgid() -> int:
    return RUNTIME.bare_tgid()


# -- host callbacks (flexnpu_client/reports.py) ------------------------------------------------------------


@code
def subscribe_report(thread_id: int, stream: int) -> None:
    RUNTIME.reports.subscribe(thread_id, stream)


@code
def unsubscribe_report(thread_id: int, stream: int) -> None:
    RUNTIME.reports.unsubscribe(thread_id, stream)


@code
def launch_callback(fn, user_data, block_flag: int, stream: int) -> None:
    RUNTIME.reports.launch(fn, user_data, block_flag == ACL_CALLBACK_BLOCK, stream)


@code
def process_report(timeout: int) -> None:
    RUNTIME.reports.process(timeout)
