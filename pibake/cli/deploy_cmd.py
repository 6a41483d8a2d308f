"""``pibake deploy``: set up Slurm workers on running machines over ssh (pibake.deploy)."""

import sys

import click

from pibake.api import DEPLOY_CONNECT_TIMEOUT, DEPLOY_IDLE_TIMEOUT, DEPLOY_PARALLEL, deploy, format_deploy_table
from pibake.cli import cli
from pibake.cli.options import json_option, pass_state


@cli.command("deploy", short_help="Set up Slurm on running machines over ssh")
@click.option("--hosts", "hosts", required=True, metavar="HOSTLIST",
              help="Hosts to deploy onto, by name or IP, e.g. 'red[01-04]' or '10.1.1.[11-14]'.")
@click.option("--manager", default=None, metavar="NAME|IP",
              help="How to reach the cluster's manager over ssh, by its name or IP in cluster.yaml (default: "
                   "the manager's entry in --hosts, else cluster.yaml's name). It is set up first when its "
                   "registry does not answer.")
@click.option("--user", default=None, help="ssh login user (default: ssh's, e.g. from ~/.ssh/config); "
                                           "a non-root user needs passwordless sudo.")
@click.option("--parallel", default=DEPLOY_PARALLEL, show_default=True, type=click.IntRange(min=1),
              help="At most this many ssh sessions at once.")
@click.option("--connect-timeout", default=DEPLOY_CONNECT_TIMEOUT, show_default=True, type=click.IntRange(min=1),
              metavar="S", help="ssh ConnectTimeout in seconds.")
@click.option("--idle-timeout", default=DEPLOY_IDLE_TIMEOUT, show_default=True, type=click.IntRange(min=1),
              metavar="S", help="How long to wait for the nodes to become idle in Slurm.")
@click.option("--ssh-option", "ssh_options", multiple=True, metavar="ARG",
              help="Extra ssh argument (repeatable), e.g. --ssh-option=-F --ssh-option=lab_ssh_config "
                   "or --ssh-option=-oProxyJump=bastion.")
@click.option("--wheel", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="The pibake-*.whl a manager being set up installs (default: the pibake you run, built from "
                   "its checkout or its pip installation; cached).")
@json_option
@pass_state
def deploy_cmd(state, hosts, manager, user, parallel, connect_timeout, idle_timeout, ssh_options, wheel,
               as_json):
    """Make running machines Slurm workers over ssh, in parallel, with a result per host.

    \b
    First the manager: left alone when its registry answers, else set up over ssh with the steps of a
    burned manager card (packages, files, pibake from the wheel, registry, agent).
    Per worker: connect, facts, packages (only missing ones), files (only changed ones), agent (enrols,
    configures munge + slurmd), idle (sinfo on the manager, through the registry). Re-running changes
    nothing on hosts that are already right. Exit 0 when every host is idle (and the manager ready),
    1 when any failed.
    """
    def progress(result):
        if state.verbosity >= 0 and result["status"] in ("failed", "changed", "unchanged"):
            detail = result["error"] if result["status"] == "failed" else result["step"]
            click.echo(f"pibake: {result['host']}: {result['status']} ({detail}) "
                       f"after {result['duration_s']:.1f}s", err=True)

    report = deploy(state.cluster_path, hosts, manager=manager, user=user, parallel=parallel,
                    connect_timeout=connect_timeout, ssh_options=ssh_options, idle_timeout=idle_timeout,
                    wheel=wheel, progress=progress)
    if state.verbosity >= 0 or not report.ok:
        click.echo(format_deploy_table(report.hosts), err=True, nl=False)
    if as_json:
        sys.stdout.write(report.to_json())
    sys.exit(report.exit_code)
