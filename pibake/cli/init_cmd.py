"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('init', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='Create a cluster directory: cluster.yaml and secrets')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def init_cmd(args):
    """Create a cluster directory: cluster.yaml and secrets (CA, registry cert, join token, munge key, admin credential).

    Not built yet in this version of pibake."""
    not_built('pibake init')


@cli.command('token', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help="Show or rotate the cluster's join token.")
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def token_cmd(args):
    """Show or rotate the cluster's join token.

    Not built yet in this version of pibake."""
    not_built('pibake token')
