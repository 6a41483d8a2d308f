"""Options shared by several commands, as decorators (one place, one wording)."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from pibake.api import NotBuiltError, fields


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

class FieldType(click.ParamType):
    """An option value checked by its field's validator (``pibake.fields``, the one cluster.yaml, seeds and the
    registry use) and normalised; a bad value is that field's one message: ``pibake: error: --opt: ...``.
    With ``separator`` the value is a list (``--dns 1.1.1.1,9.9.9.9``), each item checked."""

    def __init__(self, field, separator=None):
        self.field = field
        self.name = field.name
        self.separator = separator

    def convert(self, value, param, ctx):
        where = param.opts[0] if param is not None and param.opts else self.name
        if self.separator is None:
            return self.field.check(value, where)
        items = [item.strip() for item in str(value).split(self.separator) if item.strip()]
        return self.separator.join(str(self.field.check(item, where)) for item in items)


HOSTNAME = FieldType(fields.HOSTNAME)
CLUSTER_NAME = FieldType(fields.CLUSTER_NAME)
IPV4 = FieldType(fields.IPV4)
IPV4_LIST = FieldType(fields.IPV4, separator=",")
NETWORK = FieldType(fields.NETWORK)
USERNAME = FieldType(fields.USERNAME)
TIMEZONE = FieldType(fields.TIMEZONE)
LOCALE = FieldType(fields.LOCALE)
COUNTRY = FieldType(fields.COUNTRY)
SSID = FieldType(fields.SSID)

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
