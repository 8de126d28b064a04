"""`vdevctl cdi generate`: a Container Device Interface (CDI) spec for the running daemon's virtual NPUs.

CDI (github.com/cncf-tags/container-device-interface, SPEC.md) lets a runtime (containerd, CRI-O, podman,
docker) give a container a device by name: `podman run --device flexnpu.io/npu=davinci2 IMAGE`. A spec lists
devices, each with `containerEdits` that "MUST only be made if the matching device is requested", and
spec-level `containerEdits` that "MUST be made if any of the device defined in the `devices` field are
requested" (SPEC.md, "OCI Edits").

Mounts, not deviceNodes. A `deviceNodes` entry is a device node the runtime recreates in the container from its
type, major and minor (runc mknods it; rootless runtimes bind the host node): SPEC.md types it "block, char,
etc.", and the reference library fills a missing type/major/minor by lstat of the host path and rejects anything
that is not a block, character or FIFO device ("not a device node", pkg/cdi/container-edits_unix.go). FlexNPU's
nodes are FUSE regular files whose protocol is write()/read() on that very file, so no mknod can recreate them:
the edits bind-mount them (`mounts`, "bind"), as `docker run -v /dev/flexnpu/davinci2:/dev/davinci2` does. No
cgroup device rule is needed either: the device controller governs only block and character devices.

Each virtual NPU keeps its node name in the container. A runtime appends the edits of every requested device,
and of the spec once, and applies them in that order; a mount replaces any earlier one at the same
`containerPath`, an env entry any earlier one with the same name (pkg/cdi/container-edits.go, Append and Apply).
A device's edits therefore cannot depend on which other devices come with it: were every virtual NPU bound at
/dev/davinci0, a container asking for davinci2 and davinci3 would silently get one of them. So davinciN is bound
at /dev/davinciN, as the Ascend Docker Runtime mounts a virtual NPU /dev/vdavinciN as /dev/davinciN, and any set
of devices composes. The shim numbers the bound nodes from 0 in node order (flexnpu_client/devices.py), as CANN
numbers the devices a container sees: a container given davinci2 sees one NPU, device 0 (`set_device(0)`),
through /dev/davinci2; given davinci2 and davinci3, or `all`, it sees devices 0, 1, ... in node order. Only
davinci0 itself appears as /dev/davinci0: a static per-device edit cannot place a lone davinci2 there without
colliding with davinci0 when both are asked for.

Spec level: what every container of these devices needs once: the ancillary nodes Ascend containers expect
(davinci_manager, devmm_svm, hisi_hdc, served by the daemon beside the virtual NPUs), the standard-library pyACL
shim bound read-only at SHIM_IN_CONTAINER, and PYTHONPATH pointing there, so a stock `python3` imports `acl`
from it. No FLEXNPU_* variable is needed: the shim finds the bound /dev/davinciN regular files itself. Device
level: the one node, or for `all` every node. The same edits come from `container_edits`, which the kubelet
device plugin also answers Allocate with for runtimes without CDI, so a container looks the same either way.

C/C++ programs (`--c-lib-host-path`, e.g. `$(vdevctl shim --c-lib)/libascendcl.so`): the spec also binds FlexNPU's
libascendcl.so read-only at C_LIB_IN_CONTAINER, in /usr/lib, which the dynamic loader searches with no
LD_LIBRARY_PATH and no ld.so.cache entry, so a program linked with -lascendcl finds it, as on a CANN host. Opt-in:
the library is built by `make setup`, which not every host that serves virtual NPUs has run.

A spec is a snapshot of the daemon's virtual NPUs: regenerate it after `vdevctl vnpu create|destroy`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from interposer.shim_env import SHIM_PATH
from tools.daemon_files import read_status
from vdevfs.fs import ANCILLARY

# The oldest version with this layout (devices[].containerEdits, env, mounts with options), and the newest whose
# features the spec uses: no mount `type` (0.4.0), no deviceNodes hostPath (0.5.0), no annotations (0.6.0).
# A runtime's CDI library rejects a version it does not know (specs-go/version.go, ValidateVersion), and older
# runtimes ship older libraries, so the lowest version that fits reaches the most runtimes.
CDI_VERSION = "0.3.0"
KIND = "flexnpu.io/npu"
ALL = "all"  # the device that is every virtual NPU; node names are davinci<N> (config.py), so it cannot clash
SHIM_IN_CONTAINER = "/opt/flexnpu-shim"  # where the README's `docker run -v` recipe binds the shim
C_LIB_IN_CONTAINER = "/usr/lib/libascendcl.so"  # on the loader's default path
# nosuid and nodev: flags a FUSE mount carries already, kept so a runtime in a user namespace may remount the bind.
NODE_OPTIONS = ["bind", "nosuid", "nodev", "noexec"]
SHIM_OPTIONS = ["bind", "ro", "nosuid", "nodev"]


def _bind(host: str | Path, container: str, options: list[str]) -> dict:
    return {"hostPath": str(host), "containerPath": container, "options": list(options)}


def container_edits(
    status: dict, names: list[str], mount: Path, shim: Path = SHIM_PATH, c_lib: Path | None = None
) -> dict:
    """The env and bind mounts that give a container the virtual NPUs `names` (node names, e.g. ["davinci2"]),
    in that order, of the daemon mounted at `mount` whose status is `status`; each node at /dev/<name>. `shim`:
    the shim directory as the host sees it (this installation's, unless the caller runs in a container itself);
    `c_lib`: a libascendcl.so to bind too, as the host sees it.

    Raises ValueError for a name the daemon has no virtual NPU of, or one given twice."""
    have = [v["name"] for v in status["virtual"]]
    for name in names:
        if name not in have:
            raise ValueError(f"{name}: no such virtual NPU (have {', '.join(have) or 'none'}; see vdevctl ls)")
        if names.count(name) > 1:
            raise ValueError(f"{name}: given twice; a container gets each virtual NPU once")
    mount = mount.absolute()  # not resolve(): no stat of a mount whose daemon may hang
    nodes = [_bind(mount / name, f"/dev/{name}", NODE_OPTIONS) for name in (*names, *ANCILLARY)]
    library = [_bind(c_lib, C_LIB_IN_CONTAINER, SHIM_OPTIONS)] if c_lib else []
    return {
        "env": [f"PYTHONPATH={SHIM_IN_CONTAINER}"],
        "mounts": [*nodes, _bind(shim, SHIM_IN_CONTAINER, SHIM_OPTIONS), *library],
    }


def spec(status: dict, mount: Path, shim: Path = SHIM_PATH, c_lib: Path | None = None) -> dict:
    """The CDI spec of every virtual NPU in `status`, one device per node and `all`: the edits `container_edits`
    gives, those every container needs at spec level and each device's own at device level."""
    names = [v["name"] for v in status["virtual"]]
    if not names:
        raise ValueError(f"the daemon at {mount} has no virtual NPUs: a CDI spec needs at least one device")
    common = container_edits(status, [], mount, shim, c_lib)

    def own(chosen: list[str]) -> dict:
        mounts = container_edits(status, chosen, mount, shim)["mounts"]
        return {"mounts": [m for m in mounts if m not in common["mounts"]]}

    devices = [{"name": name, "containerEdits": own([name])} for name in names]
    devices.append({"name": ALL, "containerEdits": own(names)})
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices, "containerEdits": common}


SHIM_OPTION = click.option(
    "--shim-host-path",
    type=click.Path(path_type=Path),
    default=SHIM_PATH,
    show_default="this installation's",
    help="The shim directory as the host sees it (where this command runs in a container, its own path is not).",
)


@click.group()
def command() -> None:
    """Container Device Interface (CDI) specs: the virtual NPUs as devices `flexnpu.io/npu=davinciN` and
    `flexnpu.io/npu=all` for containerd, CRI-O, podman and docker."""


@command.command()
@click.option(
    "--output",
    "-o",
    type=click.File("w", atomic=True),
    default="-",
    help="Write the spec here, replacing the file at once (runtimes watch their spec directories) "
    "[default: stdout]. Runtimes load *.json files from /etc/cdi and /var/run/cdi.",
)
@SHIM_OPTION
@click.option(
    "--c-lib-host-path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also bind this libascendcl.so (FlexNPU's: $(vdevctl shim --c-lib)/libascendcl.so) at "
    f"{C_LIB_IN_CONTAINER}, for C/C++ programs.",
)
@click.pass_obj
def generate(mount: Path, output, shim_host_path: Path, c_lib_host_path: Path | None) -> None:
    """Write a CDI spec (JSON) for the running daemon's virtual NPUs.

    Each device binds its node at /dev/davinciN with the ancillary nodes, binds the pyACL shim at
    /opt/flexnpu-shim and puts it on PYTHONPATH; inside, the devices are numbered from 0 in node order.
    The spec is a snapshot: generate it again after virtual NPUs are created or destroyed.

    Example: vdevctl cdi generate -o /var/run/cdi/flexnpu.json; podman run --device flexnpu.io/npu=davinci2 ...
    """
    try:
        document = spec(read_status(mount), mount, shim_host_path, c_lib_host_path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    output.write(json.dumps(document, indent=2) + "\n")
