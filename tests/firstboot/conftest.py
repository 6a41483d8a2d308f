import json

import pytest

from pibake import secrets


@pytest.fixture
def cluster(loopback_cluster):
    """The cluster the registry these tests serve belongs to (manager 127.0.0.1), new for each test."""
    return loopback_cluster


@pytest.fixture(scope="session")
def cluster_a(tmp_path_factory):
    """Secrets of a cluster whose registry certificate names 127.0.0.1 (manager "localhost")."""
    d = tmp_path_factory.mktemp("cluster-a")
    secrets.ensure_secrets(d, "a", "localhost", "127.0.0.1")
    return d


@pytest.fixture(scope="session")
def cluster_b(tmp_path_factory):
    """Another cluster: another CA."""
    d = tmp_path_factory.mktemp("cluster-b")
    secrets.ensure_secrets(d, "b", "localhost", "127.0.0.1")
    return d


def write_agent_config(node_dir, registry_url, ca_crt, token, **extra):
    """An agent config whose every path lives under ``node_dir`` (a stand-in for the node's /)."""
    node_dir.mkdir(parents=True, exist_ok=True)
    (node_dir / "boot").mkdir(exist_ok=True)
    ca_path = node_dir / "ca.crt"
    ca_path.write_bytes(ca_crt.read_bytes())
    config = {
        "registry_url": registry_url, "join_token": token, "ca_cert": str(ca_path),
        "hostname": "red01", "role": "worker", "manager": "localhost", "manager_ip": "127.0.0.1",
        "credential_file": str(node_dir / "node-credential"), "state_file": str(node_dir / "agent-state.json"),
        "boot_dir": str(node_dir / "boot"), "hosts_file": str(node_dir / "hosts"),
        "munge_key_file": str(node_dir / "munge.key"), "slurmd_defaults_file": str(node_dir / "default-slurmd"),
        "systemd_dropin_dir": str(node_dir / "slurmd.service.d"),
        "scrub_paths": [str(node_dir / "boot" / "user-data")], "services": "none",
        "deadline_s": 0, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
    }
    config.update(extra)
    path = node_dir / "agent.json"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class FakeTime:
    """Injected clock and sleep: retries are tested without waiting."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds
