"""`vdevctl bench chaos` in miniature: a few seconds of it, to keep the benchmark itself working."""

from __future__ import annotations

from tests.conftest import requires_mount
from tools import bench_chaos

pytestmark = requires_mount


def test_a_short_chaos_run_finds_nothing_wrong_and_leaves_nothing_behind():
    result = bench_chaos.run(seconds=3, workers=2)
    assert result["rounds"] > 0 and result["wrong"] == 0
    assert not result["errors"] and not result["vandal_unexpected"] and not result["unexpected_exits"]
    assert result["stale_mount_recovered"]
    assert result["left"] == {"sessions": 0, "memory_bytes": 0, "buffer_bytes": 0}
    assert result["abuse"]["left"] == result["left"]
    assert "wrong results" in bench_chaos.render(result)
