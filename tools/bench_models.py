"""`vdevctl bench models`: conventional inference (an offline model through acl.mdl) alone and beside LLM decode.

ResNet-50 (workloads/onnx_models.py, seeded weights) converted by flexnpu-atc with force_fp16, run by
tools/models_client.py through the daemon on an emulated 910B2 in timing mode:
- alone, batch 1 / 8 / 32, with no clock (time_scale 0: the chip's modeled time only, no host gaps): latency per
  execute and images/s, beside the one public Ascend 910 ResNet-50 figure at hand (training, so forward-only
  inference is bounded by roughly 3x it: a forward pass is about a third of a training step's FLOPs);
- beside decode, paced (`PACED_SCALE` wall seconds per modeled second): a decode-step proxy (28 small MatMuls
  between events, tests/programs/matmul_steps.py, on a role=decode virtual NPU) alone, then beside the CNN looping
  at batch 8 on another virtual NPU of the same chip, under fifo, flex, and flex asked to keep decode within 5 % of
  its step alone: what the CNN costs decode's step time and what the CNN still gets.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from interposer.shim.flexnpu_client import om
from tools import launch
from tools.atc.convert import Options, convert
from workloads import onnx_models
from workloads.tables import plain

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "models_client.py"
DECODE = ROOT / "tests" / "programs" / "matmul_steps.py"
BATCHES = (1, 8, 32)
PACED_SCALE = 20.0
# MindSpore r0.6 benchmark (docs/source_zh_cn/benchmark.md): ResNet-50 v1.5 training, 1x Ascend 910, mixed
# precision, batch 256: 2,115 images/s. Not an inference figure, and not a 910B2: context only.
PUBLIC_TRAINING_IMAGES_PER_S = 2115


# (label, policy, its options): flex spends decode's slack up to its absolute target (40 ms a step by default), so
# a 1-ms step beside a CNN is "on target" for it; tpot_isolated_pct asks for "within N % of the step alone".
POLICIES = (("fifo", "fifo", ""), ("flex", "flex", ""), ("flex isolated+5%", "flex", "tpot_isolated_pct = 5\n"))


def config(policy: str, time_scale: float, options: str = "") -> str:
    npu = f'[[physical]]\nname = "npu0"\nchip = "910B2"\nmode = "timing"\npolicy = "{policy}"\n'
    virtual = (
        '[[virtual]]\nname = "davinci0"\nphysical = "npu0"\nmemory = "16GiB"\n'
        '[[virtual]]\nname = "davinci1"\nphysical = "npu0"\nmemory = "16GiB"\nrole = "decode"\n'
    )
    table = f"[policy.{policy}]\n{options}" if options else ""
    return f"[daemon]\ntime_scale = {time_scale}\n{npu}{virtual}{table}"


def build(batch: int, where: Path) -> Path:
    model = onnx_models.resnet50(batch=batch)
    path = where / f"resnet50_b{batch}.om"
    path.write_bytes(om.dumps(convert(model, Options(soc="Ascend910B2", precision_mode="force_fp16"))))
    return path


def _client(mount: Path, device: int, *args: str, stdin=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tools.vdevctl", "--mount", str(mount), "run", "--devices", str(device), "--"]
        + [sys.executable, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _decode_step_ms(mount: Path, steps: int) -> float:
    proc = _client(mount, 1, str(DECODE), "decode", str(steps))
    out, _ = proc.communicate(timeout=600)
    return statistics.median(json.loads(out)["steps_ms"][1:])  # the first step sends the descriptions


def run(quick: bool = False) -> dict:
    executions, steps = (5, 20) if quick else (20, 100)
    results: dict = {"alone": {}, "beside_decode": {}, "public_training_images_per_s": PUBLIC_TRAINING_IMAGES_PER_S}
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as tmp:
        tmp = Path(tmp)
        models = {b: build(b, tmp) for b in BATCHES}
        path = tmp / "alone.toml"
        path.write_text(config("fifo", 0))
        with launch.daemon(tmp / "alone", path, tmp / "alone.log"):
            for batch, model in models.items():
                out, _ = _client(tmp / "alone", 0, str(CLIENT), str(model), str(executions)).communicate(timeout=900)
                latency = statistics.median(json.loads(out)["latency_ms"])
                results["alone"][batch] = {"latency_ms": latency, "images_per_s": batch / latency * 1e3}
        for n, (label, policy, options) in enumerate(POLICIES[:1] if quick else POLICIES):
            path = tmp / f"paced{n}.toml"
            path.write_text(config(policy, PACED_SCALE, options))
            mount = tmp / f"paced{n}"
            with launch.daemon(mount, path, tmp / f"paced{n}.log"):
                alone = _decode_step_ms(mount, steps)
                cnn = _client(mount, 0, str(CLIENT), str(models[8]), "loop", stdin=subprocess.PIPE)
                try:
                    assert json.loads(cnn.stdout.readline()) == {"ready": True}
                    beside = _decode_step_ms(mount, steps)
                    cnn.stdin.write("stop\n")
                    cnn.stdin.flush()
                    got = json.loads(cnn.stdout.readline())
                finally:
                    cnn.communicate(timeout=600)
            results["beside_decode"][label] = {
                "decode_step_ms_alone": alone,
                "decode_step_ms_beside_cnn": beside,
                "decode_slowdown": beside / alone,
                "cnn_latency_ms_beside": got["latency_ms"],
                "cnn_images_per_s_beside": 8 / got["latency_ms"] * 1e3,
                "cnn_images_per_s_alone": results["alone"][8]["images_per_s"],
            }
    return results


def render(r: dict) -> str:
    rows = [("ResNet-50, 910B2, fp16", "latency (ms, modeled)", "images/s")]
    for batch, a in r["alone"].items():
        rows.append((f"batch {batch}", f"{a['latency_ms']:.2f}", f"{a['images_per_s']:,.0f}"))
    public = r["public_training_images_per_s"]
    note = (
        f"public: ResNet-50 v1.5 TRAINING on one Ascend 910 (MindSpore r0.6), {public:,} images/s at batch 256; "
        f"forward-only inference is bounded by ~3x that (~{3 * public:,})"
    )
    side = [("policy", "decode step alone", "beside CNN b8", "decode slowdown", "CNN images/s beside / alone")]
    for policy, b in r["beside_decode"].items():
        side.append(
            (
                policy,
                f"{b['decode_step_ms_alone']:.3f} ms",
                f"{b['decode_step_ms_beside_cnn']:.3f} ms",
                f"{b['decode_slowdown']:.2f}x",
                f"{b['cnn_images_per_s_beside']:,.0f} / {b['cnn_images_per_s_alone']:,.0f}",
            )
        )
    return f"{plain(rows)}\n{note}\n\n{plain(side)}"
