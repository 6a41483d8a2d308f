"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('image', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='List')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def image_cmd(args):
    """List, download and verify OS images from the pinned catalog.

    Not built yet in this version of pibake."""
    not_built('pibake image')
