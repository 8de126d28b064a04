"""acl.mdl's offline models (interposer/shim/acl/mdl.py, _models.py) in direct mode, over a small .om built here
by hand (flexnpu_client/om.py): out = x @ w + b, static and with batch gears. Return shapes and codes are the pyACL
reference's (hiascend.com pyACL pages "load_from_file" … "set_dynamic_batch_size"; acl_base.h for
ACL_ERROR_PARSE_MODEL 100013, ACL_ERROR_READ_MODEL_FAILURE 100014, ACL_ERROR_INVALID_MODEL_ID 100011,
ACL_ERROR_MODEL_NOT_DYNAMIC 100019), as the Ascend/samples classification sample calls them."""

from __future__ import annotations

import numpy as np
import pytest

from interposer.shim.flexnpu_client import om

FLOAT, NCHW, ND = 0, 0, 2
H2D, D2H = 1, 2
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
B = np.array([1.0, -2.0, 0.5], dtype=np.float32)


def linear(batches: list[int]) -> bytes:
    """x [batch, 4] -> out [batch, 3]; one graph per batch (a static model: [0] with batch 1 shapes)."""
    blob = W.tobytes() + bytes(16) + B.tobytes()
    graphs = []
    for batch in batches:
        n = batch or 1
        tensors = {
            "x": om.Tensor("x", FLOAT, (n, 4), ND),
            "w": om.Tensor("w", FLOAT, (4, 3), ND),
            "b": om.Tensor("b", FLOAT, (3,), ND),
            "xw": om.Tensor("xw", FLOAT, (n, 3), ND),
            "out": om.Tensor("out", FLOAT, (n, 3), ND),
        }
        nodes = (om.Node("MatMulV2", ("x", "w"), ("xw",), {}), om.Node("Add", ("xw", "b"), ("out",), {}))
        graphs.append(om.Graph(batch, tensors, nodes))
    model = om.Model("Ascend910B2", ("x",), ("out",), {"w": (0, 48), "b": (64, 12)}, blob, tuple(graphs), {})
    return om.dumps(model)


@pytest.fixture(scope="module")
def acl(direct_acl):
    assert direct_acl.init() == 0
    assert direct_acl.rt.set_device(0) == 0
    yield direct_acl
    assert direct_acl.rt.reset_device(0) == 0
    assert direct_acl.finalize() == 0


def load(acl, data: bytes) -> tuple[int, int]:
    model_id, ret = acl.mdl.load_from_mem(acl.util.bytes_to_ptr(data), len(data))
    assert ret == 0, acl.get_recent_err_msg()
    desc = acl.mdl.create_desc()
    assert acl.mdl.get_desc(desc, model_id) == 0
    return model_id, desc


def device(acl, data: bytes | int) -> tuple[int, int]:
    """A device buffer holding `data` (or that many zero bytes) and its data buffer handle."""
    size = data if isinstance(data, int) else len(data)
    ptr, ret = acl.rt.malloc(size, 0)
    assert ret == 0
    if not isinstance(data, int):
        assert acl.rt.memcpy(ptr, size, acl.util.bytes_to_ptr(data), size, H2D) == 0
    return ptr, acl.create_data_buffer(ptr, size)


def dataset(acl, *buffers: int) -> int:
    ds = acl.mdl.create_dataset()
    for b in buffers:
        echoed, ret = acl.mdl.add_dataset_buffer(ds, b)
        assert (echoed, ret) == (ds, 0)
    return ds


def read(acl, ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape)) * 4
    host = bytearray(size)
    assert acl.rt.memcpy(acl.util.bytes_to_ptr(host), size, ptr, size, D2H) == 0
    return np.frombuffer(bytes(host), dtype=np.float32).reshape(shape)


def test_a_static_model_describes_itself_and_runs_sync_and_async(acl):
    free_before, _, _ = acl.rt.get_mem_info(1)
    model_id, desc = load(acl, linear([0]))
    free_after, _, _ = acl.rt.get_mem_info(1)
    assert free_before - free_after >= 76  # its weights are the virtual NPU's memory
    assert (acl.mdl.get_num_inputs(desc), acl.mdl.get_num_outputs(desc)) == (1, 1)
    assert acl.mdl.get_input_dims(desc, 0) == ({"name": "x", "dimCount": 2, "dims": [1, 4]}, 0)
    assert acl.mdl.get_output_dims(desc, 0) == ({"name": "out", "dimCount": 2, "dims": [1, 3]}, 0)
    assert (acl.mdl.get_input_size_by_index(desc, 0), acl.mdl.get_output_size_by_index(desc, 0)) == (16, 12)
    assert (acl.mdl.get_input_name_by_index(desc, 0), acl.mdl.get_output_name_by_index(desc, 0)) == ("x", "out")
    assert acl.mdl.get_input_index_by_name(desc, "x") == (0, 0)
    assert (acl.mdl.get_input_data_type(desc, 0), acl.mdl.get_input_format(desc, 0)) == (FLOAT, ND)
    assert acl.mdl.get_dynamic_batch(desc) == ({"batchCount": 0, "batch": []}, 0)

    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    _, xb = device(acl, x.tobytes())
    out, ob = device(acl, 12)
    ins, outs = dataset(acl, xb), dataset(acl, ob)
    assert acl.mdl.execute(model_id, ins, outs) == 0
    np.testing.assert_allclose(read(acl, out, (1, 3)), x @ W + B, rtol=1e-6)

    stream, _ = acl.rt.create_stream()
    assert acl.rt.memset(out, 12, 0, 12) == 0
    assert acl.mdl.execute_async(model_id, ins, outs, stream) == 0
    assert acl.rt.synchronize_stream(stream) == 0
    np.testing.assert_allclose(read(acl, out, (1, 3)), x @ W + B, rtol=1e-6)
    assert acl.mdl.get_dataset_num_buffers(ins) == 1 and acl.mdl.get_dataset_buffer(ins, 0) == xb
    assert acl.mdl.get_dataset_buffer(ins, 5) == 0
    assert acl.mdl.destroy_dataset(ins) == 0 and acl.mdl.destroy_desc(desc) == 0
    held = acl.rt.get_mem_info(1)[0]
    assert acl.mdl.unload(model_id) == 0
    assert acl.rt.get_mem_info(1)[0] == held + (free_before - free_after)  # its weights and workspace went back


def test_batch_gears_take_the_dynamic_input_and_the_chosen_batch(acl):
    model_id, desc = load(acl, linear([1, 2, 4]))
    assert acl.mdl.get_num_inputs(desc) == 2  # x, and the dynamic-batch input ATC adds
    index, ret = acl.mdl.get_input_index_by_name(desc, "ascend_mbatch_shape_data")
    assert (index, ret) == (1, 0)
    assert acl.mdl.get_input_dims(desc, 0)[0]["dims"] == [-1, 4]
    assert acl.mdl.get_input_size_by_index(desc, 0) == 4 * 4 * 4  # the largest gear
    assert acl.mdl.get_dynamic_batch(desc) == ({"batchCount": 3, "batch": [1, 2, 4]}, 0)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    _, xb = device(acl, x.tobytes() + bytes(32))
    _, dyn = device(acl, 8)
    out, ob = device(acl, 48)
    ins, outs = dataset(acl, xb, dyn), dataset(acl, ob)
    assert acl.mdl.execute(model_id, ins, outs) == 100000  # no gear chosen yet
    assert "set_dynamic_batch_size" in acl.get_recent_err_msg()
    assert acl.mdl.set_dynamic_batch_size(model_id, ins, index, 3) == 100000
    assert acl.mdl.set_dynamic_batch_size(model_id, ins, index, 2) == 0
    assert acl.mdl.execute(model_id, ins, outs) == 0
    np.testing.assert_allclose(read(acl, out, (2, 3)), x @ W + B, rtol=1e-6)
    assert acl.mdl.get_cur_output_dims(desc, 0) == ({"name": "out", "dimCount": 2, "dims": [2, 3]}, 0)
    assert acl.mdl.unload(model_id) == 0


def test_mistakes_get_the_acl_codes_and_a_message(acl, tmp_path):
    assert acl.mdl.load_from_file(str(tmp_path / "missing.om"))[1] == 100014
    bad = tmp_path / "vendor.om"
    bad.write_bytes(b"IMOD" + bytes(252))
    model_id, ret = acl.mdl.load_from_file(str(bad))
    assert (model_id, ret) == (0, 100013)
    assert acl.get_recent_err_msg()  # names what the file is not
    assert acl.mdl.unload(12345) == 100011
    static_id, desc = load(acl, linear([0]))
    assert acl.mdl.set_dynamic_batch_size(static_id, acl.mdl.create_dataset(), 1, 1) == 100019
    _, xb = device(acl, 16)
    _, small = device(acl, 4)
    assert acl.mdl.execute(static_id, dataset(acl, xb), dataset(acl, small)) == 100000
    assert "needs 12" in acl.get_recent_err_msg()
    assert acl.mdl.get_input_size_by_index(desc, 7) == 0 and acl.mdl.get_input_name_by_index(desc, 7) == ""
    assert acl.mdl.get_input_dims(desc, 7)[1] == 100000
    assert acl.mdl.unload(static_id) == 0


def test_threads_executing_one_model_never_share_its_workspace_at_once(acl):
    """A model's intermediates live in one workspace: executions from several threads (and streams) run one after
    another, each with its own answer (found in review: 5 of 30 answers were wrong)."""
    import threading

    model_id, _ = load(acl, linear([0]))
    context, _ = acl.rt.get_context()
    wrong = []

    def worker(k: int) -> None:
        acl.rt.set_context(context)
        stream, _ = acl.rt.create_stream()
        for i in range(10):
            x = np.full((1, 4), k * 10 + i, dtype=np.float32)
            _, xb = device(acl, x.tobytes())
            out, ob = device(acl, 12)
            assert acl.mdl.execute_async(model_id, dataset(acl, xb), dataset(acl, ob), stream) == 0
            assert acl.rt.synchronize_stream(stream) == 0
            if not np.allclose(read(acl, out, (1, 3)), x @ W + B, rtol=1e-6):
                wrong.append((k, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert acl.mdl.unload(model_id) == 0
