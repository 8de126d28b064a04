"""`vdevfsd`: mount and unmount the virtual device filesystem."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import structlog
import trio

from interposer import config as configuration
from interposer import logs
from vdevfs import state
from vdevfs.daemon import MountError, serve, unmount
from vdevfs.metrics import MetricsError

log = structlog.get_logger()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"]))
@click.option("--log-json/--log-console", default=None, help="Log format (default: JSON unless on a terminal).")
@click.pass_context
def main(ctx: click.Context, log_level: str, log_json: bool | None) -> None:
    """FlexNPU daemon: virtual /dev/davinci* device files backed by (emulated) Ascend NPUs."""
    logs.configure(log_level, json=log_json)
    ctx.obj = {"log_level": log_level, "log_json": log_json}  # NPU processes log the same way


def _address(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    try:
        return None if value is None else configuration.address(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}") from None


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML topology (default: built in).")
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    callback=_address,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: [daemon] metrics of the config; none).",
)
@click.option(
    "--state",
    "state_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where run-time changes to virtual NPUs are kept (default: beside the config; see vdevfs/state.py).",
)
@click.pass_context
def mount(
    ctx: click.Context,
    mountpoint: Path,
    config_path: Path | None,
    metrics: tuple[str, int] | None,
    state_path: Path | None,
) -> None:
    """Mount the device files at MOUNTPOINT and serve them until SIGINT/SIGTERM."""
    state_path = state_path or state.default_path(config_path, mountpoint)
    loaded = False
    try:
        cfg = configuration.load(config_path)
        keeper = state.Keeper(state_path, state.fingerprint(cfg))
        loaded = state.load(state_path, cfg)
        if loaded:
            log.info("state_loaded", state=str(state_path), virtual=[v.name for v in cfg.virtual])
        configuration.build(cfg)  # checked here, to exit with the error before mounting
    except configuration.ConfigError as exc:
        if loaded:  # the state's virtual NPUs, checked one by one, do not fit together or on the chips
            exc = configuration.ConfigError("state", str(state_path), f"{exc.detail}; delete it to start afresh")
        click.echo(f"vdevfsd: {exc}", err=True)
        sys.exit(2)
    try:
        trio.run(serve, cfg, mountpoint, metrics or cfg.metrics, keeper, (ctx.obj["log_level"], ctx.obj["log_json"]))
    except (MountError, MetricsError) as exc:
        click.echo(f"vdevfsd: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", is_flag=True, help="Detach now even if device files are still open.")
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount the device files at MOUNTPOINT (the daemon then exits)."""
    try:
        unmount(mountpoint, lazy)
    except MountError as exc:
        click.echo(f"vdevfsd: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
