"""Options shared by several commands, as decorators (one place, one wording)."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from pibake.api import NotBuiltError


@dataclass
class CliState:
    cluster_dir: str
    verbosity: int = 0

    @property
    def cluster_path(self):
        return Path(self.cluster_dir)


pass_state = click.make_pass_decorator(CliState)

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (for scripts)."
)

hostname_option = click.option(
    "--hostname", "hostnames", metavar="HOSTLIST",
    help="Hostname or hostlist, e.g. red01 or 'red[01-04]' (RFC 1123 label, lower case).",
)
ip_option = click.option(
    "--ip", "ips", metavar="IPLIST",
    help="IP or IP range paired one-to-one with --hostname, e.g. 10.1.1.11 or '10.1.1.[11-14]'.",
)
role_option = click.option(
    "--role", type=click.Choice(["manager", "worker", "sensor"]), default=None,
    help="Role of the node(s). Default: manager for the cluster's manager name, else worker.",
)
inventory_option = click.option(
    "--inventory", type=click.Path(exists=True, dir_okay=False), default=None,
    help="Read hostnames/IPs from a cloudmesh-pi-burn inventory YAML file instead.",
)


def not_built(what):
    """Raise the plain 'not built yet' error (exit 2)."""
    raise NotBuiltError(what)


def emit_json(obj):
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
