"""`vdevctl`: see and use the virtual NPUs of a running vdevfsd (found by its mount point)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import click

from interposer import logs
from interposer.shim.flexnpu_client.devices import bound_nodes
from interposer.shim_env import C_INCLUDE_PATH, C_LIB_PATH, SHIM_PATH, shim_env
from tools import coverage
from tools.daemon_files import read_status, send_command
from workloads.tables import boxed, plain

DEFAULT_MOUNT = "/dev/flexnpu"

# Commands in modules of their own, imported when used: `vdevctl ls` need not load the simulator or gRPC.
LAZY = {
    "simulate": "tools.simulate",
    "cdi": "tools.cdi",
    "device-plugin": "tools.device_plugin.command",
    "top": "tools.top",
}


class Commands(click.Group):
    """A group whose LAZY commands are each its module's `command`, imported on first use (click's LazyGroup)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY:
            return importlib.import_module(LAZY[name]).command
        return super().get_command(ctx, name)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def policy_label(physical: dict) -> str:
    """A physical NPU's policy with its state: `flex (decode reserve 5, tpot target 40 ms)`."""
    state = []
    for key, value in physical["policy_state"].items():
        if value is None:  # not decided yet (flex's reserve before its first dispatch)
            continue
        shown = f"{value:g}" if isinstance(value, int | float) else str(value)
        name = key.replace("_", " ")
        state.append(f"{name.removesuffix(' ms')} {shown} ms" if key.endswith("_ms") else f"{name} {shown}")
    return f"{physical['policy']} ({', '.join(state)})" if state else physical["policy"]


def process_label(physical: dict) -> str:
    """The process serving a physical NPU: `pid 4242`, `pid 4242, 2 restarts`, `down (restarting)`, or `vdevfsd`
    for a daemon serving every NPU itself ([daemon] processes = "one")."""
    if "pid" not in physical:
        return "vdevfsd"
    if not physical["up"]:
        return "down (restarting)"
    restarts = physical.get("restarts", 0)
    return f"pid {physical['pid']}" + (f", {restarts} restart{'s' * (restarts != 1)}" if restarts else "")


def stream_phases(session: dict) -> str:
    """Each stream's phase and where it came from, alike ones counted: `prefill (operator), unknown ×2`."""
    labels = Counter(
        s["phase"] if s["from"] == "none" else f"{s['phase']} ({s['from']})" for s in session["stream_phases"]
    )
    return ", ".join(label if n == 1 else f"{label} ×{n}" for label, n in labels.items())


def render(status: dict) -> str:
    physical = {p["name"]: p for p in status["physical"]}
    rows = [
        ("NPU", "Physical", "Chip", "Mode", "Role", "Cores", "Memory used / quota", "Sessions", "Streams", "Queued")
    ]
    details = []
    for v in status["virtual"]:
        p = physical[v["physical"]]
        sessions = v["sessions"]
        rows.append(
            (
                v["name"],
                v["physical"],
                v["chip"],
                p["mode"],
                v["role"],
                str(v.get("cores") or "all"),  # its cap on every kernel
                f"{human(v['memory_used'])} / {human(v['memory_quota'])}",
                str(len(sessions)),
                str(sum(s["streams"] for s in sessions)),
                str(sum(s["queued"] for s in sessions)),
            )
        )
        for s in sessions:
            details.append(
                (
                    v["name"],
                    str(s["session"]),
                    str(s["pid"]),
                    stream_phases(s),
                    str(s["streams"]),
                    str(s["events"]),
                    str(s["queued"]),
                    human(s["memory_used"]),
                )
            )
    out = [boxed(rows)]
    out.append(
        boxed(
            [
                (
                    "Physical",
                    "Chip",
                    "Mode",
                    "Policy",
                    "AI cores P / D",
                    "Memory used / total",
                    "Running",
                    "Queued",
                    "Process",
                )
            ]
            + [
                (
                    p["name"],
                    p["chip"],
                    p["mode"],
                    policy_label(p),
                    f"{p['cores']['prefill']} / {p['cores']['decode']} of {p['cores']['total']}",
                    f"{human(p['memory_used'])} / {human(p['memory_total'])}",
                    str(p["running"]),
                    str(p["queued"]),
                    process_label(p),
                )
                for p in status["physical"]
            ]
        )
    )
    if details:
        out.append(boxed([("NPU", "Session", "PID", "Phase", "Streams", "Events", "Queued", "Memory")] + details))
    else:
        out.append("No sessions.")
    daemon = status["daemon"]
    out.append(f"daemon pid {daemon['pid']}, mounted at {daemon['mountpoint']}, config: {daemon['config']}")
    return "\n\n".join(out)


def device_names(spec: str) -> list[str]:
    names = []
    for item in spec.split(","):
        item = item.strip()
        if not item.isdigit():
            raise click.BadParameter(
                f"{item!r} is not a device number (use e.g. --devices 2,3)", param_hint="--devices"
            )
        names.append(f"davinci{int(item)}")
    return names


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--mount",
    type=Path,  # not click.Path: it stats the path, and a stat of a hung daemon's mount never returns
    default=DEFAULT_MOUNT,
    envvar="FLEXNPU_MOUNT",
    show_default=True,
    help="Where vdevfsd mounted the device files.",
)
@click.pass_context
def main(ctx: click.Context, mount: Path) -> None:
    """Inspect and use FlexNPU virtual NPUs."""
    logs.configure("warning")
    ctx.obj = mount


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status as JSON.")
@click.pass_obj
def ls(mount: Path, as_json: bool) -> None:
    """Every virtual NPU: its physical NPU, memory, sessions (with pids), streams and queued work."""
    status = read_status(mount)
    click.echo(json.dumps(status, indent=1) if as_json else render(status))


@main.command()
@click.argument("npu", required=False)
@click.argument("name", required=False)
@click.pass_obj
def policy(mount: Path, npu: str | None, name: str | None) -> None:
    """Each physical NPU's scheduling policy and its state; with NPU and NAME, switch NPU to policy NAME now.

    Queued work stays queued, in order, and what runs finishes as it started. The policy is made with the
    options of its [policy.NAME] table in the daemon's config. Switching needs the daemon's user or root.

    Example: vdevctl policy npu0 flex
    """
    if npu is None:
        rows = [("NPU", "Policy")] + [(p["name"], policy_label(p)) for p in read_status(mount)["physical"]]
        click.echo(plain(rows))
        return
    if name is None:
        raise click.UsageError("missing NAME: `vdevctl policy NPU NAME` switches NPU to policy NAME")
    click.echo(_command(mount, f"policy {npu} {name}"))


def _command(mount: Path, line: str) -> str:
    """Send a control command; its `ok: ...` reply, or the daemon's `error: ...` as the command's error."""
    reply = send_command(mount, line)
    if not reply.startswith("ok: "):
        raise click.ClickException(reply.removeprefix("error: "))
    return reply


@main.group()
def vnpu() -> None:
    """Create, resize and destroy virtual NPUs of the running daemon (kept across its restarts)."""


def _word(ctx: click.Context, param: click.Parameter, value):
    """A control command is words: a value with a space or `=` would be read as more of them."""
    if isinstance(value, str) and (not value or any(c.isspace() or c == "=" for c in value)):
        raise click.BadParameter(f"{value!r}: no spaces or '=' here")
    return value


@vnpu.command("create")
@click.option("--physical", required=True, callback=_word, help="The physical NPU it runs on (see vdevctl ls).")
@click.option("--memory", required=True, callback=_word, help="Its device-memory quota: bytes, or e.g. 8GiB.")
@click.option("--cores", type=int, help="Every kernel of it runs on at most N AI cores (default: the whole chip).")
@click.option("--role", type=click.Choice(["any", "prefill", "decode"]), help="Its streams' phase (default: any).")
@click.option("--owner", callback=_word, help="uid:gid (or user:group) of its device node (default 0:0).")
@click.option("--mode", callback=_word, help="Permission bits of its device node, octal (default 0666).")
@click.option("--name", callback=_word, help="Its node's name, davinci<N> (default: the lowest free).")
@click.pass_obj
def vnpu_create(mount: Path, **fields) -> None:
    """Make a virtual NPU; prints its device node's name."""
    words = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    click.echo(_command(mount, f"vnpu create {words}").removeprefix("ok: "))


@vnpu.command("resize")
@click.argument("name", callback=_word)
@click.option("--memory", callback=_word, help="The new quota (not below what its sessions hold).")
@click.option("--cores", type=int, help="The new core cap (the chip's core count lifts it).")
@click.pass_obj
def vnpu_resize(mount: Path, name: str, memory: str | None, cores: int | None) -> None:
    """Change a virtual NPU's quota or core cap; running sessions see it at once."""
    words = " ".join(f"{k}={v}" for k, v in (("memory", memory), ("cores", cores)) if v is not None)
    click.echo(_command(mount, f"vnpu resize {name} {words}"))


@vnpu.command("destroy")
@click.argument("name", callback=_word)
@click.option("--force", is_flag=True, help="End its open sessions (their processes get the device-lost error).")
@click.pass_obj
def vnpu_destroy(mount: Path, name: str, force: bool) -> None:
    """Remove a virtual NPU and its device node; refused while sessions are open, unless --force."""
    click.echo(_command(mount, f"vnpu destroy {name}" + (" force" if force else "")))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--devices", help="Virtual NPUs the program sees, renumbered from 0 (e.g. 2,3). Default: all.")
@click.option("--direct", is_flag=True, help="No daemon: run the emulated NPUs in the program's own process.")
@click.option("--config", type=click.Path(exists=True), help="Topology for --direct (default: built in).")
@click.option("--phase", type=click.Choice(["prefill", "decode"]), help="Declare the program's LLM phase.")
@click.option(
    "--preload",
    is_flag=True,
    help="Also LD_PRELOAD FlexNPU's libascendcl.so: for a binary whose vendor library path is baked in (RPATH).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def run(
    mount: Path, devices: str | None, direct: bool, config: str | None, phase: str | None, preload: bool, command
) -> None:
    """Run COMMAND with pyACL (`import acl`) and the AscendCL C API (libascendcl.so) forwarded to virtual NPUs.

    COMMAND runs as given, with the shim first on PYTHONPATH: `python` is whichever interpreter PATH finds
    first (any Python 3.11+ will do, the shim needs only the standard library). A C/C++ program linked against
    libascendcl.so finds FlexNPU's first on LD_LIBRARY_PATH (see `vdevctl shim --c-lib`). Inside a container,
    where no daemon status file is, the devices are the bound FlexNPU nodes (/dev/davinciN), found as the shim
    finds them.

    Example: vdevctl run --devices 2,3 -- python infer.py
    """
    if direct:
        names = device_names(devices) if devices else None
        env = shim_env(names, mount, direct=True, config=config, phase=phase, preload=preload)
    else:
        env = shim_env(_device_files(mount, devices), mount, phase=phase, preload=preload)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise click.ClickException(f"{command[0]}: {exc.strerror}") from None


def _device_files(mount: Path, devices: str | None) -> list[str]:
    """The device files of the chosen virtual NPUs: the daemon's, or in a container the bound nodes."""
    if not (mount / "status").exists() and bound_nodes():
        have = bound_nodes()
        chosen = [int(n.removeprefix("davinci")) for n in device_names(devices)] if devices else range(len(have))
        missing = [n for n in chosen if n >= len(have)]
        if missing:
            raise click.ClickException(f"davinci{missing[0]}: not bound in this container (have {', '.join(have)})")
        return [have[n] for n in chosen]
    have = [v["name"] for v in read_status(mount)["virtual"]]
    chosen = device_names(devices) if devices else have
    for name in chosen:
        if name not in have:
            raise click.ClickException(f"{name}: no such virtual device (have {', '.join(have)}; see vdevctl ls)")
    return [str(mount / name) for name in chosen]


@main.command()
@click.option("--path", "show_path", is_flag=True, help="Print the directory to bind-mount and put on PYTHONPATH.")
@click.option("--coverage", "show_coverage", is_flag=True, help="Print the API coverage table (Markdown).")
@click.option("--c-include", "show_include", is_flag=True, help="Print the directory holding acl/acl.h (for -I).")
@click.option("--c-lib", "show_lib", is_flag=True, help="Print the directory holding libascendcl.so (for -L).")
def shim(show_path: bool, show_coverage: bool, show_include: bool, show_lib: bool) -> None:
    """The `acl` shim: where it is, and which pyACL calls it implements; where the C API's headers and library
    are (gcc prog.c -I$(vdevctl shim --c-include) -L$(vdevctl shim --c-lib) -lascendcl)."""
    if show_coverage:
        click.echo(coverage.table(SHIM_PATH), nl=False)
    if show_include:
        click.echo(C_INCLUDE_PATH)
    if show_lib:
        if not (Path(C_LIB_PATH) / "libascendcl.so").exists():
            raise click.ClickException(f"{C_LIB_PATH}/libascendcl.so is not built: run `make -C clib` (or make setup)")
        click.echo(C_LIB_PATH)
    if show_path or not (show_coverage or show_include or show_lib):
        click.echo(SHIM_PATH)


@main.command()
@click.option(
    "--deployment",
    "kind",
    type=click.Choice(["direct", "colocated", "disaggregated"]),
    default="colocated",
    show_default=True,
    help="direct: one process, no daemon; colocated: prefill and decode processes on one NPU; "
    "disaggregated: on two NPUs",
)
@click.option("--model", default="tiny", show_default=True, help="tiny (real tokens) or qwen2.5-7b (timing mode)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--time-scale", type=float, default=1.0, show_default=True, help="wall seconds per modeled second")
@click.option("--max-num-seqs", type=int, help="requests decoding at once (default: the model's)")
def serve(kind: str, model: str, host: str, port: int, time_scale: float, max_num_seqs: int | None) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (POST /v1/completions, GET /v1/models, GET /metrics)
    until SIGINT/SIGTERM, starting what the deployment needs (the daemon on a private mount, the engine
    processes) and stopping it all cleanly."""
    import trio

    from tools import launch
    from workloads.model import model_config
    from workloads.server import Health
    from workloads.server import serve as serve_http
    from workloads.spec import ServeSpec

    try:
        model_config(model)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    changes = {"time_scale": time_scale} | ({"max_num_seqs": max_num_seqs} if max_num_seqs else {})
    spec = ServeSpec.for_model(model, **changes)

    async def main() -> str | None:
        """Serve until a signal (None) or until the engine goes down (why: the process then exits 1, for a
        supervisor such as Kubernetes or systemd to restart it)."""
        health = Health()
        down: list[str] = []
        async with launch.deployment(kind, spec, on_failure=health.down) as engine, trio.open_nursery() as nursery:

            async def watch() -> None:
                down.append(await health.wait_down())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            click.echo(f"serving {engine.model} ({kind}) at http://{host}:{port}/v1 — Ctrl-C stops", err=True)
            await serve_http(engine, host, port, health=health)
            nursery.cancel_scope.cancel()
        return down[0] if down else None

    why = trio.run(main)
    if why is not None:
        raise click.ClickException(f"the engine went down ({why}); exiting for a supervisor to restart the service")


@main.group()
def bench() -> None:
    """Benchmarks; each measures its baseline in the same run and prints ratios."""


def _bench(name: str, out: Path, quick: bool) -> None:
    module = importlib.import_module(f"tools.bench_{name}")
    results = module.run(quick=quick)
    click.echo(module.render(results))
    out.write_text(json.dumps(results, indent=1) + "\n")
    click.echo(f"\nwrote {out}")


# name: (what it measures, what --quick does); each is tools/bench_<name>.py with run(quick) and render(results)
BENCHES = {
    "rt": "Runtime path: bare FUSE echo vs device-file round trip, batching, memcpy, direct mode, daemon RSS.",
    "ops": "Operator launches: daemon vs direct mode, eager vs replay of a captured 300-op graph.",
    "fidelity": "The emulated chip beside public measurements, and a prefill/decode co-location probe.",
    "serve": "LLM serving: decode overhead through the daemon vs direct; deployments under load over HTTP.",
    "chaos": "Verifying clients while clients and the daemon are killed and bad frames fly; then buffer abuse.",
    "pd": "Prefill/decode co-location: fifo, static and flex vs static disaggregation, simulated and live.",
    "caps": "Compute isolation: a 6-core virtual NPU vs the whole chip, and 6- and 18-core tenants sharing one.",
    "models": "Offline models: ResNet-50 through acl.mdl at batch 1/8/32, and beside LLM decode under fifo and flex.",
}


def _bench_command(name: str, what: str) -> None:
    @bench.command(name, help=what)
    @click.option("--out", type=click.Path(path_type=Path), default=f"bench-{name}.json", show_default=True)
    @click.option("--quick", is_flag=True, help="A smoke run of a minute or two (fewer repetitions, not for figures).")
    def command(out: Path, quick: bool) -> None:
        _bench(name, out, quick)


for _name, _what in BENCHES.items():
    _bench_command(_name, _what)


@bench.command(
    "cloudmatrix",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def _bench_cloudmatrix(ctx: click.Context) -> None:
    """DeepSeek-R1 on a CloudMatrix384-scale deployment, simulated: calibration, flex vs static disaggregation."""
    # Options of its own (points, the sweep engine); its module (the simulator) loads only when asked for.
    command = importlib.import_module("tools.bench_cloudmatrix").command
    command.main(ctx.args, prog_name=ctx.command_path)


if __name__ == "__main__":
    sys.exit(main())
