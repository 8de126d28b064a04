"""Configuration (TOML) -> topology. Every mistake names the key, the value and what would be right.

    [daemon]
    time_scale = 1.0          # wall seconds per modeled second; 0 = no clock (as fast as possible)
    policy = "fifo"           # scheduling policy of every physical NPU that names none: fifo | static | flex
    session_buffer = "160MiB" # unread replies + unfinished frames one session may leave in the daemon
    daemon_buffer = "512MiB"  # the same for all sessions together (device-memory quotas do not see these)
    metrics = "127.0.0.1:9400" # serve Prometheus metrics at http://HOST:PORT/metrics ("[::1]:9400" for IPv6,
                              # ":9400" every interface; default: none; `vdevfsd mount --metrics` overrides it)

    [[physical]]
    name = "npu0"
    backend = "emulated"      # emulated | pyacl (a real device through the vendor's pyACL)
    chip = "910B2"            # 910B2 | 910B4 | 910C (pyacl: the chip the policies plan for)
    mode = "numeric"          # numeric (real bytes and results) | timing (shapes only, no backing store)
    policy = "flex"           # this NPU's scheduling policy (default: [daemon] policy); `vdevctl policy` switches it
    # module = "acl"          # pyacl only: the vendor pyACL module to import
    # device = 0              # pyacl only: the vendor's device id

    [[virtual]]
    name = "davinci0"         # the device node's name; davinci<N>
    physical = "npu0"
    memory = "32GiB"          # quota; default: the physical NPU's memory split evenly among its virtual NPUs
    role = "any"              # any | prefill | decode
    owner = "0:0"             # uid:gid of the device node
    mode = "0666"             # permission bits of the device node
    cores = 6                 # every kernel of it runs on at most this many AI cores (default: the whole chip)

    [policy.static]           # options of a policy, wherever it runs (from the start or after a switch)
    prefill_cores = 12        # AI cores of the prefill partition (default: half the chip); decode gets the rest

    [policy.flex]
    tpot_target_ms = 40       # a decode step's device-time goal: each step's reserve is sized to meet it
    tpot_isolated_pct = 5     # and at most this much over the step alone on the whole chip (0: off)
    linger_ms = 10            # decode counts as active this long after its last kernel
    gap_ms = 0.5              # host gaps shorter than this do not end a decode step

With no file: two emulated 910B2 NPUs, each exposed as two virtual NPUs (davinci0-1 on npu0, davinci2-3 on npu1).
"""

from __future__ import annotations

import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from interposer.topology import PhysicalUnit, Topology
from npu.emulated.device import MODES, EmulatedNPU
from npu.executor import Executor
from npu.profiles import PROFILES, profile
from scheduler.clock import make_clock
from scheduler.engine import Engine
from scheduler.policies import POLICIES, make_policy, options
from scheduler.runner import Runner, SyncRunner, TrioRunner
from scheduler.stream import Phase

BACKENDS = ("emulated", "pyacl")
DEVICE_NAME = re.compile(r"davinci(0|[1-9][0-9]{0,3})")  # a device id names it: no leading zeros
ROLES = {"any": Phase.UNKNOWN, "prefill": Phase.PREFILL, "decode": Phase.DECODE}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


class ConfigError(Exception):
    def __init__(self, key: str, value: object, why: str) -> None:
        self.detail = f"{key} = {value!r}: {why}"
        super().__init__(f"config: {self.detail}")


@dataclass
class PhysicalSpec:
    name: str
    chip: str = "910B2"
    mode: str = "numeric"
    backend: str = "emulated"
    policy: str = "fifo"
    module: str = "acl"  # pyacl backend: the vendor's pyACL module
    device: int = 0  # pyacl backend: the vendor's device id


@dataclass
class VirtualSpec:
    name: str
    physical: str
    memory: int | None = None
    role: Phase = Phase.UNKNOWN
    uid: int = 0
    gid: int = 0
    mode: int = 0o666
    cores: int | None = None


@dataclass
class Config:
    physical: list[PhysicalSpec]
    virtual: list[VirtualSpec]
    time_scale: float = 1.0
    policy: str = "fifo"  # of every physical NPU that names none
    policy_options: dict[str, dict] = field(default_factory=dict)  # [policy.<name>] tables, checked
    session_buffer: int = 160 << 20  # two 64 MiB copy records (the runtime's chunk) and room to spare
    daemon_buffer: int = 512 << 20
    metrics: tuple[str, int] | None = None  # (host, port) of the Prometheus endpoint; None: not served
    source: str = field(default="built-in default")
    processes: str = "per-npu"  # "per-npu": a process serves each physical NPU (vdevfs/npus.py); "one": vdevfsd all
    watchdog_s: float = 30.0  # an NPU process that answers nothing this long is killed and restarted
    process_memory: int | None = None  # RSS over which an NPU process is killed and restarted; None: no limit


def default_config() -> Config:
    return Config(
        physical=[PhysicalSpec("npu0"), PhysicalSpec("npu1")],
        virtual=[VirtualSpec(f"davinci{i}", f"npu{i // 2}") for i in range(4)],
    )


def load(path: str | Path | None) -> Config:
    if path is None:
        return default_config()
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("file", str(path), exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", str(path), f"not valid TOML: {exc}") from None
    config = parse(raw)
    config.source = str(path)
    return config


def parse(raw: dict) -> Config:
    _only(raw, "", {"daemon", "physical", "virtual", "policy"})
    daemon = raw.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError("daemon", daemon, "must be a table ([daemon])")
    _only(
        daemon,
        "daemon.",
        {
            "time_scale",
            "policy",
            "session_buffer",
            "daemon_buffer",
            "metrics",
            "processes",
            "watchdog_s",
            "process_memory",
        },
    )
    time_scale = daemon.get("time_scale", 1.0)
    if (
        not isinstance(time_scale, int | float)
        or isinstance(time_scale, bool)
        or not math.isfinite(time_scale)
        or time_scale < 0
    ):
        raise ConfigError("daemon.time_scale", time_scale, "must be a number >= 0 (0: no clock, 1: real time)")
    policy = daemon.get("policy", "fifo")
    if policy not in POLICIES:
        raise ConfigError("daemon.policy", policy, f"must be one of {', '.join(POLICIES)}")
    policy_options = _policy_options(raw.get("policy", {}))

    buffers = {key: _size(f"daemon.{key}", daemon[key]) for key in ("session_buffer", "daemon_buffer") if key in daemon}
    session_buffer = buffers.get("session_buffer", Config.session_buffer)
    daemon_buffer = buffers.get("daemon_buffer", max(Config.daemon_buffer, session_buffer))
    if daemon_buffer < session_buffer:
        raise ConfigError(
            "daemon.daemon_buffer", daemon.get("daemon_buffer"), f"must be at least session_buffer ({session_buffer})"
        )

    physical = [_physical(i, p, policy, policy_options) for i, p in enumerate(_tables(raw, "physical"))]
    if not physical:
        raise ConfigError("physical", [], "at least one [[physical]] NPU is needed")
    _unique("physical", [p.name for p in physical])
    names = {p.name for p in physical}
    virtual = [virtual_spec(v, names, f"virtual[{i}].") for i, v in enumerate(_tables(raw, "virtual"))]
    if not virtual:
        raise ConfigError("virtual", [], "at least one [[virtual]] NPU is needed")
    _unique("virtual", [v.name for v in virtual])
    try:
        metrics = address(daemon["metrics"]) if "metrics" in daemon else None
    except ValueError as exc:
        raise ConfigError("daemon.metrics", daemon["metrics"], str(exc)) from None
    config = Config(physical, virtual, float(time_scale), policy, policy_options, session_buffer, daemon_buffer)
    config.metrics = metrics
    _processes(daemon, config)
    _check_quotas(config)
    return config


def _processes(daemon: dict, config: Config) -> None:
    """[daemon] processes, watchdog_s, process_memory: how vdevfsd runs and supervises its NPU processes."""
    processes = daemon.get("processes", config.processes)
    if processes not in ("per-npu", "one"):
        raise ConfigError(
            "daemon.processes", processes, 'must be "per-npu" (a process per physical NPU) or "one" (vdevfsd alone)'
        )
    config.processes = processes
    watchdog = daemon.get("watchdog_s", config.watchdog_s)
    if not isinstance(watchdog, int | float) or isinstance(watchdog, bool) or not 1 <= watchdog <= 3600:
        raise ConfigError("daemon.watchdog_s", watchdog, "must be a number of seconds from 1 to 3600")
    config.watchdog_s = float(watchdog)
    if "process_memory" in daemon:
        config.process_memory = _size("daemon.process_memory", daemon["process_memory"])


def address(value: object) -> tuple[str, int]:
    """A listening address, "HOST:PORT" -> (host, port): an IPv6 host in brackets, an empty host for every
    interface, port 0 for any free one. ValueError saying what is wrong. Only the form is checked here: whether
    the daemon can listen there is known when it binds."""
    host, colon, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT with a port 0-65535, such as 127.0.0.1:9400 or [::1]:9400")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 host goes in brackets, such as [::1]:9400")
    return host, int(port)


def build(config: Config, driver: str = "trio", indices: dict[str, int] | None = None) -> Topology:
    """Instantiate the devices. driver: "trio" for the daemon, "sync" for direct mode in the caller's thread;
    `indices`: each virtual NPU's address span, as the daemon numbered them (an NPU process holds a few of them)."""
    runner_cls: type[Runner] = TrioRunner if driver == "trio" else SyncRunner
    units = {}
    for spec in config.physical:
        npu = _executor(spec)
        policy = make_policy(spec.policy, **config.policy_options.get(spec.policy, {}))
        runner = runner_cls(Engine(npu, policy), make_clock(config.time_scale))
        units[spec.name] = PhysicalUnit(spec.name, npu, runner, spec.policy)
    topology = Topology(list(units.values()), [], config.time_scale, config.policy_options)
    for i, spec in enumerate(config.virtual):
        unit = units[spec.physical]
        quota = spec.memory if spec.memory is not None else _even_share(config, spec.physical, unit)
        node = {"uid": spec.uid, "gid": spec.gid, "mode": spec.mode, "cores": spec.cores}
        try:
            topology.add(spec.name, spec.physical, quota, spec.role, (indices or {}).get(spec.name), **node)
        except ValueError as exc:
            raise ConfigError(f"virtual[{i}]", spec.name, str(exc)) from None
    return topology


def _executor(spec: PhysicalSpec) -> Executor:
    if spec.backend == "pyacl":
        from npu.pyacl.device import PyaclNPU  # imports the vendor's module: only when asked for

        return PyaclNPU(spec.name, profile(spec.chip), spec.module, spec.device)
    return EmulatedNPU(spec.name, profile(spec.chip), spec.mode)


# -- field parsers ---------------------------------------------------------------------------------------


def _tables(raw: dict, key: str) -> list[dict]:
    tables = raw.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(key, tables, f"must be an array of tables ([[{key}]])")
    return tables


def _only(table: dict, prefix: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(prefix + key, table[key], f"unknown key (known: {', '.join(sorted(allowed))})")


def _unique(section: str, names: list[str]) -> None:
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{section}[{i}].name", name, "duplicate name")


def _str(table: dict, key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(where + key, value, "missing or not a string")
    return value


def _physical(i: int, table: dict, policy: str, policy_options: dict[str, dict]) -> PhysicalSpec:
    where = f"physical[{i}]."
    _only(table, where, {"name", "backend", "chip", "mode", "policy", "module", "device"})
    spec = PhysicalSpec(
        name=_str(table, "name", where),
        backend=_str(table, "backend", where, "emulated"),
        chip=_str(table, "chip", where, "910B2"),
        mode=_str(table, "mode", where, "numeric"),
        policy=_str(table, "policy", where, policy),
        module=_str(table, "module", where, "acl"),
        device=table.get("device", 0),
    )
    if spec.backend not in BACKENDS:
        raise ConfigError(where + "backend", spec.backend, f"must be one of {', '.join(BACKENDS)}")
    if spec.backend != "pyacl" and ("module" in table or "device" in table):
        key = "module" if "module" in table else "device"
        raise ConfigError(where + key, table[key], 'only a backend = "pyacl" NPU has a vendor module and device')
    if not isinstance(spec.device, int) or isinstance(spec.device, bool) or spec.device < 0:
        raise ConfigError(where + "device", spec.device, "must be a device id >= 0")
    if spec.backend == "pyacl" and spec.mode != "numeric":
        raise ConfigError(where + "mode", spec.mode, "a real device has real memory: the pyacl backend is numeric")
    if spec.chip not in PROFILES:
        raise ConfigError(where + "chip", spec.chip, f"unknown chip (have {', '.join(PROFILES)})")
    if spec.mode not in MODES:
        raise ConfigError(where + "mode", spec.mode, f"must be one of {', '.join(MODES)}")
    key = where + "policy" if "policy" in table else "daemon.policy"  # where this NPU's policy was chosen
    if spec.policy not in POLICIES:
        raise ConfigError(key, spec.policy, f"must be one of {', '.join(POLICIES)}")
    try:
        make_policy(spec.policy, **policy_options.get(spec.policy, {})).check(profile(spec.chip))
    except ValueError as exc:
        raise ConfigError(key, spec.policy, f"on {spec.name}: {exc}") from None
    return spec


def _policy_options(tables: object) -> dict[str, dict]:
    """[policy.<name>] tables: each option one its policy's constructor takes, with a value it accepts."""
    if not isinstance(tables, dict):
        raise ConfigError("policy", tables, "must be tables of options per policy, such as [policy.flex]")
    for name, table in tables.items():
        if name not in POLICIES:
            raise ConfigError(f"policy.{name}", table, f"no such policy (have {', '.join(POLICIES)})")
        if not isinstance(table, dict):
            raise ConfigError(f"policy.{name}", table, f"must be a table of {name}'s options ([policy.{name}])")
        hints = typing.get_type_hints(POLICIES[name].__init__)
        for key, value in table.items():
            if key not in options(name):
                known = ", ".join(options(name)) or "none"
                raise ConfigError(f"policy.{name}.{key}", value, f"{name} has no such option (its options: {known})")
            _policy_option(f"policy.{name}.{key}", value, hints[key])
            try:
                make_policy(name, **{key: value})
            except ValueError as exc:
                raise ConfigError(f"policy.{name}.{key}", value, str(exc)) from None
    return tables


def virtual_spec(table: dict, physical: set[str], where: str = "") -> VirtualSpec:
    """A [[virtual]] table (from the config, the state file, or a `vnpu create` command), checked; `where`
    prefixes its keys in errors."""
    _only(table, where, {"name", "physical", "memory", "role", "owner", "mode", "cores"})
    name = _str(table, "name", where)
    if not DEVICE_NAME.fullmatch(name):
        raise ConfigError(where + "name", name, "must be davinci<N>, the name a container expects")
    phys = _str(table, "physical", where)
    if phys not in physical:
        raise ConfigError(where + "physical", phys, f"no such [[physical]] NPU (have {', '.join(sorted(physical))})")
    role = _str(table, "role", where, "any")
    if role not in ROLES:
        raise ConfigError(where + "role", role, f"must be one of {', '.join(ROLES)}")
    uid, gid = _owner(where + "owner", table.get("owner", "0:0"))
    return VirtualSpec(
        name=name,
        physical=phys,
        memory=None if "memory" not in table else _size(where + "memory", table["memory"]),
        role=ROLES[role],
        uid=uid,
        gid=gid,
        mode=_mode(where + "mode", table.get("mode", "0666")),
        cores=_cores(where + "cores", table.get("cores")),
    )


def _cores(key: str, value: object) -> int | None:
    if value is not None and (type(value) is not int or value < 1):
        raise ConfigError(key, value, "must be a number of AI cores >= 1 (at most the chip's)")
    return value


def _policy_option(key: str, value: object, hint: object) -> None:
    """Options are counts and durations: an integer where the constructor takes an int (cores), else a number."""
    integral = float not in (typing.get_args(hint) or (hint,))
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (integral and not isinstance(value, int)):
        raise ConfigError(key, value, "must be an integer" if integral else "must be a number")


def _size(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value) if isinstance(value, str) else None
    if match and match.group(2).upper() in UNITS and float(match.group(1)) * UNITS[match.group(2).upper()] >= 1:
        return int(float(match.group(1)) * UNITS[match.group(2).upper()])
    units = "KiB, MiB, GiB, TiB, KB, MB, GB or TB"
    raise ConfigError(key, value, f"not a size: use bytes (an integer) or a number with {units}")


def _owner(key: str, value: object) -> tuple[int, int]:
    import grp
    import pwd

    if not isinstance(value, str) or value.count(":") != 1:
        raise ConfigError(key, value, 'must be "user:group" (names or numeric ids)')
    user, group = value.split(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ConfigError(key, value, f"no such user or group: {exc.args[0]}") from None
    return uid, gid


def _mode(key: str, value: object) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else value if type(value) is int else -1
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(key, value, 'must be permission bits in octal, such as "0660"')
    return mode


def _even_share(config: Config, physical: str, unit: PhysicalUnit) -> int:
    sharing = sum(1 for v in config.virtual if v.physical == physical)
    return unit.npu.memory.capacity // sharing


def _check_quotas(config: Config) -> None:
    for p in config.physical:
        capacity = profile(p.chip).memory_bytes
        for i, v in enumerate(config.virtual):
            if v.physical == p.name and v.memory is not None and v.memory > capacity:
                raise ConfigError(f"virtual[{i}].memory", v.memory, f"exceeds {p.name}'s {capacity} bytes ({p.chip})")
