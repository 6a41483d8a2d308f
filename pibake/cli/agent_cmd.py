"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('agent', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='Run the first-boot agent')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def agent_cmd(args):
    """Run the first-boot agent (enrols this machine with the registry).

    Not built yet in this version of pibake."""
    not_built('pibake agent')
