"""``pibake registry``: run the registry (gunicorn + TLS) and manage its nodes from the manager.

The management commands use the same ``pibake.registry.service.RegistryService`` functions as the REST API.
"""

import logging

import click

from pibake.api import RegistryService, serve_registry as serve, served_registry_options, text_table
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state

LOG = logging.getLogger(__name__)

APPLY_MODES = ("auto", "systemd", "service", "direct", "none")


def _registry(state, **options):
    """The registry of the cluster, acting on slurm.conf like the last `registry serve` did unless told."""
    merged = served_registry_options(state.cluster_dir)
    merged.update({k: v for k, v in options.items() if v is not None})
    return RegistryService(state.cluster_dir, **merged)


def _slurm_options(func, serve=False):
    default = ("/etc/slurm/slurm.conf, or registry.slurm_conf in cluster.yaml" if serve else
               "as the last `registry serve`, else registry.slurm_conf in cluster.yaml, else /etc/slurm/slurm.conf")
    func = click.option("--slurm-conf", type=click.Path(dir_okay=False), default=None,
                        help=f"Where slurm.conf is written (default: {default}).")(func)
    func = click.option("--apply", "slurm_apply", type=click.Choice(APPLY_MODES), default=None,
                        help="How slurmctld is made to take a new slurm.conf (default: "
                             + ("" if serve else "as the last `registry serve`, else ")
                             + "auto: systemd, else the init.d service, else the daemon directly; "
                               "none: write only).")(func)
    return func


def _serve_slurm_options(func):
    return _slurm_options(func, serve=True)


@cli.group("registry", short_help="Run and manage the registry")
def registry_group():
    """Run and manage the registry (the enrolment service on the manager)."""


@registry_group.command("serve")
@click.option("--bind", default=None, metavar="IP:PORT",
              help="Address to listen on (default 0.0.0.0:<registry_port from cluster.yaml>).")
@click.option("--require-approval", is_flag=True, default=None,
              help="New nodes wait as pending until `pibake registry accept HOST` (or the page).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="gunicorn worker processes.")
@click.option("--threads", type=click.IntRange(1, 256), default=32, show_default=True,
              help="Threads per worker (enrolments wait for slurmctld, so several per worker).")
@_serve_slurm_options
@pass_state
def serve_cmd(state, bind, require_approval, workers, threads, slurm_conf, slurm_apply):
    """Serve the registry over HTTPS (gunicorn, TLS from secrets/registry.crt|key) in the foreground.

    Logs go to stderr; SIGTERM or Ctrl-C stops it cleanly."""
    if state.verbosity <= 0:  # a server says what it does: at least INFO for pibake's own loggers
        logging.getLogger("pibake").setLevel(logging.INFO)
    serve(state.cluster_dir, bind=bind, workers=workers, threads=threads,
          require_approval=require_approval, slurm_conf=slurm_conf, slurm_apply=slurm_apply)


def _fmt_mem(mb):
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb} MiB"


@registry_group.command("nodes")
@json_option
@pass_state
def nodes_cmd(state, as_json):
    """List the enrolled nodes (hostname, IP, role, model, CPUs, memory, status, Slurm state)."""
    nodes = _registry(state).nodes()
    if as_json:
        emit_json(nodes)
        return
    if not nodes:
        click.echo("no nodes enrolled yet", err=True)
        return
    header = ("HOSTNAME", "IP", "ROLE", "MODEL", "CPUS", "MEMORY", "STATUS", "SLURM", "LAST SEEN")
    rows = [(n["hostname"], n["ip"], n["role"], n["model"] or "-", str(n["cpus"]), _fmt_mem(n["memory_mb"]),
             n["status"], n["slurm_state"] or "-", n["last_seen"]) for n in nodes]
    for line in text_table([header, *rows]):
        click.echo(line, err=True)


def _admin_action(state, action, hostname, as_json, slurm_conf, slurm_apply):
    node = getattr(_registry(state, slurm_conf=slurm_conf, slurm_apply=slurm_apply), action)(hostname)
    if as_json:
        emit_json(node)
    else:
        click.echo(f"{'accepted' if action == 'accept' else 'removed'} {hostname}", err=True)


@registry_group.command("accept")
@click.argument("hostname")
@json_option
@_slurm_options
@pass_state
def accept_cmd(state, hostname, as_json, slurm_conf, slurm_apply):
    """Accept a node waiting for approval; it becomes a Slurm node."""
    _admin_action(state, "accept", hostname, as_json, slurm_conf, slurm_apply)


@registry_group.command("remove")
@click.argument("hostname")
@json_option
@_slurm_options
@pass_state
def remove_cmd(state, hostname, as_json, slurm_conf, slurm_apply):
    """Remove a node (its credential stops working; it leaves slurm.conf). It may enrol again."""
    _admin_action(state, "remove", hostname, as_json, slurm_conf, slurm_apply)


@registry_group.command("slurm-conf")
@pass_state
def slurm_conf_cmd(state):
    """Print the slurm.conf the registry generates from the enrolled nodes."""
    click.echo(_registry(state).slurm_conf(), nl=False)
