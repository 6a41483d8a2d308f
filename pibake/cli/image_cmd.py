"""`pibake image list|get|verify`: the pinned image catalog and the download cache."""

import click

from pibake import api
from pibake.api import bake_images as images, human_size
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state

IMAGE_EPILOG = """\b
Examples:
  pibake image list
  pibake image get raspios-trixie-lite-arm64
  pibake image verify raspios-trixie-lite-arm64
  pibake image verify ~/Downloads/my.img.xz --sha256 <hex>
  pibake image bake raspios-trixie-lite-arm64 --role worker
\b
Downloads go to $XDG_CACHE_HOME/pibake/images (as root: /var/cache/pibake/images), resume after an
interruption, and are kept only when their sha256 matches the catalog's pinned value."""

cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None, envvar="PIBAKE_IMAGE_CACHE", metavar="DIR",
    help="Image cache directory. Env: PIBAKE_IMAGE_CACHE.")
sha256_option = click.option(
    "--sha256", default=None, metavar="HEX",
    help="Expected sha256 of the (compressed) file; required for a catalog entry without a pinned one.")


@cli.group("image", short_help="List, download and verify OS images from the pinned catalog.",
           epilog=IMAGE_EPILOG)
def image_cmd():
    """List, download and verify OS images from the pinned catalog."""


class _Bar:
    """A rich progress bar on stderr fed by ``progress(done, total)`` callbacks."""

    def __init__(self, description):
        from rich.console import Console  # start-up: rich.progress costs ~0.2 s, only a long write shows a bar
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,  # start-up: as above
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=False)
        self.task = None
        self.description = description

    def __enter__(self):
        return self

    def __call__(self, done, total):
        if self.task is None:  # started on the first report, so an early error prints no empty bar
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.task is not None:
            self.progress.stop()


@image_cmd.command("list")
@cache_dir_option
@json_option
def image_list(cache_dir, as_json):
    """List the catalog: name, family, size and whether it is in the cache."""
    catalog = api.load_catalog()
    rows = []
    for name, entry in sorted(catalog.items()):
        row = entry.to_dict()
        cached = images.cached_image(name, cache_dir=cache_dir, catalog=catalog)
        row["cached"] = str(cached) if cached else None
        rows.append(row)
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        size = human_size(row["size"]) if row["size"] else "size unknown"
        state = f"cached: {row['cached']}" if row["cached"] else "not downloaded"
        click.echo(f"{row['name']:<34} {row['family']:<8} {row['format']:<4} {size:>9}  {state}", err=True)
        click.echo(f"    {row['description']}", err=True)
        if not row["sha256"]:
            click.echo("    (no confirmed sha256 pinned: `image get` needs --sha256)", err=True)


@image_cmd.command("get")
@click.argument("name")
@cache_dir_option
@sha256_option
@json_option
def image_get(name, cache_dir, sha256, as_json):
    """Download NAME from the catalog into the cache (resumable, sha256 enforced)."""
    with _Bar(f"get {name}") as bar:
        image = api.resolve_image(name, cache_dir=cache_dir, sha256=sha256, progress=bar)
    if as_json:
        emit_json(image.to_dict())
    else:
        click.echo(f"{image.name}: {image.path} ({human_size(image.size)}, sha256 {image.sha256})", err=True)


@image_cmd.command("verify")
@click.argument("name_or_path")
@cache_dir_option
@sha256_option
@click.option("--no-decompress", is_flag=True, help="Only re-hash the file; do not read the compressed stream.")
@json_option
def image_verify(name_or_path, cache_dir, sha256, no_decompress, as_json):
    """Re-hash a cached catalog image or a local file and check its compressed stream is complete."""
    with _Bar(f"verify {name_or_path}") as bar:
        check = api.verify_image(name_or_path, cache_dir=cache_dir, sha256=sha256, progress=bar,
                                 decompress=not no_decompress)
    if as_json:
        emit_json(check.to_dict())
    elif check.ok:
        click.echo(f"{check.name}: OK: {check.message} (sha256 {check.sha256})", err=True)
    if not check.ok:
        raise images.ImageError(f"{check.name} failed verification: {check.message}")


@image_cmd.command("bake")
@click.argument("name_or_path")
@click.option("--role", type=click.Choice(["manager", "worker", "sensor"]), required=True,
              help="Whose packages to install: the role's seed list (cluster.yaml's mqtt: adds its library).")
@click.option("--bake-cache", "bake_cache", type=click.Path(file_okay=False), default=None, envvar="PIBAKE_BAKED_CACHE",
              metavar="DIR", help="Where baked images are kept. Default /var/cache/pibake/baked. "
                                  "Env: PIBAKE_BAKED_CACHE.")
@cache_dir_option
@sha256_option
@click.option("--mirror", default=None, metavar="URL",
              help="Debian mirror apt may fetch from. Default: this machine's configured one.")
@click.option("--offline", is_flag=True,
              help="Fetch nothing: only the image's own local (file:) apt repositories.")
@json_option
@pass_state
def image_bake(state, name_or_path, role, bake_cache, cache_dir, sha256, mirror, offline, as_json):
    """Install ROLE's packages into a copy of an image (a golden image), so its first boot runs no apt.

    \b
    NAME_OR_PATH is a catalog image or an image file. The copy's root partition is mounted through a
    loop device and the image's own apt-get runs in it (arm64/armhf programs under qemu-user through
    binfmt_misc); apt fetches from the configured Debian mirror only. The result is cached per
    (image sha256, role, package set): a second bake of the same inputs is a cache hit. `pibake burn
    --image BAKED.img` then writes seeds that install nothing. Needs root.
    """
    def note(line):
        if state.verbosity >= 0:
            click.echo(f"bake: {line}", err=True)

    baked = api.bake_image(name_or_path, state.cluster_path, role, sha256=sha256, cache_dir=bake_cache,
                           image_cache_dir=cache_dir, mirror=mirror, offline=offline, progress=note)
    if as_json:
        emit_json(baked.to_dict())
    else:
        apt = baked.stamp.get("apt") or {}
        how = "cache hit" if baked.cached else (f"{apt.get('installed', 0)} packages installed, "
                                                f"{apt.get('need_to_get') or '0 B'} fetched, {baked.stamp.get('seconds')} s")
        click.echo(f"{baked.path} ({role}: {' '.join(baked.stamp['marker']['packages'])}; {how})", err=True)
