"""The `vdevctl device-plugin` command."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from interposer import logs
from tools import cdi
from tools.daemon_files import StatusReader
from tools.device_plugin.plugin import KUBELET_DIR, RESOURCE, Plugin, PluginError

STATUS_TIMEOUT_S = 2.0


@click.command()
@click.option(
    "--kubelet-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=KUBELET_DIR,
    show_default=True,
    help="The kubelet's device plugin directory: its kubelet.sock, and this plugin's socket.",
)
@click.option("--resource", default=RESOURCE, show_default=True, help="The extended resource pods request.")
@click.option(
    "--poll",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between reads of the daemon's status (and looks at the kubelet's socket).",
)
@cdi.SHIM_OPTION
@click.pass_obj
def command(mount: Path, kubelet_dir: Path, resource: str, poll: float, shim_host_path: Path) -> None:
    """Offer the daemon's virtual NPUs to the kubelet as --resource, one device each (ID: the node name, davinci2),
    until SIGTERM/SIGINT (Kubernetes device plugin API v1beta1).

    A device is Unhealthy while the daemon's status cannot be read, while its physical NPU is down, and once it
    is destroyed. Allocate answers CDI device names (flexnpu.io/npu=davinci2) and, for runtimes without CDI,
    the same mounts and environment. Registers again when the kubelet restarts. See docs/kubernetes.md.
    """
    logs.configure("info")  # registration and health changes are what an operator reads here
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # A hung daemon must not hang the plugin: its devices go Unhealthy and it still answers and stops.
    status = StatusReader(mount, timeout=max(2 * poll, STATUS_TIMEOUT_S))
    plugin = Plugin(status, mount, kubelet_dir, resource, poll, shim_host_path)
    try:
        plugin.run(stop)
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None
