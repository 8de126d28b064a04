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
    tenants = result["tenants"]  # one tenant against another's client: each attack refused, nothing left
    assert tenants["left"] == result["left"]
    assert tenants["graphs"]["refused"] == 507002 and tenants["objects"]["stream_refused"] == 207008
    assert tenants["sessions"]["refused"] == "EUSERS" and tenants["queued_copies"]["refused"] == 207012
    assert all(tenants[name]["bystander"]["errors"] == 0 for name in bench_chaos.TENANT_ATTACKS)
    assert "wrong results" in bench_chaos.render(result)
