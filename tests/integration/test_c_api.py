"""C programs written against acl/acl.h (tests/c/), compiled here with gcc as a user would, with the flags
`vdevctl shim` prints, and run: through the daemon under `vdevctl run`, in direct mode (the engine in the
program's own process, through an embedded Python), with LD_PRELOAD over a vendor library baked into the binary,
and in a private mount namespace whose root holds only the program and libc, with one bound virtual NPU and the
C library bound in (by hand, or as the CDI spec binds them) — no Python. tests/c/ says what each program checks."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from interposer.shim.flexnpu_client import om
from tests.conftest import ROOT, VDEVCTL, requires_mount, vdevctl
from tests.integration.test_cdi_container import runtime_edits
from tests.integration.test_offline_models import convert
from tools import cdi

pytestmark = [requires_mount, pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")]

SOURCES = ROOT / "tests" / "c"
PROGRAMS = {
    "add": "add ok",
    "runtime": "runtime ok",
    "ops": "ops ok",
    "model": "model ok",
    "lost": None,
    "classify": None,
}
TWO_ON_ONE_NPU = "0,1"  # the test topology's virtual NPUs on npu0: IPC memory needs one physical NPU


def _shim(*flag: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tools.vdevctl", "shim", *flag], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The library (make -C clib), then each program, compiled with only the documented flags."""
    make = subprocess.run(
        ["make", "-C", str(ROOT / "clib"), f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=300
    )
    assert make.returncode == 0, make.stderr
    include, lib = _shim("--c-include"), _shim("--c-lib")
    out = tmp_path_factory.mktemp("c-programs")
    binaries = {}
    for name in PROGRAMS:
        binary = out / name
        cc = [
            "gcc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread", str(SOURCES / f"{name}.c"),
            f"-I{include}", f"-L{lib}", "-lascendcl", "-lm", "-o", str(binary),
        ]  # fmt: skip
        result = subprocess.run(cc, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        binaries[name] = binary
    return binaries


CHECKS = [name for name, said in PROGRAMS.items() if said]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> list[str]:
    """The arguments of tests/c/model.c: a .om (y = (x + w) * 2, w in the blob, an intermediate in the workspace),
    written by the same writer flexnpu-atc uses, and a file that is no model."""
    out = tmp_path_factory.mktemp("models")
    f32 = {name: om.Tensor(name, 0, (4,), 2) for name in ("x", "w", "t", "y")}
    graph = om.Graph(
        0,
        f32,
        (
            om.Node("Add", ("x", "w"), ("t",), {}),
            om.Node("Muls", ("t",), ("y",), {"value": ("float", 2.0)}),
        ),
    )
    blob = struct.pack("<4f", 1, 2, 3, 4)
    model = om.Model("Ascend910B2", ("x",), ("y",), {"w": (0, len(blob))}, blob, (graph,), {"producer": "test"})
    (out / "double.om").write_bytes(om.dumps(model))
    (out / "garbage.om").write_bytes(b"no model at all" * 4)
    return [str(out / "double.om"), str(out / "garbage.om")]


def _args(program: str, model_files: list[str]) -> list[str]:
    return model_files if program == "model" else []


@pytest.mark.parametrize("program", CHECKS)
def test_through_the_daemon(daemon, built, program, model_files):
    run = ("run", "--devices", TWO_ON_ONE_NPU, "--")
    result = vdevctl(daemon.mount, *run, str(built[program]), *_args(program, model_files))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PROGRAMS[program]


@pytest.mark.parametrize("program", CHECKS)
def test_in_direct_mode(daemon, built, program, model_files):
    """The same binary with the engine in its own process (FLEXNPU_DIRECT: an embedded Python runs the translator)."""
    run = ("run", "--direct", "--config", str(daemon.config), "--devices", TWO_ON_ONE_NPU, "--")
    result = vdevctl(daemon.mount, *run, str(built[program]), *_args(program, model_files))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PROGRAMS[program]


CONVERSIONS = {
    "resnet18": ("resnet18", "force_fp32", 1e-4, ()),
    "yolo-fp16": ("yolo", "force_fp16", 2e-2, ()),
    "resnet18-gears": (
        "resnet18-any-batch",
        "force_fp32",
        1e-4,
        ("--input_shape=images:-1,3,64,64", "--dynamic_batch_size=1,2,4"),
    ),
}


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_a_model_converted_by_flexnpu_atc_answers_as_onnxruntime(daemon, built, tmp_path, conversion):
    """The same .om files, converted the same way, that tests/integration/test_offline_models.py runs through pyACL;
    the model with batch gears (1, 2, 4) runs the images' batch of 2."""
    name, precision, tolerance, extra = CONVERSIONS[conversion]
    om_path, images, reference = convert(tmp_path, name, precision, *extra)
    raw_in, raw_out = tmp_path / "images.bin", tmp_path / "out.bin"
    batch = np.load(images)
    raw_in.write_bytes(batch.tobytes())
    args = [str(om_path), str(raw_in), str(raw_out), *([str(len(batch))] if extra else [])]
    result = vdevctl(daemon.mount, "run", "--devices", "0", "--", str(built["classify"]), *args)
    assert result.returncode == 0, result.stderr
    raw = raw_out.read_bytes()
    dtype = {2: np.float16, 4: np.float32}[len(raw) // reference.size]  # the model's output type, as it declares
    got = np.frombuffer(raw, dtype).astype(np.float32).reshape(reference.shape)
    np.testing.assert_allclose(got, reference, rtol=tolerance, atol=tolerance * np.abs(reference).max())


MUTATE = """
import ctypes, random, sys
lib = ctypes.CDLL(sys.argv[1])
good = open(sys.argv[2], "rb").read()
rng = random.Random(0)
codes = set()
for _ in range(400):
    data = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        choice = rng.random()
        if choice < 0.4:
            data[at] = rng.randrange(256)
        elif choice < 0.7:
            data[at:at] = rng.choice([b"[", b"]", b"{", b"}", b'"', b",", b":", b"\\\\", b"1e999", b"-", b"null"])
        else:
            del data[at : at + rng.randint(1, 40)]
    model = ctypes.c_uint32()
    codes.add(lib.aclmdlLoadFromMem(bytes(data), len(data), ctypes.byref(model)))
print(sorted(codes))
"""


def test_a_damaged_model_is_refused_never_crashes(built, model_files, tmp_path):
    """400 random damages to a good .om (bytes changed, JSON punctuation inserted, spans cut): each load returns
    ACL_ERROR_PARSE_MODEL; none crashes. No device is reachable, so a model that still parses is refused at the
    chip check, with the same code."""
    env = {"PATH": "/usr/bin:/bin", "FLEXNPU_DEVICES": str(tmp_path / "no-such-device")}
    library = str(Path(_shim("--c-lib")) / "libascendcl.so")
    result = subprocess.run(
        [sys.executable, "-c", MUTATE, library, model_files[0]], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [100013], result.stdout


def test_a_virtual_npu_destroyed_under_the_program_is_the_device_lost(daemon, built):
    """The daemon's answer reaches the program as CANN's code for a lost channel (507901), with the message."""
    created = vdevctl(daemon.mount, "vnpu", "create", "--physical", "npu1", "--memory", "8MiB", "--name", "davinci7")
    assert created.returncode == 0, created.stderr
    program = subprocess.Popen(
        [*VDEVCTL, "--mount", str(daemon.mount), "run", "--devices", "7", "--", str(built["lost"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert program.stdout.readline().strip() == "ready", program.stderr.read()
        destroyed = vdevctl(daemon.mount, "vnpu", "destroy", "davinci7", "--force")
        assert destroyed.returncode == 0, destroyed.stderr
        out, err = program.communicate("go\n", timeout=60)
    finally:
        if program.poll() is None:
            program.kill()
    assert out.startswith("error 507901 ") and "destroyed by the operator" in out, (out, err)


def test_preload_wins_over_a_vendor_library_baked_into_the_binary(daemon, built, tmp_path):
    """A binary whose RPATH names a vendor libascendcl.so (DT_RPATH outranks LD_LIBRARY_PATH) runs on FlexNPU only
    with --preload."""
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    stub = tmp_path / "stub.c"  # every call the headers declare, failing with ACL_ERROR_INTERNAL_ERROR
    stub.write_text("".join(f"int {name}(void) {{ return 500000; }}\n" for name in sorted(_declared())))
    so = ["gcc", "-shared", "-fPIC", "-Wl,-soname,libascendcl.so", str(stub), "-o", str(vendor / "libascendcl.so")]
    assert subprocess.run(so, capture_output=True, timeout=60).returncode == 0
    binary = tmp_path / "add"
    cc = [
        "gcc", "-std=gnu11", str(SOURCES / "add.c"), f"-I{_shim('--c-include')}", f"-L{vendor}", "-lascendcl",
        f"-Wl,--disable-new-dtags,-rpath,{vendor}", "-o", str(binary),
    ]  # fmt: skip
    result = subprocess.run(cc, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    vendor_only = vdevctl(daemon.mount, "run", "--devices", "2", "--", str(binary))
    assert vendor_only.returncode != 0
    preloaded = vdevctl(daemon.mount, "run", "--preload", "--devices", "2", "--", str(binary))
    assert preloaded.returncode == 0, preloaded.stderr
    assert preloaded.stdout.strip() == "add ok"


def _declared() -> set[str]:
    """The calls the public headers declare."""
    text = " ".join(" ".join(h.read_text().split()) for h in (ROOT / "include" / "acl").glob("*.h"))
    return set(re.findall(r"ACL_FUNC_VISIBILITY [^;(]*?\b(acl\w+)\(", text))


def _system_libraries(root: Path, *objects: Path) -> None:
    """The system libraries `objects` load (ldd), copied to their own paths under `root`; not libascendcl.so."""
    for obj in objects:
        listing = subprocess.run(["ldd", str(obj)], capture_output=True, text=True, check=True).stdout
        for line in listing.splitlines():
            words = line.split()
            path = words[2] if "=>" in words and len(words) > 2 else words[0]
            if not path.startswith("/") or "libascendcl" in path:
                continue
            (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / path.lstrip("/"))  # follows links: the loader's own path may be one


def _binds(mounts: list[dict], root: Path) -> list[str]:
    """Shell lines binding each mount under `root`, as runc does: a bind, then a remount with the other options."""
    lines = []
    for m in mounts:
        target = shlex.quote(str(root) + m["containerPath"])
        make = "mkdir -p" if Path(m["hostPath"]).is_dir() else "touch"
        lines += [f"mkdir -p $(dirname {target}) && {make} {target}", f"mount --bind {m['hostPath']} {target}"]
        others = [o for o in m.get("options", []) if o not in ("bind", "rbind")]
        if others:
            lines.append(f"mount -o remount,bind,{','.join(others)} {target}")
    return lines


@pytest.mark.parametrize("how", ["bare", "cdi"])
def test_in_a_private_mount_namespace_with_only_the_node_and_the_library(daemon, built, tmp_path, how):
    """bare: the node bound at /dev/davinci0 and the library in a directory on LD_LIBRARY_PATH; cdi: what the CDI
    spec of davinci2 binds, with --c-lib-host-path (the library on the loader's default path, no environment)."""
    if not shutil.which("unshare") or not shutil.which("chroot"):
        pytest.skip("unshare or chroot not available")
    root = tmp_path / "root"
    root.mkdir()
    library = Path(_shim("--c-lib")) / "libascendcl.so"
    shutil.copy(built["add"], root / "add")
    _system_libraries(root, built["add"], library)
    if how == "bare":
        mounts = [
            {"hostPath": str(daemon.mount / "davinci2"), "containerPath": "/dev/davinci0"},
            {"hostPath": str(library), "containerPath": "/opt/flexnpu/lib/libascendcl.so", "options": ["ro"]},
        ]
        env = "LD_LIBRARY_PATH=/opt/flexnpu/lib"
    else:
        spec = cdi.spec(daemon.status(), daemon.mount, c_lib=library)
        env_vars, mounts = runtime_edits(spec, ["davinci2"])
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in env_vars.items())
    script = "\n".join(["set -e", *_binds(mounts, root), f"exec env -i {env} {shutil.which('chroot')} {root} /add"])
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0 and "Operation not permitted" in result.stderr:
        pytest.skip(f"this sandbox cannot make mount namespaces: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "add ok"
    assert not any(p.name.startswith("python") for p in root.rglob("*")), "no Python in the container's root"
