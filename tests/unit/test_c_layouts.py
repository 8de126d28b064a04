"""The C client's generated headers against the construct definitions (interposer/wire.py) and npu/errors.py, which
stay the one source of truth; and the public headers against the library: every declared call is exported, and
the headers compile as C and as C++."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from interposer import wire
from interposer.shim_env import C_INCLUDE_PATH
from npu.errors import AclError
from tools import c_layouts

ROOT = c_layouts.ROOT
needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")


@pytest.mark.parametrize("path", list(c_layouts.TARGETS), ids=lambda p: p.name)
def test_checked_in_headers_are_generated_from_the_current_definitions(path):
    assert path.read_text() == c_layouts.TARGETS[path](), (
        f"{path.relative_to(ROOT)} is stale: run `python -m tools.c_layouts`"
    )


def test_every_command_has_its_op_cmd_and_flags():
    text = c_layouts.render_layouts()
    for c in wire.COMMANDS.values():
        name = c.op.name
        assert f"#define FNPU_CMD_{name} 0x{c.cmd:08x}u" in text
        assert f"#define FNPU_SYNC_{name} {int(c.sync)}" in text
        assert f"#define FNPU_BULK_{name} {int(c.bulk)}" in text


def test_error_codes_carry_cann_names():
    text = c_layouts.render_error_codes()
    assert "#define ACL_SUCCESS 0\n" in text
    assert "#define ACL_ERROR_RT_SOCKET_CLOSE 507901\n" in text
    assert len(re.findall(r"^#define ACL_", text, re.M)) == len(AclError)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


@needs_gcc
def test_struct_layouts_compile_with_their_wire_sizes(tmp_path):
    """The generated _Static_asserts hold: each packed struct is exactly its construct layout's size."""
    source = tmp_path / "layouts.c"
    source.write_text('#include "wire_layouts.h"\nint main(void) { return 0; }\n')
    result = _run(["gcc", "-std=c11", "-Wall", "-Werror", f"-I{ROOT / 'clib'}", str(source), "-o", str(tmp_path / "a")])
    assert result.returncode == 0, result.stderr


@needs_gcc
@pytest.mark.parametrize("compiler", ["gcc", "g++"])
def test_public_headers_compile_as_c_and_cpp(tmp_path, compiler):
    if not shutil.which(compiler):
        pytest.skip(f"needs {compiler}")
    source = tmp_path / ("prog.c" if compiler == "gcc" else "prog.cpp")
    source.write_text("#include <acl/acl.h>\nint main(void) { return aclrtSetDevice(0) == ACL_SUCCESS ? 0 : 1; }\n")
    result = _run([compiler, "-Wall", "-Werror", "-fsyntax-only", f"-I{C_INCLUDE_PATH}", str(source)])
    assert result.returncode == 0, result.stderr


@needs_gcc
def test_every_declared_call_is_exported_by_the_library(tmp_path):
    """A program written against the headers links: nothing declared is missing from libascendcl.so."""
    build = tmp_path / "build"
    result = _run(["make", "-C", str(ROOT / "clib"), f"BUILD={build}", str(build / "libascendcl.so")])
    assert result.returncode == 0, result.stderr
    declared = set()
    for header in (ROOT / "include" / "acl").glob("*.h"):
        text = " ".join(header.read_text().split())
        declared |= set(re.findall(r"ACL_FUNC_VISIBILITY [^;(]*?\b(acl\w+)\(", text))
    exported = set(_run(["nm", "-D", "--defined-only", str(build / "libascendcl.so")]).stdout.split())
    assert len(declared) > 90
    assert declared - exported == set()
    assert {name for name in exported if name.startswith("fnpu")} == set(), "internals stay hidden"
