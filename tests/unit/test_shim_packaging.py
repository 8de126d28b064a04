"""How the shim ships: a directory to bind-mount (`vdevctl shim --path`) that a bare interpreter can import,
a wheel with no dependencies, and the API coverage table generated from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tools import coverage
from tools.vdevctl import SHIM_PATH

BARE_PYTHON = "/usr/bin/python3"


def shim_path() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tools.vdevctl", "shim", "--path"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return out.stdout.splitlines()[-1]


def test_shim_path_is_the_directory_holding_acl_and_its_client():
    path = Path(shim_path())
    assert str(path) == SHIM_PATH
    assert (path / "acl" / "__init__.py").exists() and (path / "flexnpu_client" / "client.py").exists()


@pytest.mark.skipif(not Path(BARE_PYTHON).exists(), reason=f"no {BARE_PYTHON}")
def test_import_acl_in_an_isolated_interpreter_prints_nothing():
    # What the project's stop hook runs: no environment, no site packages of ours, nothing printed.
    result = subprocess.run(
        [BARE_PYTHON, "-I", "-c", f"import sys; sys.path.insert(0, {shim_path()!r}); import acl"],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_api_coverage_table_is_current():
    table = (ROOT / "docs" / "api-coverage.md").read_text()
    assert table == coverage.table(SHIM_PATH), "docs/api-coverage.md is stale: vdevctl shim --coverage > it"


def test_wheel_holds_the_shim_and_its_client_and_depends_on_nothing(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(SHIM_PATH, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("flexnpu_acl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.startswith("flexnpu_acl-")} == {"acl", "flexnpu_client"}
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist") and "extra ==" not in line] == []
    if Path(BARE_PYTHON).exists():  # installed (a wheel is unpacked as is), it imports in a bare interpreter
        zipfile.ZipFile(wheel).extractall(tmp_path / "site")
        code = f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); import acl; print(acl.__file__)"
        result = subprocess.run([BARE_PYTHON, "-I", "-c", code], capture_output=True, text=True, cwd="/", check=True)
        assert result.stdout.startswith(str(tmp_path / "site"))
