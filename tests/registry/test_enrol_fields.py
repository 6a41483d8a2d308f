"""The registry refuses, through the real app, the enrolments cluster.yaml and seeds refuse (pibake.fields;
the property tests over every entry point: tests/test_fields.py)."""

import pytest

from pibake import fields
from tests.registry.conftest import enrolment


@pytest.mark.parametrize("hostname", ["1234", "admin", "red01\n", "Red01"])
def test_the_registry_refuses_what_cluster_yaml_refuses(client, creds, hostname):
    """Through the real app: an enrolment the cluster could never have burned is a 400 with the one message."""
    r = client.post("/api/v1/enrol", json=enrolment(hostname=hostname), headers=creds.join)
    assert r.status_code == 400, r.json
    assert f"hostname: {fields.HOSTNAME.problem(hostname)}" in r.json["problems"]
