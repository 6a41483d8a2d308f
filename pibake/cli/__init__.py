"""The ``pibake`` command: a thin shell over ``pibake.api``.

Each command family lives in its own module of this package and registers itself on
``cli``. Errors are turned into one clear line here, in one place.
"""

import logging
import sys
import traceback

import click

from pibake import __version__
from pibake.cli.options import CliState
from pibake.errors import PibakeError

LOG = logging.getLogger("pibake")


class _Group(click.Group):
    def list_commands(self, ctx):
        # The order users meet them in, not alphabetical.
        order = ["init", "render", "burn", "reseed", "image", "devices", "registry", "token",
                 "agent", "deploy", "verify", "switch", "recover", "sensors", "lab"]
        names = super().list_commands(ctx)
        return [n for n in order if n in names] + [n for n in names if n not in order]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--cluster", "cluster_dir", envvar="PIBAKE_CLUSTER", default="cluster", show_default=True,
    type=click.Path(file_okay=False), metavar="DIR",
    help="Cluster directory (cluster.yaml, secrets/, registry DB, burn manifest). Env: PIBAKE_CLUSTER.",
)
@click.option("-v", "--verbose", count=True, help="More output (-vv for debug, tracebacks on errors).")
@click.option("-q", "--quiet", count=True, help="Less output.")
@click.version_option(__version__, prog_name="pibake")
@click.pass_context
def cli(ctx, cluster_dir, verbose, quiet):
    """Turn a handful of Raspberry Pis into a working Slurm cluster, and prove it works.

    \b
    Typical flow:
      pibake init --manager red00 --manager-ip 10.1.1.10 --network 10.1.1.0/24
      pibake burn --hostname red00 --ip 10.1.1.10 --role manager --device /dev/sdb
      pibake burn --hostname 'red[01-04]' --ip '10.1.1.[11-14]' --device /dev/sdb
      (power on the Pis; they enrol themselves)
      pibake verify
    """
    verbosity = verbose - quiet
    ctx.obj = CliState(cluster_dir=cluster_dir, verbosity=verbosity)
    _setup_logging(verbosity)


def _setup_logging(verbosity):
    level = logging.WARNING
    if verbosity == 1:
        level = logging.INFO
    elif verbosity >= 2:
        level = logging.DEBUG
    elif verbosity < 0:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("pibake")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv=None):
    """Console entry point: run the CLI, turn errors into one line and an exit code."""
    try:
        rv = cli.main(args=argv, prog_name="pibake", standalone_mode=False)
    except PibakeError as err:
        click.echo(f"pibake: error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("pibake: aborted", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("pibake: interrupted", err=True)
        sys.exit(130)
    except Exception:  # a bug: say so, traceback only when asked
        verbose = "-vv" in (argv or sys.argv) or "--verbose" in (argv or sys.argv)
        click.echo("pibake: internal error, please report it (run with -vv for the traceback)", err=True)
        if verbose:
            traceback.print_exc()
        sys.exit(70)
    sys.exit(rv if isinstance(rv, int) else 0)


# Command families register themselves on `cli` when imported.
from pibake.cli import (  # noqa: E402,F401  pylint: disable=wrong-import-position
    agent_cmd,
    burn_cmd,
    deploy_cmd,
    devices_cmd,
    image_cmd,
    init_cmd,
    lab_cmd,
    registry_cmd,
    render_cmd,
    sensors_cmd,
    switch_cmd,
    verify_cmd,
)
