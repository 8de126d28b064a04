"""`vdevfsd`: mount and unmount the virtual device filesystem."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import trio

from interposer import config as configuration
from interposer import logs
from vdevfs.daemon import MountError, serve, unmount
from vdevfs.limits import BufferLimits


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"]))
@click.option("--log-json/--log-console", default=None, help="Log format (default: JSON unless on a terminal).")
def main(log_level: str, log_json: bool | None) -> None:
    """FlexNPU daemon: virtual /dev/davinci* device files backed by (emulated) Ascend NPUs."""
    logs.configure(log_level, json=log_json)


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML topology (default: built in).")
def mount(mountpoint: Path, config_path: Path | None) -> None:
    """Mount the device files at MOUNTPOINT and serve them until SIGINT/SIGTERM."""
    try:
        cfg = configuration.load(config_path)
        topology = configuration.build(cfg)
    except configuration.ConfigError as exc:
        click.echo(f"vdevfsd: {exc}", err=True)
        sys.exit(2)
    try:
        trio.run(serve, topology, mountpoint, cfg.source, BufferLimits(cfg.session_buffer, cfg.daemon_buffer))
    except MountError as exc:
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
