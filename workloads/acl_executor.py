"""Runs the model description (model.py) on an NPU through pyACL alone: `import acl` is the vendor's module on an
Ascend host, FlexNPU's shim everywhere else, and this code is the same for both.

The executor allocates every weight and the paged KV cache (one key pool and one value pool per layer) in device
memory, copies the weights in (or nothing, when given none: an emulated NPU in timing mode has shapes only), and
runs a step by writing its inputs (token ids, positions, slots, block tables) into device buffers, launching
each call of the description with aclopExecuteV2 on one stream, and reading back the sampled tokens.
Activation buffers are sized by the largest step seen so far.

Decode steps can run as captured graphs, one per batch-size bucket, as vllm-ascend's graph mode does: the step's
inputs live in fixed device buffers rewritten before each replay, a batch is padded up to its bucket (padding rows
write their KV into a scratch block), and each layer's IncreFlashAttention — whose attr actual_seq_lengths changes
every step — sits in a task group that is updated with the step's lengths before the replay
(aclmdlRICaptureTaskGrp*, aclmdlRICaptureTaskUpdate*). A replay is one record for the whole step instead of a
launch per operator.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

import acl
from npu.emulated.dtypes import CODES
from workloads.model import (
    NEXT_TOKENS,
    CacheConfig,
    Decode,
    ModelConfig,
    OpCall,
    Prefill,
    Tensor,
    buffer_sizes,
    forward,
    kv_cache_specs,
    step_inputs,
    weight_specs,
)

ACL_FORMAT_ND = 2
ATTENTION = "IncreFlashAttention"  # the one decode operator whose attrs change from step to step
MEMCPY_HOST_TO_DEVICE, MEMCPY_DEVICE_TO_HOST = 1, 2
MALLOC_HUGE_FIRST = 0


class AclCallFailed(RuntimeError):
    pass


def check(ret: int, what: str) -> None:
    if ret != 0:
        raise AclCallFailed(f"{what} failed with aclError {ret}: {acl.get_recent_err_msg()}")


def checked(result: tuple, what: str):
    *values, ret = result
    check(ret, what)
    return values[0] if len(values) == 1 else values


def _host_ptr(data: bytearray) -> int:
    # numpy_to_ptr is deprecated in recent pyACL, bytes_to_ptr missing in older: probe, as Ascend's samples do.
    if "bytes_to_ptr" in dir(acl.util):
        return acl.util.bytes_to_ptr(data)
    return acl.util.numpy_to_ptr(np.frombuffer(data, np.uint8))


class _StepHandles:
    """Tensor descriptors, data buffers and attrs made for one step's launches, shared among its calls and
    destroyed after it (a decode step's attrs change every step)."""

    def __init__(self) -> None:
        self.descs: dict[tuple, int] = {}
        self.data: dict[tuple[int, int], int] = {}
        self.attrs: dict[tuple, int] = {}

    def desc(self, tensor: Tensor) -> int:
        key = (tensor.spec.dtype, tensor.spec.shape)
        if key not in self.descs:
            self.descs[key] = acl.create_tensor_desc(CODES[tensor.spec.dtype], list(tensor.spec.shape), ACL_FORMAT_ND)
        return self.descs[key]

    def buffer(self, ptr: int, size: int) -> int:
        if (ptr, size) not in self.data:
            self.data[ptr, size] = acl.create_data_buffer(ptr, size)
        return self.data[ptr, size]

    def attr(self, attrs: dict) -> int:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()))
        if key not in self.attrs:
            handle = self.attrs[key] = acl.op.create_attr()
            for name, value in attrs.items():
                check(_attr_setter(value)(handle, name, value), f"set attr {name}")
        return self.attrs[key]

    def destroy(self) -> None:
        for desc in self.descs.values():
            acl.destroy_tensor_desc(desc)
        for buffer in self.data.values():
            check(acl.destroy_data_buffer(buffer), "destroy_data_buffer")
        for attr in self.attrs.values():
            acl.op.destroy_attr(attr)


def _attr_setter(value):
    if isinstance(value, bool):
        return acl.op.set_attr_bool
    if isinstance(value, int):
        return acl.op.set_attr_int
    if isinstance(value, float):
        return acl.op.set_attr_float
    if isinstance(value, str):
        return acl.op.set_attr_string
    return acl.op.set_attr_list_int


class AclModel:
    """One model on one device. `weights`: the buffers of model.weight_specs (workloads.weights.device_weights),
    or None to allocate them without data. The caller has called acl.init."""

    def __init__(
        self,
        config: ModelConfig,
        cache: CacheConfig,
        weights: dict[str, np.ndarray] | None,
        device_id=0,
        kv: dict[str, int] | None = None,
        buckets: tuple[int, ...] = (),
        max_context: int = 0,
    ):
        """`kv`: device addresses of KV pools this model uses but does not own (IPC memory another process
        exported: a co-located prefill instance's cache), by pool name; the others are allocated here.
        `buckets`: decode batch sizes to run as captured graphs (the cache's last block is then scratch, for the
        padding rows; give it one block more than the batcher uses), for contexts up to `max_context` tokens."""
        self.config, self.cache, self.device_id = config, cache, device_id
        self.buckets = tuple(sorted(buckets))
        self.max_blocks = -(-(max_context or config.max_position_embeddings) // cache.block_size)
        self.graphs: dict[int, tuple[int, list[int]]] = {}  # bucket -> (captured graph, attention task groups)
        self.staging: dict[str, tuple[int, int]] = {}  # step input -> (pinned host buffer, bytes)
        check(acl.rt.set_device(device_id), f"set_device({device_id})")
        self.stream = checked(acl.rt.create_stream(), "create_stream")
        self.events = [checked(acl.rt.create_event(), "create_event") for _ in range(2)]
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device address, bytes)
        self.borrowed = set(kv or ())
        for name, spec in kv_cache_specs(config, cache).items():
            if name in self.borrowed:
                self.buffers[name] = (kv[name], spec.nbytes)
        for name, spec in {**weight_specs(config), **kv_cache_specs(config, cache)}.items():
            self._reserve(name, spec.nbytes)
            if weights is not None and name in weights:
                self._write(name, weights[name])
        self.device_ms = 0.0  # the last step's time on the device, between events on its stream
        self.host_ms = 0.0  # the last step's time on the host, inputs to tokens
        self.issue_ms = 0.0  # of which the host's own work: inputs written and every launch issued

    def prefill(
        self, prompts: list[list[int]], block_tables: list[list[int]], starts: list[int] | None = None
    ) -> list[int]:
        """Prompts, or chunks of prompts whose first `starts` tokens are in the KV cache already (chunked prefill);
        each request's blocks must hold its context. Returns the token after each prompt or chunk."""
        step = Prefill(tuple(len(p) for p in prompts), tuple(starts or ()))
        return self._step(step, prompts, block_tables)

    def decode(self, tokens: list[int], context_lens: list[int], block_tables: list[list[int]]) -> list[int]:
        """One token per running request; context_lens count it too. Returns each request's next token."""
        bucket = next((b for b in self.buckets if b >= len(tokens)), None)
        if bucket is None:
            step = Decode(tuple(context_lens), max(len(t) for t in block_tables))
            return self._step(step, [[t] for t in tokens], block_tables)
        pad = bucket - len(tokens)
        scratch = [self.cache.num_blocks - 1]
        step = Decode((*context_lens, *[1] * pad), self.max_blocks)
        tables = [*block_tables, *[scratch] * pad]
        return self._step(step, [[t] for t in [*tokens, *[0] * pad]], tables, graph=bucket)[: len(tokens)]

    def kv_pools(self) -> dict[str, tuple[int, int]]:
        """The KV pools, by name: (device address, bytes)."""
        return {name: self.buffers[name] for name in kv_cache_specs(self.config, self.cache)}

    def close(self) -> None:
        self._drop_graphs()
        for host, _ in self.staging.values():
            check(acl.rt.free_host(host), "free_host")
        for name, (ptr, _) in self.buffers.items():
            if name not in self.borrowed:
                check(acl.rt.free(ptr), "free")
        self.buffers.clear()
        for event in self.events:
            check(acl.rt.destroy_event(event), "destroy_event")
        check(acl.rt.destroy_stream(self.stream), "destroy_stream")
        check(acl.rt.reset_device(self.device_id), "reset_device")

    # -- a step ---------------------------------------------------------------------------------------------

    def _step(self, step: Prefill | Decode, tokens, block_tables, graph: int | None = None) -> list[int]:
        """Run a step eagerly, or (`graph`: its bucket) as the bucket's captured graph."""
        began = time.perf_counter()
        calls = forward(self.config, self.cache, step)
        for name, size in buffer_sizes(calls).items():
            self._reserve(name, size)
        for name, array in step_inputs(step, tokens, block_tables, self.cache.block_size).items():
            self._stage(name, array)
        handles = _StepHandles()
        if graph is not None:
            self._update(graph, calls, handles)
        start, end = self.events
        check(acl.rt.record_event(start, self.stream), "record_event")
        if graph is None:
            for call in calls:
                self._launch(call, handles)
        else:
            check(acl.mdl.ri_execute_async(self.graphs[graph][0], self.stream), "ri_execute_async")
        check(acl.rt.record_event(end, self.stream), "record_event")
        self.issue_ms = (time.perf_counter() - began) * 1e3
        check(acl.rt.synchronize_stream(self.stream), "synchronize_stream")
        handles.destroy()
        self.device_ms = checked(acl.rt.event_elapsed_time(start, end), "event_elapsed_time")
        tokens = self._read(NEXT_TOKENS, np.dtype(np.int32), step.batch).tolist()
        self.host_ms = (time.perf_counter() - began) * 1e3
        return tokens

    def _update(self, bucket: int, calls: list[OpCall], handles: _StepHandles) -> None:
        """The bucket's graph, captured on first use; its attention task groups given this step's lengths."""
        attention = [call for call in calls if call.op == ATTENTION]
        if bucket not in self.graphs:
            stream, groups = self.stream, []
            check(acl.mdl.ri_capture_begin(stream, 0), "ri_capture_begin")
            for call in calls:
                if call.op == ATTENTION:
                    check(acl.mdl.ri_capture_task_grp_begin(stream), "ri_capture_task_grp_begin")
                self._launch(call, handles)
                if call.op == ATTENTION:
                    groups.append(checked(acl.mdl.ri_capture_task_grp_end(stream), "ri_capture_task_grp_end"))
            self.graphs[bucket] = (checked(acl.mdl.ri_capture_end(stream), "ri_capture_end"), groups)
            return
        for call, group in zip(attention, self.graphs[bucket][1], strict=True):
            check(acl.mdl.ri_capture_task_update_begin(self.stream, group), "ri_capture_task_update_begin")
            self._launch(call, handles)
            check(acl.mdl.ri_capture_task_update_end(self.stream), "ri_capture_task_update_end")

    def _drop_graphs(self) -> None:
        for graph, _ in self.graphs.values():
            check(acl.mdl.ri_destroy(graph), "ri_destroy")
        self.graphs.clear()

    def _launch(self, call: OpCall, handles: _StepHandles) -> None:
        def operands(tensors: tuple[Tensor, ...]) -> tuple[list[int], list[int]]:
            descs = [handles.desc(t) for t in tensors]
            data = [handles.buffer(self.buffers[t.buffer][0] + t.offset, t.spec.nbytes) for t in tensors]
            return descs, data

        in_descs, ins = operands(call.ins)
        out_descs, outs = operands(call.outs)
        attr = handles.attr(call.attrs)
        check(acl.op.execute_v2(call.op, in_descs, ins, out_descs, outs, attr, self.stream), call.op)

    # -- device memory --------------------------------------------------------------------------------------

    def _reserve(self, name: str, size: int) -> None:
        """A buffer of at least `size` bytes under `name` (a smaller one is replaced: its contents are lost)."""
        held = self.buffers.get(name)
        if held is not None and held[1] >= size:
            return
        if held is not None:
            check(acl.rt.free(held[0]), "free")
            self._drop_graphs()  # they name the old address: captured again at their next step
        self.buffers[name] = (checked(acl.rt.malloc(size, MALLOC_HUGE_FIRST), f"malloc {name} ({size} bytes)"), size)

    def _write(self, name: str, array: np.ndarray) -> None:
        data = bytearray(np.ascontiguousarray(array).tobytes())
        ptr, size = self.buffers[name]
        check(acl.rt.memcpy(ptr, size, _host_ptr(data), len(data), MEMCPY_HOST_TO_DEVICE), f"memcpy to {name}")

    def _stage(self, name: str, array: np.ndarray) -> None:
        """A step's input, copied in on the step's stream from pinned host memory (malloc_host, reused): queued
        ahead of the step's operators, so writing the inputs costs no round trip of its own."""
        data = np.ascontiguousarray(array).tobytes()
        host, size = self.staging.get(name, (0, 0))
        if size < len(data):
            if host:
                check(acl.rt.free_host(host), "free_host")
            host, size = checked(acl.rt.malloc_host(len(data)), "malloc_host"), len(data)
            self.staging[name] = (host, size)
        ctypes.memmove(host, data, len(data))
        ptr, capacity = self.buffers[name]
        copy = acl.rt.memcpy_async(ptr, capacity, host, len(data), MEMCPY_HOST_TO_DEVICE, self.stream)
        check(copy, f"memcpy_async to {name}")

    def _read(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        data = bytearray(count * dtype.itemsize)
        ptr, _ = self.buffers[name]
        check(acl.rt.memcpy(_host_ptr(data), len(data), ptr, len(data), MEMCPY_DEVICE_TO_HOST), f"memcpy from {name}")
        return np.frombuffer(data, dtype)
