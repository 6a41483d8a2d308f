"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('registry', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='Run and manage the registry')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def registry_cmd(args):
    """Run and manage the registry (the enrolment service on the manager).

    Not built yet in this version of pibake."""
    not_built('pibake registry')
