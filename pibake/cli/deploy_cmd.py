"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('deploy', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='Set up Slurm on running machines over ssh')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def deploy_cmd(args):
    """Set up Slurm on running machines over ssh, in parallel, with a result per host.

    Not built yet in this version of pibake."""
    not_built('pibake deploy')
