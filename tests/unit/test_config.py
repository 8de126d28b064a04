"""Configuration (interposer/config.py) and `vdevfsd mount --config`: every mistake is refused with one message that
names the key and the value, before anything is mounted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from interposer import config
from interposer.config import ConfigError
from scheduler.clock import VirtualClock
from scheduler.flex import Flex
from scheduler.policy import Fifo
from scheduler.runner import SyncRunner
from scheduler.static import Static
from scheduler.stream import Phase

GiB = 1 << 30
MiB = 1 << 20
VDEVFSD = Path(sys.executable).with_name("vdevfsd")

VALID = """\
[daemon]
time_scale = 0
policy = "fifo"

[[physical]]
name = "npu0"
chip = "910B2"
mode = "numeric"

[[physical]]
name = "npu1"
backend = "emulated"
chip = "910B4"
mode = "timing"

[[virtual]]
name = "davinci0"
physical = "npu0"
memory = "8GiB"
role = "prefill"
owner = "0:0"
mode = "0640"

[[virtual]]
name = "davinci1"
physical = "npu0"
memory = 1024

[[virtual]]
name = "davinci2"
physical = "npu1"
memory = "1.5GB"
role = "decode"
owner = "1000:1001"

[[virtual]]
name = "davinci7"
physical = "npu1"
role = "any"
"""


LAST = 'role = "any"'  # the file's last line: tables added after it


def edited(old: str, new: str) -> str:
    assert VALID.count(old) == 1, f"{old!r} must name one line of VALID"
    return VALID.replace(old, new)


def write(tmp_path: Path, text: str, name: str = "flexnpu.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the built-in default --------------------------------------------------------------------------------


def test_default_config_is_two_910b2_split_in_two():
    cfg = config.default_config()
    assert [(p.name, p.chip, p.mode, p.backend) for p in cfg.physical] == [
        ("npu0", "910B2", "numeric", "emulated"),
        ("npu1", "910B2", "numeric", "emulated"),
    ]
    assert [(v.name, v.physical) for v in cfg.virtual] == [
        ("davinci0", "npu0"),
        ("davinci1", "npu0"),
        ("davinci2", "npu1"),
        ("davinci3", "npu1"),
    ]
    assert cfg.policy == "fifo"
    assert cfg.time_scale == 1.0


def test_default_topology_quotas_are_half_a_chip_each():
    topology = config.build(config.load(None), driver="sync")
    assert [v.name for v in topology.virtual] == ["davinci0", "davinci1", "davinci2", "davinci3"]
    assert [v.physical.name for v in topology.virtual] == ["npu0", "npu0", "npu1", "npu1"]
    assert [v.quota for v in topology.virtual] == [64 * GiB // 2] * 4
    assert [v.role for v in topology.virtual] == [Phase.UNKNOWN] * 4
    assert [v.mode for v in topology.virtual] == [0o666] * 4
    assert {p.npu.profile.name for p in topology.physical} == {"910B2"}
    assert topology.virtual[0].physical is topology.virtual[1].physical
    assert topology.virtual[1].physical is not topology.virtual[2].physical


# -- a full valid file -----------------------------------------------------------------------------------


def test_full_valid_file(tmp_path):
    path = write(tmp_path, VALID)
    cfg = config.load(path)
    assert cfg.source == str(path)
    assert cfg.time_scale == 0.0
    assert cfg.policy == "fifo"
    assert [(p.name, p.chip, p.mode) for p in cfg.physical] == [
        ("npu0", "910B2", "numeric"),
        ("npu1", "910B4", "timing"),
    ]
    v0, v1, v2, v7 = cfg.virtual
    assert (v0.name, v0.physical, v0.memory, v0.role, v0.uid, v0.gid, v0.mode) == (
        "davinci0",
        "npu0",
        8 * GiB,
        Phase.PREFILL,
        0,
        0,
        0o640,
    )
    assert (v1.memory, v1.role, v1.mode, v1.uid, v1.gid) == (1024, Phase.UNKNOWN, 0o666, 0, 0)
    assert (v2.memory, v2.role, v2.uid, v2.gid) == (1_500_000_000, Phase.DECODE, 1000, 1001)
    assert (v7.name, v7.memory, v7.role) == ("davinci7", None, Phase.UNKNOWN)


def test_full_valid_file_builds_its_topology(tmp_path):
    topology = config.build(config.load(write(tmp_path, VALID)), driver="sync")
    quotas = {v.name: v.quota for v in topology.virtual}
    # davinci7 has no memory key: the even share of npu1 (910B4, 32 GiB) between its two virtual NPUs
    assert quotas == {"davinci0": 8 * GiB, "davinci1": 1024, "davinci2": 1_500_000_000, "davinci7": 16 * GiB}
    chips = {p.name: (p.npu.profile.name, p.npu.mode) for p in topology.physical}
    assert chips == {"npu0": ("910B2", "numeric"), "npu1": ("910B4", "timing")}
    assert topology.time_scale == 0.0
    runner = topology.physical[0].runner
    assert isinstance(runner, SyncRunner)
    assert isinstance(runner.clock, VirtualClock)  # time_scale 0: no clock


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ('"8GiB"', 8 * GiB),
        ("1024", 1024),
        ('"1.5GB"', 1_500_000_000),
        ('"512MiB"', 512 * MiB),
        ('"4KB"', 4000),
        ('"3kib"', 3072),
        ('" 2 GiB "', 2 * GiB),
        ('"100"', 100),
        ('"100B"', 100),
        ('"0.5GiB"', GiB // 2),
    ],
)
def test_sizes(tmp_path, text, size):
    cfg = config.load(write(tmp_path, edited('memory = "8GiB"', f"memory = {text}")))
    assert cfg.virtual[0].memory == size


@pytest.mark.parametrize(("text", "mode"), [('"0640"', 0o640), ('"640"', 0o640), ('"0600"', 0o600), ("0o660", 0o660)])
def test_modes(tmp_path, text, mode):
    cfg = config.load(write(tmp_path, edited('mode = "0640"', f"mode = {text}")))
    assert cfg.virtual[0].mode == mode


def test_buffer_limits_default_and_configured(tmp_path):
    default = config.load(write(tmp_path, VALID))
    assert (default.session_buffer, default.daemon_buffer) == (160 * MiB, 512 * MiB)
    both = config.load(write(tmp_path, edited("time_scale = 0", 'time_scale = 0\nsession_buffer = "64MiB"')))
    assert (both.session_buffer, both.daemon_buffer) == (64 * MiB, 512 * MiB)
    big = config.load(write(tmp_path, edited("time_scale = 0", 'time_scale = 0\nsession_buffer = "1GiB"')))
    assert big.daemon_buffer == GiB  # the daemon-wide limit is never below one session's


def test_quota_of_a_whole_chip_is_allowed(tmp_path):
    cfg = config.load(write(tmp_path, edited('memory = "8GiB"', 'memory = "64GiB"')))
    assert cfg.virtual[0].memory == 64 * GiB


def test_each_physical_npu_runs_the_daemon_policy_unless_it_names_its_own(tmp_path):
    text = edited('backend = "emulated"', 'backend = "emulated"\npolicy = "flex"')
    text = text.replace(LAST, f"{LAST}\n\n[policy.flex]\ntpot_target_ms = 40\ntpot_isolated_pct = 5\nlinger_ms = 5\n")
    cfg = config.load(write(tmp_path, text))
    assert [p.policy for p in cfg.physical] == ["fifo", "flex"]
    assert cfg.policy_options == {"flex": {"tpot_target_ms": 40, "tpot_isolated_pct": 5, "linger_ms": 5}}
    topology = config.build(cfg, driver="sync")
    npu0, npu1 = topology.physical
    assert (npu0.policy, type(npu0.runner.engine.policy)) == ("fifo", Fifo)
    assert (npu1.policy, type(npu1.runner.engine.policy)) == ("flex", Flex)
    flex = npu1.runner.engine.policy
    assert (flex.target, flex.isolated_pct, flex.linger) == (0.04, 5, 0.005)
    assert topology.policy_options == cfg.policy_options  # a switch at run time makes its policy with them too


def test_options_of_the_daemon_policy_apply_to_every_npu_that_runs_it(tmp_path):
    text = edited('policy = "fifo"', 'policy = "static"').replace(
        LAST, f"{LAST}\n[policy.static]\nprefill_cores = 16\n"
    )
    topology = config.build(config.load(write(tmp_path, text)), driver="sync")
    policies = [p.runner.engine.policy for p in topology.physical]
    assert [(type(p), p.prefill_cores) for p in policies] == [(Static, 16), (Static, 16)]
    assert [p.policy for p in topology.physical] == ["static", "static"]


def test_a_policy_with_no_options_table_gets_its_defaults(tmp_path):
    text = edited('backend = "emulated"', 'backend = "emulated"\npolicy = "static"')
    topology = config.build(config.load(write(tmp_path, text)), driver="sync")
    assert topology.physical[1].runner.engine.policy.prefill_cores is None  # half the chip
    assert topology.policy_options == {}


# -- each mistake names its key and its value ------------------------------------------------------------


BAD = [
    # (id, old line, new text, key, value as it must appear in the message)
    ("unknown-top-level-key", "[daemon]", "[deamon]", "deamon", "policy"),
    ("unknown-daemon-key", "[daemon]", "[daemon]\nspeed = 2", "daemon.speed", "2"),
    ("unknown-physical-key", 'mode = "numeric"', 'mode = "numeric"\ncolour = "red"', "physical[0].colour", "red"),
    ("unknown-virtual-key", "memory = 1024", "memory = 1024\nquota = 5", "virtual[1].quota", "5"),
    ("unknown-chip", 'chip = "910B2"', 'chip = "910A"', "physical[0].chip", "910A"),
    ("unknown-npu-mode", 'mode = "numeric"', 'mode = "exact"', "physical[0].mode", "exact"),
    ("unknown-backend", 'backend = "emulated"', 'backend = "ascend"', "physical[1].backend", "ascend"),
    ("module-of-emulated", 'backend = "emulated"', 'backend = "emulated"\nmodule = "acl"', "physical[1].module", "acl"),
    ("timing-pyacl", 'backend = "emulated"', 'backend = "pyacl"', "physical[1].mode", "timing"),
    ("duplicate-physical", 'name = "npu1"', 'name = "npu0"', "physical[1].name", "npu0"),
    ("duplicate-virtual", 'name = "davinci1"', 'name = "davinci0"', "virtual[1].name", "davinci0"),
    ("name-not-davinci", 'name = "davinci1"', 'name = "gpu1"', "virtual[1].name", "gpu1"),
    ("name-without-number", 'name = "davinci1"', 'name = "davinci"', "virtual[1].name", "davinci"),
    ("name-with-suffix", 'name = "davinci1"', 'name = "davinci1a"', "virtual[1].name", "davinci1a"),
    ("name-not-a-string", 'name = "davinci1"', "name = 1", "virtual[1].name", "1"),
    ("unknown-physical", 'physical = "npu1"\nmemory', 'physical = "npu9"\nmemory', "virtual[2].physical", "npu9"),
    ("size-bad-unit", 'memory = "8GiB"', 'memory = "8 GiBs"', "virtual[0].memory", "8 GiBs"),
    ("size-words", 'memory = "8GiB"', 'memory = "lots"', "virtual[0].memory", "lots"),
    ("size-zero", 'memory = "8GiB"', "memory = 0", "virtual[0].memory", "0"),
    ("size-negative", 'memory = "8GiB"', "memory = -5", "virtual[0].memory", "-5"),
    ("size-exponent", 'memory = "8GiB"', 'memory = "1e9"', "virtual[0].memory", "1e9"),
    ("size-float", 'memory = "8GiB"', "memory = 1.5", "virtual[0].memory", "1.5"),
    ("size-bool", 'memory = "8GiB"', "memory = true", "virtual[0].memory", "True"),
    ("size-empty", 'memory = "8GiB"', 'memory = ""', "virtual[0].memory", "''"),
    ("size-under-a-byte", 'memory = "8GiB"', 'memory = "0.5"', "virtual[0].memory", "0.5"),
    ("quota-above-910B2", 'memory = "8GiB"', 'memory = "65GiB"', "virtual[0].memory", ("65GiB", str(65 * GiB))),
    ("quota-above-910B4", 'memory = "1.5GB"', 'memory = "33GiB"', "virtual[2].memory", ("33GiB", str(33 * GiB))),
    ("mode-not-octal", 'mode = "0640"', 'mode = "0999"', "virtual[0].mode", "0999"),
    ("mode-symbolic", 'mode = "0640"', 'mode = "rw-r-----"', "virtual[0].mode", "rw-r-----"),
    ("mode-too-big", 'mode = "0640"', 'mode = "01777"', "virtual[0].mode", "01777"),
    ("mode-bool", 'mode = "0640"', "mode = true", "virtual[0].mode", "True"),
    ("mode-float", 'mode = "0640"', "mode = 1.5", "virtual[0].mode", "1.5"),
    ("role-unknown", 'role = "prefill"', 'role = "train"', "virtual[0].role", "train"),
    ("owner-no-colon", 'owner = "0:0"', 'owner = "root"', "virtual[0].owner", "root"),
    ("owner-unknown-user", 'owner = "0:0"', 'owner = "no-such-user-flexnpu:0"', "virtual[0].owner", "no-such-user"),
    ("owner-not-a-string", 'owner = "0:0"', "owner = 0", "virtual[0].owner", "0"),
    ("time-scale-negative", "time_scale = 0", "time_scale = -1", "daemon.time_scale", "-1"),
    ("time-scale-string", "time_scale = 0", 'time_scale = "fast"', "daemon.time_scale", "fast"),
    ("time-scale-bool", "time_scale = 0", "time_scale = true", "daemon.time_scale", "True"),
    ("time-scale-nan", "time_scale = 0", "time_scale = nan", "daemon.time_scale", "nan"),
    ("time-scale-inf", "time_scale = 0", "time_scale = inf", "daemon.time_scale", "inf"),
    ("policy-unknown", 'policy = "fifo"', 'policy = "rr"', "daemon.policy", "rr"),
    (
        "physical-policy-unknown",
        'backend = "emulated"',
        'backend = "emulated"\npolicy = "rr"',
        "physical[1].policy",
        "rr",
    ),
    ("physical-policy-number", 'backend = "emulated"', 'backend = "emulated"\npolicy = 1', "physical[1].policy", "1"),
    ("policy-not-tables", "[daemon]", 'policy = "flex"\n[daemon]', "policy", "flex"),
    ("policy-unknown-table", LAST, f"{LAST}\n[policy.rr]\nquantum = 1", "policy.rr", "quantum"),
    ("policy-table-not-a-table", LAST, f"{LAST}\n[policy]\nflex = 50", "policy.flex", "50"),
    ("policy-unknown-option", LAST, f"{LAST}\n[policy.flex]\ntpot = 50", "policy.flex.tpot", "50"),
    ("policy-fifo-option", LAST, f"{LAST}\n[policy.fifo]\nquantum = 1", "policy.fifo.quantum", "1"),
    (
        "option-cores-float",
        LAST,
        f"{LAST}\n[policy.static]\nprefill_cores = 12.5",
        "policy.static.prefill_cores",
        "12.5",
    ),
    (
        "option-cores-string",
        LAST,
        f'{LAST}\n[policy.static]\nprefill_cores = "12"',
        "policy.static.prefill_cores",
        "'12'",
    ),
    ("option-cores-zero", LAST, f"{LAST}\n[policy.static]\nprefill_cores = 0", "policy.static.prefill_cores", "0"),
    ("option-ms-string", LAST, f'{LAST}\n[policy.flex]\ntpot_target_ms = "fast"', "policy.flex.tpot_target_ms", "fast"),
    ("option-ms-bool", LAST, f"{LAST}\n[policy.flex]\nlinger_ms = true", "policy.flex.linger_ms", "True"),
    ("option-ms-nan", LAST, f"{LAST}\n[policy.flex]\ngap_ms = nan", "policy.flex.gap_ms", "nan"),
    ("option-ms-zero", LAST, f"{LAST}\n[policy.flex]\ntpot_target_ms = 0", "policy.flex.tpot_target_ms", "0"),
    ("buffer-not-a-size", "time_scale = 0", 'time_scale = 0\nsession_buffer = "lots"', "daemon.session_buffer", "lots"),
    (
        "daemon-buffer-below-session",
        "time_scale = 0",
        'time_scale = 0\nsession_buffer = "256MiB"\ndaemon_buffer = "64MiB"',
        "daemon.daemon_buffer",
        "64MiB",
    ),
    ("daemon-not-a-table", '[daemon]\ntime_scale = 0\npolicy = "fifo"', "daemon = 1", "daemon", "1"),
]


@pytest.mark.parametrize(("old", "new", "key", "value"), [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_mistake_names_key_and_value(tmp_path, old, new, key, value):
    path = write(tmp_path, edited(old, new))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"{key} = " in message, message
    shown = message.split(f"{key} = ", 1)[1]
    values = value if isinstance(value, tuple) else (value,)
    assert any(v in shown for v in values), message


@pytest.mark.parametrize(
    ("new", "why"),
    [
        ('backend = "emulated"\npolicy = "rr"', "must be one of fifo, static, flex"),
        (f"{LAST}\n[policy.rr]\nquantum = 1", "no such policy (have fifo, static, flex)"),
        (
            f"{LAST}\n[policy.flex]\ntpot = 50",
            "flex has no such option (its options: tpot_target_ms, tpot_isolated_pct, linger_ms, gap_ms)",
        ),
        (f"{LAST}\n[policy.fifo]\nquantum = 1", "fifo has no such option (its options: none)"),
        (f"{LAST}\n[policy.static]\nprefill_cores = 12.5", "must be an integer"),
        (f"{LAST}\n[policy.flex]\ngap_ms = nan", "must be a number"),
        (f"{LAST}\n[policy.static]\nprefill_cores = 0", "prefill_cores must be at least 1, got 0"),
    ],
    ids=["policy", "policy-table", "option", "fifo-option", "integer", "number", "range"],
)
def test_policy_mistakes_say_what_is_valid(tmp_path, new, why):
    old = LAST if new.startswith(LAST) else 'backend = "emulated"'
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, edited(old, new)))
    assert str(info.value).endswith(why), info.value


def test_options_that_leave_an_npus_chip_short_name_where_its_policy_was_chosen(tmp_path):
    too_big = f"{LAST}\n[policy.static]\nprefill_cores = 22\n"  # npu0 (910B2) has 24 AI cores, npu1 (910B4) 20
    named = edited('backend = "emulated"', 'backend = "emulated"\npolicy = "static"').replace(LAST, too_big)
    by_default = edited('policy = "fifo"', 'policy = "static"').replace(LAST, too_big)
    why = r"on npu1: static policy: prefill_cores 22 leaves decode no core of the 20 on 910B4 \(use 1-19\)"
    with pytest.raises(ConfigError, match=rf"^config: physical\[1\]\.policy = 'static': {why}$"):
        config.load(write(tmp_path, named))
    with pytest.raises(ConfigError, match=rf"^config: daemon\.policy = 'static': {why}$"):
        config.load(write(tmp_path, by_default))
    # Options for a policy no NPU runs yet are checked against the chip when an NPU is switched to it.
    assert config.load(write(tmp_path, VALID.replace(LAST, too_big))).policy_options == {
        "static": {"prefill_cores": 22}
    }


def test_missing_physical_and_virtual_sections():
    with pytest.raises(ConfigError, match=r"physical = \[\]: at least one \[\[physical\]\] NPU is needed"):
        config.parse({"daemon": {"policy": "fifo"}})
    with pytest.raises(ConfigError, match=r"virtual = \[\]: at least one \[\[virtual\]\] NPU is needed"):
        config.parse({"physical": [{"name": "npu0"}]})


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, VALID + "\n[daemon\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"config: file = {str(path)!r}: not valid TOML")
    assert "line" in message


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="No such file or directory") as info:
        config.load(path)
    assert str(path) in str(info.value)


# -- vdevfsd mount --config ------------------------------------------------------------------------------


def run_vdevfsd(tmp_path: Path, config_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    mountpoint = tmp_path / "mnt"
    argv = [str(VDEVFSD), "mount", str(mountpoint), "--config", str(config_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=60)  # a safety net only: a refused config exits at once
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        pytest.fail("vdevfsd accepted the bad configuration and mounted")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), mountpoint


CLI_BAD = [
    ("policy", 'policy = "fifo"', 'policy = "rr"', ("daemon.policy", "'rr'")),
    (
        "policy-option",
        LAST,
        f"{LAST}\n[policy.flex]\ntpot = 50",
        ("policy.flex.tpot", "tpot_target_ms, tpot_isolated_pct, linger_ms"),
    ),
    ("quota", 'memory = "8GiB"', 'memory = "65GiB"', ("virtual[0].memory",)),
    ("name", 'name = "davinci1"', 'name = "gpu1"', ("virtual[1].name", "'gpu1'")),
    ("unknown-key", "[daemon]", "[daemon]\nspeed = 2", ("daemon.speed", "2")),
    ("invalid-toml", "[daemon]", "[daemon", ("file", "not valid TOML")),
    ("daemon-not-a-table", '[daemon]\ntime_scale = 0\npolicy = "fifo"', "daemon = 1", ("daemon", "1")),
]


@pytest.mark.skipif(not VDEVFSD.exists(), reason="vdevfsd is not installed next to this interpreter")
@pytest.mark.parametrize(("old", "new", "needles"), [pytest.param(*c[1:], id=c[0]) for c in CLI_BAD])
def test_vdevfsd_refuses_a_bad_config_in_one_line_and_mounts_nothing(tmp_path, old, new, needles):
    path = write(tmp_path, edited(old, new), "bad.toml")
    result, mountpoint = run_vdevfsd(tmp_path, path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vdevfsd: config: ")
    for needle in needles:
        assert needle in lines[0]
    assert not mountpoint.exists()
    assert not os.path.ismount(mountpoint)


@pytest.mark.skipif(not VDEVFSD.exists(), reason="vdevfsd is not installed next to this interpreter")
def test_vdevfsd_names_a_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    result, mountpoint = run_vdevfsd(tmp_path, missing)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0]
    assert "No such file" in lines[0]
    assert not mountpoint.exists()
