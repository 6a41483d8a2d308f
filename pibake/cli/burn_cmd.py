"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('burn', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help="Write an OS image and a node's cloud-init seed to an SD card or an image file.")
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def burn_cmd(args):
    """Write an OS image and a node's cloud-init seed to an SD card or an image file.

    Not built yet in this version of pibake."""
    not_built('pibake burn')


@cli.command('reseed', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='Replace the cloud-init seed on an already burned card or image without rewriting the OS.')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def reseed_cmd(args):
    """Replace the cloud-init seed on an already burned card or image without rewriting the OS.

    Not built yet in this version of pibake."""
    not_built('pibake reseed')


@cli.command('image', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='List')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def image_cmd(args):
    """List, download and verify OS images from the pinned catalog.

    Not built yet in this version of pibake."""
    not_built('pibake image')


@cli.command('devices', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='List removable cards that pibake could write to')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def devices_cmd(args):
    """List removable cards that pibake could write to, and why others are refused.

    Not built yet in this version of pibake."""
    not_built('pibake devices')
