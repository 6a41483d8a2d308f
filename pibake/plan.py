"""Hostname/IP plans: ``red[01-04]`` + ``10.1.1.[11-14]`` paired one-to-one with ClusterShell NodeSet.

STUB: being built (issue 2). Signatures are the contract other modules use.
"""

from pibake.errors import NotBuiltError


def plan_nodes(cluster, hostnames, ips, role=None, recorded=()):
    """Pair hostlist and IP list into a list of ``PlannedNode``; raise PlanError listing every problem."""
    raise NotBuiltError("hostlist plans")


def plan_from_inventory(cluster, path, recorded=()):
    """Read a cloudmesh-pi-burn inventory YAML into a list of ``PlannedNode``."""
    raise NotBuiltError("cloudmesh inventories")
