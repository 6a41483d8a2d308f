"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('lab', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='A simulated Pi cluster on this Linux machine')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def lab_cmd(args):
    """A simulated Pi cluster on this Linux machine (network namespaces + real cloud-init).

    Not built yet in this version of pibake."""
    not_built('pibake lab')
