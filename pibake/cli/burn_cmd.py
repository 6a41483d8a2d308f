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


