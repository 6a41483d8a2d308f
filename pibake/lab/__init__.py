"""The lab: Pi-like hosts in network namespaces on one Linux machine (see ``pibake.lab.hosts``)."""

from pibake.lab.hosts import (  # noqa: F401
    HostProcess,
    LabError,
    LabHost,
    LabNetwork,
    cleanup_leftovers,
    cleanup_stale,
    run_prefix,
)
