"""The lab: Pi-like hosts in network namespaces on one Linux machine (see ``pibake.lab.hosts``)."""

from pibake.lab.hosts import LabError, LabHost, LabNetwork, cleanup_leftovers  # noqa: F401
