"""`pibake render`: plan nodes, render + lint their cloud-init NoCloud seeds, write them to a folder."""

import click

from pibake import api
from pibake.cli import cli
from pibake.cli.options import (
    emit_json, hostname_option, inventory_option, ip_option, json_option, pass_state, role_option,
)


@cli.command("render", short_help="Render and lint the cloud-init NoCloud seed of node(s) into a folder.")
@hostname_option
@ip_option
@role_option
@inventory_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder to write DIR/<hostname>/{user-data,meta-data,network-config} into.")
@json_option
@pass_state
def render_cmd(state, hostnames, ips, role, inventory, out_dir, as_json):
    """Render the cloud-init NoCloud seed (user-data, meta-data, network-config) of one or more nodes.

    Every seed is checked against the installed cloud-init's JSON schema and pibake's own checks
    before anything is written; one failing seed and nothing is written. Seed files are 0600: they
    carry the join token (the manager's also the cluster's secrets).

    \b
    Examples:
      pibake render --hostname red01 --ip 10.1.1.11 --out seeds
      pibake render --hostname 'red[01-03]' --ip '10.1.1.[11-13]' --out seeds --json
      pibake render --hostname red00 --ip 10.1.1.10 --out seeds          (the manager: role from cluster.yaml)
      pibake render --inventory inventory.yaml --out seeds
    """
    results = api.render_seeds(state.cluster_dir, out_dir, hostnames=hostnames, ips=ips, role=role,
                               inventory=inventory)
    if as_json:
        emit_json(results)
    for result in results:
        click.echo(f"{result['hostname']} ({result['role']}, {result['ip']}): wrote "
                   f"{result['paths']['user-data'].rsplit('/', 1)[0]}/ (instance-id {result['instance_id']})",
                   err=True)
        for warning in result["warnings"]:
            click.echo(f"  warning: {warning}", err=True)
