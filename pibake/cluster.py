"""cluster.yaml: create, load, validate (one JSON schema; every problem reported with its path).

STUB: being built (issue 2). Signatures are the contract other modules use.
"""

import logging

from pibake.errors import NotBuiltError

LOG = logging.getLogger(__name__)

CLUSTER_FILE = "cluster.yaml"


def init_cluster(cluster_dir, *, manager, manager_ip, network, **options):
    """Create/refresh cluster.yaml and secrets/ in ``cluster_dir``. Returns a JSON-able dict."""
    raise NotBuiltError("pibake init")


def load_cluster(cluster_dir):
    """Read and validate ``cluster_dir``/cluster.yaml; return a ``pibake.model.Cluster``."""
    raise NotBuiltError("loading cluster.yaml")
