"""pyACL semantics of the shim, each test written from the pyACL API reference page it cites (hiascend.com,
CANN "aclpythondevg" pages). The shim runs in this process in direct mode: the emulated NPUs with no daemon."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest

ACL_SUCCESS = 0
ACL_ERROR_INVALID_FILE = 100003
ACL_ERROR_FEATURE_UNSUPPORTED = 200006
H2H, H2D, D2H, D2D = 0, 1, 2, 3
ACL_FLOAT, ACL_FLOAT16, ACL_INT32, ACL_FORMAT_ND = 0, 1, 3, 2


@pytest.fixture(scope="module")
def acl(direct_acl):
    """`import acl` as an interposed program gets it, in direct mode, with device 0 set."""
    assert direct_acl.init() == ACL_SUCCESS
    assert direct_acl.rt.set_device(0) == ACL_SUCCESS
    yield direct_acl
    assert direct_acl.rt.reset_device(0) == ACL_SUCCESS
    assert direct_acl.finalize() == ACL_SUCCESS


@pytest.fixture
def stream(acl):
    stream, ret = acl.rt.create_stream()
    assert ret == ACL_SUCCESS
    yield stream
    assert acl.rt.destroy_stream(stream) == ACL_SUCCESS


def ok(result):
    """The values of a pyACL call that returns (..., ret), checking ret."""
    *values, ret = result
    assert ret == ACL_SUCCESS
    return values[0] if len(values) == 1 else values


def read(acl, dev: int, n: int) -> bytes:
    back = bytearray(n)
    assert acl.rt.memcpy(acl.util.bytes_to_ptr(back), n, dev, n, D2H) == ACL_SUCCESS
    return bytes(back)


def device_bytes(acl, data: bytes) -> int:
    ptr = ok(acl.rt.malloc(len(data), 0))
    assert acl.rt.memcpy(ptr, len(data), acl.util.bytes_to_ptr(data), len(data), H2D) == ACL_SUCCESS
    return ptr


# -- semantics that differ from older FlexNPU ------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True])
def test_memset_sets_host_memory_from_malloc_host(acl, stream, asynchronous):
    # aclpythondevg_01_0118 "memset": the memory may be on the host or the device; the system tells which from
    # the address. memset_async (aclpythondevg "memset_async") takes the same memory, in stream order.
    host = ok(acl.rt.malloc_host(64))
    ctypes.memset(host, 0xAB, 64)
    if asynchronous:
        assert acl.rt.memset_async(host, 64, 7, 48, stream) == ACL_SUCCESS
        assert acl.rt.synchronize_stream(stream) == ACL_SUCCESS
    else:
        assert acl.rt.memset(host, 64, 7, 48) == ACL_SUCCESS
    assert acl.util.ptr_to_bytes(host, 64) == b"\x07" * 48 + b"\xab" * 16
    assert acl.rt.free_host(host) == ACL_SUCCESS


def test_host_memset_async_runs_after_the_copies_queued_before_it(acl, stream):
    # aclpythondevg "memset_async": asynchronous, in the stream's order: a device-to-host copy queued before
    # the memset lands first, and the memset overwrites it.
    dev = device_bytes(acl, b"\x05" * 32)
    host = ok(acl.rt.malloc_host(32))
    assert acl.rt.memcpy_async(host, 32, dev, 32, D2H, stream) == ACL_SUCCESS
    assert acl.rt.memset_async(host, 32, 9, 16, stream) == ACL_SUCCESS
    assert acl.rt.synchronize_stream(stream) == ACL_SUCCESS
    assert acl.util.ptr_to_bytes(host, 32) == b"\x09" * 16 + b"\x05" * 16
    acl.rt.free(dev)
    acl.rt.free_host(host)


@pytest.mark.parametrize("wrong_kind", [H2H, H2D, D2D])
def test_memcpy_direction_follows_the_addresses_not_the_kind(acl, wrong_kind):
    # aclpythondevg_01_0120 "memcpy": kind is a reserved argument whose value has no effect; the runtime judges
    # from the source and destination addresses whether and how to copy. A device-to-host copy labelled with
    # another kind still lands its bytes (it must never silently copy nothing).
    dev = device_bytes(acl, bytes(range(64)))
    back = bytearray(64)
    assert acl.rt.memcpy(acl.util.bytes_to_ptr(back), 64, dev, 64, wrong_kind) == ACL_SUCCESS
    assert bytes(back) == bytes(range(64))
    other = ok(acl.rt.malloc(64, 0))
    assert acl.rt.memcpy(other, 64, dev, 64, H2D) == ACL_SUCCESS  # device to device, whatever the kind says
    assert acl.rt.memcpy(acl.util.bytes_to_ptr(back), 64, other, 64, H2H) == ACL_SUCCESS
    assert bytes(back) == bytes(range(64))
    acl.rt.free(dev)
    acl.rt.free(other)


def test_query_event_status_answers_recorded_status_values(acl, stream):
    # aclpythondevg_01_0091 "query_event_status" and aclpythondevg_01_0943 (aclrtEventRecordedStatus):
    # ACL_EVENT_RECORDED_STATUS_NOT_READY = 0 (not recorded, or not executed yet), COMPLETE = 1.
    event = ok(acl.rt.create_event())
    assert ok(acl.rt.query_event_status(event)) == acl.rt.ACL_EVENT_RECORDED_STATUS_NOT_READY == 0
    assert acl.rt.record_event(event, stream) == ACL_SUCCESS
    assert acl.rt.synchronize_event(event) == ACL_SUCCESS
    assert ok(acl.rt.query_event_status(event)) == acl.rt.ACL_EVENT_RECORDED_STATUS_COMPLETE == 1
    # The older query_event keeps the older aclrtEventStatus values (COMPLETE = 0).
    assert ok(acl.rt.query_event(event)) == acl.rt.ACL_EVENT_STATUS_COMPLETE == 0
    # aclrtQueryEventWaitStatus: ACL_EVENT_WAIT_STATUS_COMPLETE = 0 once the event has happened.
    assert ok(acl.rt.query_event_wait_status(event)) == acl.rt.ACL_EVENT_WAIT_STATUS_COMPLETE == 0
    assert acl.rt.destroy_event(event) == ACL_SUCCESS


@pytest.mark.parametrize("create", ["create_event_with_flag", "create_event_ex_with_flag"])
def test_events_created_with_flags_record_and_time(acl, stream, create):
    # aclpythondevg "create_event_with_flag" / "create_event_ex_with_flag": event, ret = ...(flag).
    start = ok(getattr(acl.rt, create)(acl.rt.ACL_EVENT_TIME_LINE))
    end = ok(getattr(acl.rt, create)(acl.rt.ACL_EVENT_SYNC | acl.rt.ACL_EVENT_TIME_LINE))
    assert acl.rt.record_event(start, stream) == acl.rt.record_event(end, stream) == ACL_SUCCESS
    assert acl.rt.synchronize_event(end) == ACL_SUCCESS
    assert ok(acl.rt.event_elapsed_time(start, end)) >= 0.0
    acl.rt.destroy_event(start)
    acl.rt.destroy_event(end)


def test_set_model_dir_refuses_a_directory_that_does_not_exist(acl, tmp_path):
    # aclpythondevg_01_0757 "set_model_dir": the directory the single-operator *.om models are loaded from; a
    # path that is not there is an invalid file (aclError ACL_ERROR_INVALID_FILE: "check the file exists").
    assert acl.op.set_model_dir(str(tmp_path / "missing")) == ACL_ERROR_INVALID_FILE
    assert "missing" in acl.get_recent_err_msg()
    assert acl.op.set_model_dir(str(tmp_path)) == ACL_SUCCESS


# -- entry points ------------------------------------------------------------------------------------------


def test_soc_name_version_and_data_type_size(acl):
    # aclpythondevg "get_soc_name": the SoC's name; "data_type_size": bytes per element of an aclDataType.
    assert acl.get_soc_name() == "Ascend910B2"
    assert ok(acl.get_version()) == [1, 0, 0]
    assert [acl.data_type_size(t) for t in (ACL_FLOAT, ACL_FLOAT16, ACL_INT32, 9, 12)] == [4, 2, 4, 8, 1]
    assert acl.data_type_size(999) == 0


def test_numpy_contiguous_to_ptr_gives_contiguous_data(acl):
    # aclpythondevg "numpy_contiguous_to_ptr": the address of the array's data, contiguous in memory.
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert acl.util.numpy_contiguous_to_ptr(array) == array.ctypes.data
    strided = array.T
    ptr = acl.util.numpy_contiguous_to_ptr(strided)
    assert acl.util.ptr_to_bytes(ptr, strided.nbytes) == np.ascontiguousarray(strided).tobytes()


def test_host_callbacks_run_in_stream_order_in_the_subscribed_thread(acl, stream):
    # aclpythondevg "launch_callback" / "subscribe_report" / "process_report": a host callback is a task of
    # the stream, run after the work queued before it, in the thread subscribed to the stream.
    dev = device_bytes(acl, b"\x2a" * 16)
    host = ok(acl.rt.malloc_host(16))
    seen, returns = [], []
    context = ok(acl.rt.get_context())

    def reporter(args):
        acl.rt.set_context(args[0])
        returns.extend(acl.rt.process_report(-1) for _ in range(args[1]))

    thread_id = ok(acl.util.start_thread(reporter, [context, 2]))
    assert acl.rt.subscribe_report(thread_id, stream) == ACL_SUCCESS
    assert acl.rt.memcpy_async(host, 16, dev, 16, D2H, stream) == ACL_SUCCESS
    record = lambda tag: seen.append((tag, threading.get_ident(), acl.util.ptr_to_bytes(host, 16)))  # noqa: E731
    assert acl.rt.launch_callback(record, "first", acl.rt.ACL_CALLBACK_BLOCK, stream) == ACL_SUCCESS
    assert acl.rt.memset_async(host, 16, 1, 16, stream) == ACL_SUCCESS
    assert acl.rt.launch_callback(record, "second", acl.rt.ACL_CALLBACK_NO_BLOCK, stream) == ACL_SUCCESS
    assert acl.rt.synchronize_device() == ACL_SUCCESS  # the device's work and its callbacks
    assert len(seen) == 2
    assert acl.util.stop_thread(thread_id) == ACL_SUCCESS
    assert acl.rt.unsubscribe_report(thread_id, stream) == ACL_SUCCESS
    assert returns == [ACL_SUCCESS, ACL_SUCCESS]
    assert seen == [("first", thread_id, b"\x2a" * 16), ("second", thread_id, b"\x01" * 16)]
    assert acl.rt.launch_callback(record, "late", 0, stream) != ACL_SUCCESS  # no subscriber any more
    acl.rt.free(dev)
    acl.rt.free_host(host)


def _tensor(acl, dtype, values: np.ndarray):
    desc = acl.create_tensor_desc(dtype, list(values.shape), ACL_FORMAT_ND)
    ptr = device_bytes(acl, values.tobytes())
    return desc, acl.create_data_buffer(ptr, values.nbytes), ptr


def test_operator_handles_and_cast(acl, stream):
    # aclpythondevg_01_1014 "create_handle": handle, ret = create_handle(op_type, input_desc, output_desc,
    # op_attr); aclpythondevg_01_0648 "execute_with_handle": ret = execute_with_handle(handle, inputs, outputs,
    # stream); aclpythondevg "cast": ret = cast(src_desc, src_buffer, dst_desc, dst_buffer, truncate, stream).
    a, b = np.arange(6, dtype=np.float32), np.full(6, 0.5, dtype=np.float32)
    (da, ba, _), (db, bb, _) = _tensor(acl, ACL_FLOAT, a), _tensor(acl, ACL_FLOAT, b)
    dout, bout, pout = _tensor(acl, ACL_FLOAT, np.zeros(6, dtype=np.float32))
    handle = ok(acl.op.create_handle("Add", [da, db], [dout], 0))
    for _ in range(2):
        assert acl.op.execute_with_handle(handle, [ba, bb], [bout], stream) == ACL_SUCCESS
    assert acl.rt.synchronize_stream(stream) == ACL_SUCCESS
    assert np.frombuffer(read(acl, pout, 24), np.float32).tolist() == (a + b).tolist()
    acl.op.destroy_handle(handle)

    dhalf, bhalf, phalf = _tensor(acl, ACL_FLOAT16, np.zeros(6, dtype=np.float16))
    assert acl.op.cast(dout, bout, dhalf, bhalf, 0, stream) == ACL_SUCCESS
    assert acl.rt.synchronize_stream(stream) == ACL_SUCCESS
    assert np.frombuffer(read(acl, phalf, 12), np.float16).tolist() == (a + b).tolist()


def test_constant_operand(acl, stream):
    # aclpythondevg "set_tensor_const": the input's value is given on the host when the operator is built.
    x, const = np.arange(4, dtype=np.float32), np.full(4, 10, dtype=np.float32)
    (dx, bx, _), (dout, bout, pout) = _tensor(acl, ACL_FLOAT, x), _tensor(acl, ACL_FLOAT, np.zeros(4, np.float32))
    dc = acl.create_tensor_desc(ACL_FLOAT, [4], ACL_FORMAT_ND)
    assert acl.set_tensor_const(dc, acl.util.numpy_to_ptr(const), const.nbytes) == ACL_SUCCESS
    bc = acl.create_data_buffer(0, 0)
    assert acl.op.execute_v2("Add", [dx, dc], [bx, bc], [dout], [bout], 0, stream) == ACL_SUCCESS
    assert acl.rt.synchronize_stream(stream) == ACL_SUCCESS
    assert np.frombuffer(read(acl, pout, 16), np.float32).tolist() == (x + const).tolist()


def test_a_bad_direct_mode_config_is_an_error_code(tmp_path):
    from interposer.shim.flexnpu_client.errors import AclCallError, AclError
    from interposer.shim.flexnpu_client.runtime import Runtime

    (tmp_path / "bad.toml").write_text("x = 1\n")
    runtime = Runtime(direct=True, config=str(tmp_path / "bad.toml"))
    with pytest.raises(AclCallError, match="unknown key") as info:
        runtime.set_device(0)
    assert info.value.code == AclError.RT_NO_DEVICE


def test_dvpp_memory_and_refused_media_calls(acl):
    # aclpythondevg "dvpp_malloc" / "dvpp_free": device memory DVPP can use; the processing calls are refused
    # with ACL_ERROR_FEATURE_UNSUPPORTED and a message until DVPP is emulated.
    ptr = ok(acl.media.dvpp_malloc(4096))
    assert acl.rt.memset(ptr, 4096, 0, 4096) == ACL_SUCCESS
    assert acl.media.dvpp_free(ptr) == ACL_SUCCESS
    assert acl.media.dvpp_vpc_resize_async(1, 2, 3, 4, 0) == ACL_ERROR_FEATURE_UNSUPPORTED
    assert "DVPP is not emulated" in acl.get_recent_err_msg()
    assert acl.media.dvpp_jpeg_get_image_info(0, 0)[-1] == ACL_ERROR_FEATURE_UNSUPPORTED


# -- logging as CANN does it ---------------------------------------------------------------------------------


def test_failed_calls_print_nothing_unless_the_cann_log_says_so(acl, capfd, monkeypatch):
    # pyACL prints nothing on a failed call (the message is in get_recent_err_msg); CANN's log goes to stdout
    # with ASCEND_SLOG_PRINT_TO_STDOUT=1, at ASCEND_GLOBAL_LOG_LEVEL and above. aclpythondevg_01_0050
    # "app_log": acl.app_log(log_level, message), levels 0 DEBUG … 3 ERROR, returns nothing.
    monkeypatch.delenv("ASCEND_SLOG_PRINT_TO_STDOUT", raising=False)
    assert acl.rt.free(0x1234) != ACL_SUCCESS
    acl.app_log(3, "app error")
    assert capfd.readouterr() == ("", "")
    assert acl.get_recent_err_msg()

    monkeypatch.setenv("ASCEND_SLOG_PRINT_TO_STDOUT", "1")
    assert acl.rt.free(0x1234) != ACL_SUCCESS
    acl.app_log(3, "app error")
    acl.app_log(1, "app info")  # below the default level, ERROR
    out = capfd.readouterr().out.splitlines()
    assert out[0].startswith("[ERROR] ACL(") and "[free]" in out[0]
    assert out[1].startswith("[ERROR] APP(") and out[1].endswith("app error")
    assert len(out) == 2

    monkeypatch.setenv("ASCEND_GLOBAL_LOG_LEVEL", "1")
    acl.app_log(1, "app info")
    assert capfd.readouterr().out.startswith("[INFO] APP(")


# -- core limits -----------------------------------------------------------------------------------------

CUBE_CORE, VECTOR_CORE = 0, 1  # aclrtDevResLimitType
ACL_ERROR_INVALID_PARAM = 100000


def test_a_streams_core_limit_is_its_own_else_the_processs_else_the_chips(acl, stream):
    # aclpythondevg_01_1135 "get_stream_res_limit": without set_stream_res_limit, the process's device limit
    # (set_device_res_limit) comes first, then the hardware default.
    assert ok(acl.rt.get_stream_res_limit(stream, CUBE_CORE)) == 24  # the default device is a 910B2
    assert ok(acl.rt.get_stream_res_limit(stream, VECTOR_CORE)) == 48
    assert acl.rt.set_device_res_limit(0, CUBE_CORE, 12) == ACL_SUCCESS
    try:
        assert ok(acl.rt.get_device_res_limit(0, CUBE_CORE)) == 12
        assert ok(acl.rt.get_stream_res_limit(stream, CUBE_CORE)) == 12
        # aclpythondevg "set_stream_res_limit": the last setting of a stream wins.
        assert acl.rt.set_stream_res_limit(stream, CUBE_CORE, 8) == ACL_SUCCESS
        assert acl.rt.set_stream_res_limit(stream, CUBE_CORE, 6) == ACL_SUCCESS
        assert ok(acl.rt.get_stream_res_limit(stream, CUBE_CORE)) == 6
        assert ok(acl.rt.get_stream_res_limit(0, CUBE_CORE)) == 12  # 0: the default stream
        assert acl.rt.use_stream_res_in_current_thread(stream) == ACL_SUCCESS
        assert acl.rt.unuse_stream_res_in_current_thread(stream) == ACL_SUCCESS
    finally:
        assert acl.rt.set_device_res_limit(0, CUBE_CORE, 24) == ACL_SUCCESS


@pytest.mark.parametrize(
    ("kind", "value", "named"), [(2, 4, "aclrtDevResLimitType"), (CUBE_CORE, 0, "1-24"), (VECTOR_CORE, 49, "1-48")]
)
def test_a_core_limit_out_of_range_is_refused_naming_the_range(acl, stream, kind, value, named):
    assert acl.rt.set_stream_res_limit(stream, kind, value) == ACL_ERROR_INVALID_PARAM
    assert named in acl.get_recent_err_msg()


# -- IPC memory ------------------------------------------------------------------------------------------


def test_ipc_memory_round_trip_through_the_shim(acl):
    # aclpythondevg "ipc_mem_get_export_key" / "ipc_mem_set_import_pid" / "ipc_mem_import_by_key" /
    # "ipc_mem_close": key, ret = ...(dev_ptr, size, flags); ret = ...(key, pids); dev_ptr, ret = ...(key, flags).
    # One process here, so it imports through a second device set on the same physical NPU (davinci1).
    ptr = device_bytes(acl, b"shared!!")
    key = ok(acl.rt.ipc_mem_get_export_key(ptr, 8, 0))
    assert isinstance(key, str) and len(key) == 64
    pid = ok(acl.rt.device_get_bare_tgid())
    assert pid == os.getpid()
    assert acl.rt.ipc_mem_set_import_pid(key, [pid]) == ACL_SUCCESS
    context = ok(acl.rt.get_context())
    assert acl.rt.set_device(1) == ACL_SUCCESS
    try:
        imported = ok(acl.rt.ipc_mem_import_by_key(key, 0))
        assert read(acl, imported, 8) == b"shared!!"
        assert acl.rt.ipc_mem_close(key) == ACL_SUCCESS
    finally:
        assert acl.rt.reset_device(1) == ACL_SUCCESS
        assert acl.rt.set_context(context) == ACL_SUCCESS
    assert acl.rt.ipc_mem_close(key) == ACL_SUCCESS
    assert acl.rt.free(ptr) == ACL_SUCCESS
    key, ret = acl.rt.ipc_mem_import_by_key("short", 0)
    assert (key, ret) == (0, ACL_ERROR_INVALID_PARAM) and "64-character" in acl.get_recent_err_msg()


# -- task groups of a captured graph ---------------------------------------------------------------------


def test_a_task_update_replaces_a_captured_group(acl, stream):
    # CANN aclmdlRICaptureTaskGrpBegin/End (aclcppdevg_03_1823): tasks between them form a group;
    # aclmdlRICaptureTaskUpdateBegin/End (aclcppdevg_03_1825): on a stream not capturing, the same number and
    # kinds of tasks issued between them replace the group's in the captured model. (Ours: an update is
    # asynchronous, a refused one reported by the stream's next synchronisation.)
    a, b = np.arange(6, dtype=np.float32), np.full(6, 0.5, dtype=np.float32)
    (da, ba, _), (db, bb, _) = _tensor(acl, ACL_FLOAT, a), _tensor(acl, ACL_FLOAT, b)
    dout, bout, pout = _tensor(acl, ACL_FLOAT, np.zeros(6, dtype=np.float32))

    def add(x, y):
        assert acl.op.execute_v2("Add", [da, db], [x, y], [dout], [bout], 0, stream) == ACL_SUCCESS

    assert acl.mdl.ri_capture_begin(stream, 0) == ACL_SUCCESS
    assert acl.mdl.ri_capture_task_grp_begin(stream) == ACL_SUCCESS
    add(ba, bb)
    group = ok(acl.mdl.ri_capture_task_grp_end(stream))
    graph = ok(acl.mdl.ri_capture_end(stream))

    def replay() -> list[float]:
        assert acl.mdl.ri_execute_async(graph, stream) == ACL_SUCCESS
        assert acl.rt.synchronize_stream(stream) == ACL_SUCCESS
        return np.frombuffer(read(acl, pout, 24), np.float32).tolist()

    assert replay() == (a + b).tolist()
    assert acl.mdl.ri_capture_task_update_begin(stream, group) == ACL_SUCCESS
    add(ba, ba)  # the same operator on other operands: nothing runs now
    assert acl.mdl.ri_capture_task_update_end(stream) == ACL_SUCCESS
    assert replay() == (a + a).tolist()

    assert acl.mdl.ri_capture_task_update_begin(stream, group) == ACL_SUCCESS
    add(ba, bb)
    add(ba, bb)  # two tasks for a group of one
    assert acl.mdl.ri_capture_task_update_end(stream) == ACL_SUCCESS  # asynchronous, as the operators are
    assert acl.rt.synchronize_stream(stream) == ACL_ERROR_INVALID_PARAM  # ... so the stream reports it
    assert "same operators" in acl.get_recent_err_msg()
    assert replay() == (a + a).tolist()  # a refused update changes nothing
    assert acl.mdl.ri_destroy(graph) == ACL_SUCCESS
