"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('verify', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='Check the cluster')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def verify_cmd(args):
    """Check the cluster (registry, sinfo, srun on every node, munge, clock skew); --bench for benchmarks.

    Not built yet in this version of pibake."""
    not_built('pibake verify')
