"""flaskr-style fixtures: a real cluster directory (pibake init), a real SQLite store, the real app."""

import base64
import logging
import re

import pytest

from pibake.registry.app import create_app
from pibake.secrets import admin_password, load_join_token, munge_key_b64
from tests.fixtures_plugin import slurmd_c

# `slurmd -C` of each board kind, from the one corpus (tests/fixtures/slurm/README.md), as templates for
# ``.format(h=hostname)``; MEMORY: their RealMemory.
BOARDS = {"pi3": "pi3bplus", "pi4": "pi4b-4g", "pi4-8g": "pi4b-8g", "pi5": "pi5b", "vm": "vm"}
SLURMD_C = {kind: slurmd_c(board, "{h}") for kind, board in BOARDS.items()}
MODELS = {"pi3": "Raspberry Pi 3 Model B Plus Rev 1.3", "pi4": "Raspberry Pi 4 Model B Rev 1.4",
          "pi4-8g": "Raspberry Pi 4 Model B Rev 1.5", "pi5": "Raspberry Pi 5 Model B Rev 1.0", "vm": "vm"}
MEMORY = {kind: int(re.search(r"RealMemory=(\d+)", text).group(1)) for kind, text in SLURMD_C.items()}


def enrolment(hostname="red01", index=1, kind="pi4", ip=None, mac=None, role="worker"):
    return {
        "hostname": hostname,
        "mac": mac or f"dc:a6:32:00:00:{index:02x}",
        "ips": [ip or f"127.0.77.{index}"],
        "role": role,
        "model": MODELS[kind],
        "cpus": 4 if kind != "vm" else 2,
        "memory_mb": MEMORY[kind],
        "slurmd_c": SLURMD_C[kind].format(h=hostname),
        "os_release": {"ID": "debian", "VERSION_CODENAME": "bookworm"},
        "agent_version": "0.1.0",
    }


@pytest.fixture
def cluster_dir(loopback_cluster):
    return loopback_cluster


@pytest.fixture
def app_options(tmp_path):
    return {"slurm_conf": str(tmp_path / "etc" / "slurm.conf"), "slurm_apply": "none", "slurm_state": False}


def no_real_job(cluster_dir, params, progress):
    """The registry tests' job function unless a test passes its own: never deploy or verify for real (a
    request's host list would get ssh connections)."""
    raise RuntimeError("this test's app runs no real jobs; pass job_functions= to create_app")


@pytest.fixture
def app(cluster_dir, app_options):
    return create_app(cluster_dir, test_config={"TESTING": True},
                      job_functions=dict.fromkeys(("deploy", "verify", "recover"), no_real_job), **app_options)


@pytest.fixture
def client(app):
    return app.test_client()


class Creds:
    def __init__(self, cluster_dir):
        self.cluster_dir = cluster_dir
        self.token = load_join_token(cluster_dir).token
        self.admin = ("admin", admin_password(cluster_dir))
        self.munge_b64 = munge_key_b64(cluster_dir)

    @property
    def join(self):
        return {"Authorization": f"Bearer {self.token}"}

    def secrets(self):
        """Every secret string that must never appear in a response or a log line."""
        return [self.token, self.token.split("::")[1], self.admin[1], self.munge_b64,
                base64.b64decode(self.munge_b64)[:24].hex()]


@pytest.fixture
def creds(cluster_dir):
    return Creds(cluster_dir)


@pytest.fixture
def all_logs(caplog):
    """Every log record of the run (the CLI may have made the pibake logger non-propagating)."""
    logger = logging.getLogger("pibake")
    saved = logger.propagate, logger.level
    logger.propagate = True
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pibake")
    yield caplog
    logger.propagate, logger.level = saved


@pytest.fixture
def slurm_sandbox():
    """A private munged + slurmctld setup (see slurm_fixture.SlurmSandbox); stopped and removed after."""
    from tests.registry.slurm_fixture import SlurmSandbox

    box = SlurmSandbox()
    try:
        box.start_munge()
        yield box
    finally:
        box.stop()


@pytest.fixture
def slurm_sandbox_without_munge():
    """A slurm_sandbox whose munged the test starts itself (``box.start_munge()``), or never."""
    from tests.registry.slurm_fixture import SlurmSandbox

    box = SlurmSandbox()
    try:
        yield box
    finally:
        box.stop()
