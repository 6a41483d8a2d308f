"""Render a node's NoCloud seed from the role templates. Pure: data in, three texts out.

STUB: being built (issue 2).
"""

from pibake.errors import NotBuiltError


def render_seed(cluster, node, seed_secrets, *, instance_id=None):
    """Return a ``pibake.model.Seed`` for ``node`` (a PlannedNode) in ``cluster``."""
    raise NotBuiltError("seed rendering")
