"""Commands not built yet: they say so plainly and exit 2."""

import click

from pibake.cli import cli
from pibake.cli.options import not_built


@cli.command('render', context_settings={'ignore_unknown_options': True, 'allow_extra_args': True},
             add_help_option=True, short_help='Render the cloud-init NoCloud seed')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def render_cmd(args):
    """Render the cloud-init NoCloud seed (user-data, meta-data, network-config) for node(s), lint it, write it to a folder.

    Not built yet in this version of pibake."""
    not_built('pibake render')
