"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('devices', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='List removable cards that pibake could write to')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def devices_cmd(args):
    """List removable cards that pibake could write to, and why others are refused.

    Not built yet in this version of pibake."""
    not_built('pibake devices')
