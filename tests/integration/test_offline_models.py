"""Offline models end to end, as a user runs them: an ONNX model converted by `flexnpu-atc` (its command line),
then tests/programs/classify.py — the public pyACL classification sample's call sequence — through the daemon and
in direct mode, against onnxruntime's answer; a corrupt .om gets ACL_ERROR_PARSE_MODEL and the daemon serves on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest

from tests.conftest import ROOT, acl_program, requires_mount
from workloads import onnx_models

ATC = [sys.executable, "-m", "tools.atc.cli"]
MODELS = {
    "resnet18": (lambda: onnx_models.resnet18(batch=2, image_size=64, width=16, classes=10), (2, 3, 64, 64)),
    "yolo": (lambda: onnx_models.yolo_head(batch=1, image_size=64), (1, 3, 64, 64)),
    "resnet18-any-batch": (lambda: onnx_models.resnet18(image_size=64, width=16, classes=10), (2, 3, 64, 64)),
}


def convert(tmp_path, name: str, precision: str, *extra: str) -> tuple:
    build, shape = MODELS[name]
    model_path = tmp_path / f"{name}.onnx"
    onnx.save(build(), model_path)
    args = [f"--model={model_path}", "--framework=5", f"--output={tmp_path / name}", "--soc_version=Ascend910B2"]
    args += [f"--precision_mode={precision}", *extra]
    result = subprocess.run([*ATC, *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "ATC run success" in result.stdout, result.stderr
    images = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    session = onnxruntime.InferenceSession(str(model_path))
    reference = session.run(None, {session.get_inputs()[0].name: images})[0]
    return tmp_path / f"{name}.om", tmp_path / "images.npy", reference


@requires_mount
@pytest.mark.parametrize(
    ("name", "precision", "tolerance"), [("resnet18", "force_fp32", 1e-4), ("yolo", "force_fp16", 2e-2)]
)
@pytest.mark.parametrize("mode", ["daemon", "direct"])
def test_a_converted_model_classifies_as_onnxruntime_does(daemon, tmp_path, name, precision, tolerance, mode):
    om_path, images, reference = convert(tmp_path, name, precision)
    out = tmp_path / "out.npy"
    run_opts = ("--direct",) if mode == "direct" else ("--devices", "0")
    result = acl_program(daemon.mount, "classify.py", str(om_path), str(images), str(out), run_opts=run_opts)
    assert result.returncode == 0, result.stderr
    got = np.load(out).reshape(reference.shape)
    np.testing.assert_allclose(got, reference, rtol=tolerance, atol=tolerance * np.abs(reference).max())
    if name == "resnet18":
        top5 = json.loads(result.stdout)
        assert [row[0] for row in top5] == reference.argmax(axis=1).tolist()


@requires_mount
def test_a_corrupt_or_vendor_model_is_refused_and_the_daemon_serves_on(daemon, tmp_path):
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((1, 3, 8, 8), dtype=np.float32))
    for content, says in ((b"IMOD" + bytes(300), "vendor"), (b"FLEXOM\x00\x01" + bytes(40), "")):
        bad = tmp_path / "bad.om"
        bad.write_bytes(content)
        result = acl_program(daemon.mount, "classify.py", str(bad), str(images), str(tmp_path / "o.npy"))
        assert result.returncode != 0
        assert "load_from_file failed: 100013" in result.stderr and says in result.stderr.lower()
    assert acl_program(daemon.mount, "roundtrip.py").returncode == 0


@requires_mount
def test_a_model_with_batch_gears_runs_the_images_batch(daemon, tmp_path):
    om_path, images, reference = convert(
        tmp_path, "resnet18-any-batch", "force_fp32", "--input_shape=images:-1,3,64,64", "--dynamic_batch_size=1,2,4"
    )
    out = tmp_path / "out.npy"
    result = acl_program(daemon.mount, "classify.py", str(om_path), str(images), str(out))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
