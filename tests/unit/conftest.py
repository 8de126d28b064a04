"""Fixtures of the unit tests."""

from __future__ import annotations

import os
import sys

import pytest

from tools.vdevctl import SHIM_PATH


@pytest.fixture(scope="module")
def direct_acl():
    """The `acl` module an interposed program imports, here in direct mode (no daemon: the built-in emulated NPUs
    in this process). The environment is restored after the module's tests, so subprocesses never inherit it."""
    saved = os.environ.get("FLEXNPU_DIRECT")
    os.environ["FLEXNPU_DIRECT"] = "1"
    sys.path.insert(0, SHIM_PATH)
    try:
        import acl
        from flexnpu_client.runtime import RUNTIME

        assert RUNTIME.direct, "acl was imported before FLEXNPU_DIRECT was set"
        yield acl
    finally:
        sys.path.remove(SHIM_PATH)
        if saved is None:
            os.environ.pop("FLEXNPU_DIRECT", None)
        else:
            os.environ["FLEXNPU_DIRECT"] = saved


@pytest.fixture
def direct_runtime(tmp_path):
    """Make a direct-mode Runtime over a config (TOML text) with device 0 set; reset after the test."""
    from interposer.shim.flexnpu_client.runtime import Runtime

    made = []

    def make(config: str) -> Runtime:
        path = tmp_path / f"config{len(made)}.toml"
        path.write_text(config)
        runtime = Runtime(direct=True, devices=["davinci0"], config=str(path))
        runtime.set_device(0)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.reset_device(0, force=True)
