"""``pibake burn`` and ``pibake reseed``: thin shells over ``pibake.bake.burn``."""

import sys

import click

from pibake.cli import cli
from pibake.cli.options import (
    emit_json,
    hostname_option,
    inventory_option,
    ip_option,
    json_option,
    pass_state,
    role_option,
)
from pibake.api import BOARDS, PibakeError, bake_burn as burning, debian_mirror, human_size, parse_size

BOARD_NAMES = tuple(BOARDS)

_GUARD_OPTIONS = [
    click.option("--yes", "-y", is_flag=True, help="Do not ask before erasing a card (the checks still run)."),
    click.option("--allow-non-removable", is_flag=True,
                 help="Allow a disk that is not removable (e.g. a loop device or an internal card slot)."),
    click.option("--max-size", default="256G", show_default=True, metavar="SIZE",
                 help="Refuse disks larger than this (e.g. 512G; 'none' for no cap)."),
    click.option("--wheel", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
                 help="pibake wheel for a manager's boot partition (default: the pibake you run, built from its checkout or its pip installation; cached)."),
]


def _guard_options(func):
    for option in reversed(_GUARD_OPTIONS):
        func = option(func)
    return func


class _BurnProgressBar:
    """A rich progress bar on stderr (speed, ETA) per host; paused while a question is asked."""

    def __init__(self, enabled):
        self.enabled = enabled
        self._progress = None
        self._tasks = {}

    def _ensure(self):
        if self._progress is None:
            from rich.console import Console  # start-up: rich.progress costs ~0.2 s, only a long write shows a bar
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,  # start-up: as above
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description:<18}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(),
                                      console=Console(stderr=True), transient=False)
            self._progress.start()
        return self._progress

    def __call__(self, label, done, total):
        if not self.enabled:
            return
        progress = self._ensure()
        if label not in self._tasks:
            self._tasks[label] = progress.add_task(str(label), total=total or None)
        progress.update(self._tasks[label], completed=done, total=total or None)

    def pause(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks = {}

    def close(self):
        self.pause()


def _size(value):
    return parse_size(value)


def _human(n):
    return human_size(n)


def _report(results, as_json, what):
    if as_json:
        emit_json([r.to_json() for r in results])
    for r in results:
        if r.ok and r.action == "reseed":
            removed = r.seed.get("cmdline", {}).get("removed")
            click.echo(f"{r.hostname} ({r.ip}) reseeded on {r.target}: seed {r.instance_id}, read back equal"
                       + (f"; removed {' '.join(removed)} from cmdline.txt" if removed else ""), err=True)
        elif r.ok:
            click.echo(f"{r.hostname} ({r.ip}) -> {r.target}: {_human(r.bytes_written)} written, "
                       f"{_human(r.bytes_skipped)} skipped, {'verified' if r.verified else 'NOT verified'}, "
                       f"seed {r.instance_id}, {r.seconds:.1f} s", err=True)
        else:
            click.echo(f"{r.hostname} ({r.ip}) -> {r.target}: FAILED: {r.error}", err=True)
    failed = [r for r in results if not r.ok]
    if failed:
        raise PibakeError(f"{len(failed)} of {len(results)} {what} failed: "
                          + "; ".join(f"{r.hostname} on {r.target}: {r.error}" for r in failed))


@cli.command("burn", short_help="Write an OS image and a node's cloud-init seed to an SD card or an image file.")
@hostname_option
@ip_option
@role_option
@inventory_option
@click.option("--device", "device_list", metavar="DEV[,DEV...]",
              help="Card device(s), e.g. /dev/sdb. Several (comma-separated) are written in parallel.")
@click.option("--output", metavar="PATH", help="Write image files instead, e.g. 'out/{hostname}.img'.")
@click.option("--image", default=None, metavar="NAME|PATH",
              help="Catalog image name or image file (.img, .img.xz, ...). Default: the cluster's image.")
@click.option("--board", default=None, type=click.Choice(BOARD_NAMES),
              help="The board the card is for: zero and zero-w (32-bit only) get the armhf image of the cluster's "
                   "family, the others arm64. Default: each node's board from cluster.yaml's nodes: (one image "
                   "per burn), else the cluster's image as it is.")
@click.option("--sha256", default=None, metavar="HEX", help="Expected sha256 of a local image file or URL.")
@click.option("--no-verify", is_flag=True, help="Skip the read-back of the written image (the seed is always read back).")
@click.option("--full", is_flag=True, help="Write every byte of the image (default: only the blocks it uses).")
@click.option("--bake", is_flag=True,
              help="First install the role's packages into a cached copy of the image (`pibake image bake`, "
                   "needs root), so the cards' first boot runs no apt.")
@_guard_options
@json_option
@pass_state
def burn_cmd(state, hostnames, ips, role, inventory, device_list, output, image, board, sha256, no_verify, full, bake,
             yes, allow_non_removable, max_size, wheel, as_json):
    """Write an OS image and a node's cloud-init seed to an SD card or an image file.

    \b
    Examples:
      pibake burn --hostname red01 --ip 10.1.1.11 --device /dev/sdb
      pibake burn --hostname 'red[01-04]' --ip '10.1.1.[11-14]' --device /dev/sdb
      pibake burn --hostname 'red[01-02]' --ip '10.1.1.[11-12]' --device /dev/sdb,/dev/sdc
      pibake burn --hostname 'red[01-04]' --ip '10.1.1.[11-14]' --output 'out/{hostname}.img'
      pibake burn --hostname red-zero --ip 10.1.1.40 --role sensor --board zero-w --device /dev/sdb
      pibake burn --hostname 'red[01-04]' --ip '10.1.1.[11-14]' --bake --device /dev/sdb

    Every check (plan, seed lint, image checksum, the wrong-disk guard) runs before anything is
    written. Between cards of a batch pibake waits for the next card and checks it is a different one.
    """
    progress = _BurnProgressBar(enabled=sys.stderr.isatty() and state.verbosity >= 0)

    def confirm(question):
        progress.pause()
        return click.confirm(question, default=False, err=True)

    def ask(message):
        progress.pause()
        click.prompt(message, default="", show_default=False, prompt_suffix=" ", err=True)

    devices = [d.strip() for d in (device_list or "").split(",") if d.strip()]
    try:
        results = burning.burn(
            state.cluster_path, hostnames=hostnames, ips=ips, role=role, inventory=inventory, devices_=devices,
            output=output, image=image, board=board, sha256=sha256, verify=not no_verify, sparse=not full,
            allow_non_removable=allow_non_removable, max_bytes=_size(max_size), wheel=wheel,
            confirm=None if yes else confirm, ask=ask, progress=progress, bake=bake,
            bake_mirror=debian_mirror() if bake else None,
            bake_progress=(lambda line: click.echo(f"bake: {line}", err=True)) if state.verbosity >= 0 else None)
    finally:
        progress.close()
    _report(results, as_json, "burns")


@cli.command("reseed",
             short_help="Replace the cloud-init seed on an already burned card or image without rewriting the OS.")
@click.option("--device", default=None, metavar="DEV", help="The burned card, e.g. /dev/sdb.")
@click.option("--image", "image_file", default=None, type=click.Path(dir_okay=False), metavar="FILE.img",
              help="A burned image file.")
@hostname_option
@ip_option
@role_option
@_guard_options
@json_option
@pass_state
def reseed_cmd(state, device, image_file, hostnames, ips, role, yes, allow_non_removable, max_size, wheel, as_json):
    """Replace the cloud-init seed on an already burned card or image without rewriting the OS.

    \b
    Example:
      pibake reseed --device /dev/sdb --hostname red01 --ip 10.1.1.11

    The new seed has a new instance-id, so cloud-init runs again at the next boot. Only
    user-data, meta-data, network-config (and a stale ds=nocloud in cmdline.txt) change.
    """
    if not hostnames or not ips:
        raise PibakeError("say which node the card is for: --hostname NAME --ip ADDRESS")

    def confirm(question):
        return click.confirm(question, default=False, err=True)

    result = burning.reseed(state.cluster_path, device=device, image_file=image_file, hostname=hostnames, ip=ips,
                            role=role, confirm=None if yes else confirm, allow_non_removable=allow_non_removable,
                            max_bytes=_size(max_size), wheel=wheel)
    _report([result], as_json, "reseeds")
