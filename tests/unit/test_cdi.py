"""The CDI spec of `vdevctl cdi generate`, from a made-up daemon status: its shape, the CDI rules it must keep,
and that any set of its devices composes in one container."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from interposer.shim_env import SHIM_PATH
from tools import cdi

MOUNT = Path("/run/flexnpu")
# Gaps in the numbering, as after `vdevctl vnpu destroy`.
STATUS = {"virtual": [{"name": name, "physical": "npu0"} for name in ("davinci0", "davinci2", "davinci5")]}
COMPANIONS = ("davinci_manager", "devmm_svm", "hisi_hdc")

# The CDI rules a spec of version 0.3.0 must keep (SPEC.md of github.com/cncf-tags/container-device-interface at
# tag v0.3.0; names as its parser checks them, pkg/parser/parser.go).
DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
KIND = re.compile(rf"{DNS_LABEL}(\.{DNS_LABEL})*/[A-Za-z]([A-Za-z0-9_-]{{0,61}}[A-Za-z0-9])?")  # no dots: 0.6.0
DEVICE_NAME = re.compile(r"[A-Za-z]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")  # a leading digit needs 0.5.0
FIELDS = {  # each object's fields in 0.3.0; a runtime fails to load a spec with an unknown one
    "spec": {"cdiVersion", "kind", "devices", "containerEdits"},
    "device": {"name", "containerEdits"},
    "edits": {"env", "deviceNodes", "mounts", "hooks"},
    "mount": {"hostPath", "containerPath", "options"},  # `type` needs 0.4.0
}


def cdi_violations(spec: dict) -> list[str]:
    """What in `spec` breaks a CDI rule this test can check."""
    bad = []

    def edits(where: str, e: dict, device: bool) -> None:
        if set(e) - FIELDS["edits"]:
            bad.append(f"{where}: unknown fields {set(e) - FIELDS['edits']}")
        if device and not any(e.get(key) for key in FIELDS["edits"]):
            bad.append(f"{where}: a device's edits must not be empty")
        bad.extend(f"{where}: env {v!r} is not NAME=VALUE" for v in e.get("env", []) if v.find("=") <= 0)
        for m in e.get("mounts", []):
            if set(m) - FIELDS["mount"] or not {"hostPath", "containerPath"} <= set(m):
                bad.append(f"{where}: mount fields {sorted(m)}")
            bad.extend(f"{where}: {p} is not absolute" for p in (m["hostPath"], m["containerPath"]) if p[0] != "/")

    if set(spec) - FIELDS["spec"] or not {"cdiVersion", "kind", "devices"} <= set(spec):
        bad.append(f"spec fields {sorted(spec)}")
    if spec["cdiVersion"] != "0.3.0":
        bad.append(f"cdiVersion {spec['cdiVersion']}: these checks are of 0.3.0")
    if not KIND.fullmatch(spec["kind"]):
        bad.append(f"kind {spec['kind']!r}")
    if not spec["devices"]:
        bad.append("no devices: a spec needs at least one")
    names = [d["name"] for d in spec["devices"]]
    if len(set(names)) != len(names):
        bad.append(f"device names repeat: {names}")
    for d in spec["devices"]:
        if set(d) != FIELDS["device"]:
            bad.append(f"device fields {sorted(d)}")
        if not DEVICE_NAME.fullmatch(d["name"]):
            bad.append(f"device name {d['name']!r}")
        edits(f"device {d['name']}", d["containerEdits"], device=True)
    edits("spec", spec.get("containerEdits", {}), device=False)
    return bad


def test_the_spec_keeps_the_cdi_rules():
    assert cdi_violations(cdi.spec(STATUS, MOUNT)) == []


@pytest.mark.parametrize(
    ("spec", "broken"),
    [
        ({"cdiVersion": "0.3.0", "kind": "flexnpu.io/npu.v2", "devices": [{"name": "a", "containerEdits": {}}]}, 2),
        ({"cdiVersion": "0.3.0", "kind": "npu", "devices": []}, 2),
        (
            {
                "cdiVersion": "0.3.0",
                "kind": "a.io/b",
                "devices": [
                    {
                        "name": "0x",
                        "containerEdits": {
                            "env": ["=1"],
                            "mounts": [{"hostPath": "r", "containerPath": "/c", "type": "none"}],
                        },
                    }
                ],
            },
            4,
        ),
    ],
    ids=["dotted-class-and-empty-edits", "no-prefix-no-devices", "digit-env-relative-type"],
)
def test_the_rule_checks_catch_what_they_check(spec, broken):
    assert len(cdi_violations(spec)) == broken, cdi_violations(spec)


def test_one_device_per_virtual_npu_and_all():
    spec = cdi.spec(STATUS, MOUNT)
    assert (spec["cdiVersion"], spec["kind"]) == ("0.3.0", "flexnpu.io/npu")
    assert [d["name"] for d in spec["devices"]] == ["davinci0", "davinci2", "davinci5", "all"]
    node = {"options": ["bind", "nosuid", "nodev", "noexec"]}
    devices = {d["name"]: d["containerEdits"] for d in spec["devices"]}
    assert devices["davinci2"] == {
        "mounts": [{"hostPath": "/run/flexnpu/davinci2", "containerPath": "/dev/davinci2"} | node]
    }
    assert [m["containerPath"] for m in devices["all"]["mounts"]] == ["/dev/davinci0", "/dev/davinci2", "/dev/davinci5"]


def test_what_every_container_needs_is_at_spec_level_once():
    edits = cdi.spec(STATUS, MOUNT)["containerEdits"]
    assert edits["env"] == ["PYTHONPATH=/opt/flexnpu-shim"]
    binds = {m["containerPath"]: (m["hostPath"], m["options"]) for m in edits["mounts"]}
    assert binds == {
        **{f"/dev/{n}": (f"/run/flexnpu/{n}", ["bind", "nosuid", "nodev", "noexec"]) for n in COMPANIONS},
        "/opt/flexnpu-shim": (SHIM_PATH, ["bind", "ro", "nosuid", "nodev"]),
    }


def binds_of(spec: dict, requested: tuple[str, ...]) -> dict[str, set[str]]:
    """Each containerPath of a container given `requested`, with the host paths bound there."""
    devices = {d["name"]: d["containerEdits"] for d in spec["devices"]}
    binds: dict[str, set[str]] = {}
    for edits in (spec["containerEdits"], *(devices[name] for name in requested)):
        for m in edits["mounts"]:
            binds.setdefault(m["containerPath"], set()).add(m["hostPath"])
    return binds


def test_any_set_of_devices_composes_without_two_sources_on_one_path():
    spec = cdi.spec(STATUS, MOUNT)
    names = [d["name"] for d in spec["devices"]]
    for n in range(1, len(names) + 1):
        for requested in itertools.combinations(names, n):
            clashes = {path: hosts for path, hosts in binds_of(spec, requested).items() if len(hosts) > 1}
            assert clashes == {}, requested
    # and the device edits carry no env, where a later device's would replace an earlier one's
    assert all("env" not in d["containerEdits"] for d in spec["devices"])


def test_container_edits_for_the_device_plugin_keep_the_order_given():
    edits = cdi.container_edits(STATUS, ["davinci5", "davinci0"], MOUNT)
    assert edits["env"] == ["PYTHONPATH=/opt/flexnpu-shim"]
    assert [m["containerPath"] for m in edits["mounts"]] == [
        "/dev/davinci5",
        "/dev/davinci0",
        *(f"/dev/{n}" for n in COMPANIONS),
        "/opt/flexnpu-shim",
    ]


def test_a_relative_mount_point_becomes_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    edits = cdi.container_edits(STATUS, ["davinci2"], Path("mnt"))
    assert edits["mounts"][0]["hostPath"] == str(tmp_path / "mnt" / "davinci2")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["davinci2", "davinci3"],
            r"davinci3: no such virtual NPU \(have davinci0, davinci2, davinci5; see vdevctl ls\)",
        ),
        (["all"], r"all: no such virtual NPU \(have davinci0, davinci2, davinci5"),
        (["davinci2", "davinci2"], r"davinci2: given twice"),
    ],
)
def test_container_edits_name_what_is_wrong(names, message):
    with pytest.raises(ValueError, match=message):
        cdi.container_edits(STATUS, names, MOUNT)


@pytest.fixture
def fake_mount(tmp_path) -> Path:
    """A directory with the daemon's status file, as `generate` reads it."""
    (tmp_path / "status").write_text(json.dumps(STATUS))
    return tmp_path


def generate(mount: Path, *args: str):
    return CliRunner().invoke(cdi.command, ["generate", *args], obj=mount)


def test_generate_prints_the_spec_as_json(fake_mount):
    result = generate(fake_mount)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == cdi.spec(STATUS, fake_mount)


def test_generate_writes_the_file_given(fake_mount, tmp_path):
    out = tmp_path / "cdi" / "flexnpu.json"
    out.parent.mkdir()
    out.write_text("stale")
    result = generate(fake_mount, "--output", str(out))
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert json.loads(out.read_text())["kind"] == "flexnpu.io/npu"
    assert [p.name for p in out.parent.iterdir()] == ["flexnpu.json"]  # replaced, no temporary file left


def test_generate_without_a_daemon_says_how_to_start_one(tmp_path):
    result = generate(tmp_path / "none", "--output", str(tmp_path / "spec.json"))
    assert result.exit_code == 1
    assert "no FlexNPU daemon" in result.output and "vdevfsd mount" in result.output
    assert not (tmp_path / "spec.json").exists()


def test_generate_refuses_a_daemon_without_virtual_npus(fake_mount):
    (fake_mount / "status").write_text(json.dumps({"virtual": []}))
    result = generate(fake_mount)
    assert result.exit_code == 1
    assert "has no virtual NPUs" in result.output


def test_the_shim_is_bound_from_where_the_host_has_it():
    """Where the command runs in a container (the device plugin's DaemonSet), its own shim path is not the host's."""
    host_shim = Path("/var/lib/flexnpu/shim")
    document = cdi.spec(STATUS, MOUNT, host_shim)
    (shim,) = [m for m in document["containerEdits"]["mounts"] if m["containerPath"] == cdi.SHIM_IN_CONTAINER]
    assert shim["hostPath"] == str(host_shim)
    assert str(SHIM_PATH) not in json.dumps(document)
