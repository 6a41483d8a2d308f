"""A manager without python-kasa (Debian has no python3-kasa; the manager installs pibake with --no-deps over
Debian's packages): every path that reaches a Kasa plug says so in one line with the command that fixes it.
The library's absence is made at the one place pibake looks for it (importlib.util.find_spec("kasa"))."""

import json
import subprocess
import sys

import pytest

from pibake import switches
from tests.switches.conftest import write_cluster

HIDE_KASA = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name == "kasa" else real(name, package)
from pibake.cli import main
main(sys.argv[1:])
"""


def expected(prefix):
    return (f"the kasa driver needs python-kasa, which is not installed in {prefix}: install it with "
            f"`{prefix}/bin/pip install python-kasa` (on the manager first `apt-get install python3-aiohttp`; "
            "Debian has no python3-kasa; see docs/switches.md)")


def cli_without_kasa(cluster, *args):
    return subprocess.run([sys.executable, "-c", HIDE_KASA, "--cluster", str(cluster), *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def fan_cluster(tmp_path):
    # 127.0.0.1:9 (discard): nothing is ever sent, the driver stops before any connection
    return write_cluster(tmp_path / "cluster", [{"name": "fan", "driver": "kasa", "address": "127.0.0.1:9",
                                                 "thing": "fan"}])


def test_the_cli_says_what_to_install(fan_cluster):
    prefix = subprocess.run([sys.executable, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True).stdout.strip()
    proc = cli_without_kasa(fan_cluster, "switch", "on", "fan")
    assert proc.returncode == 1 and proc.stderr == f"pibake: error: {expected(prefix)}\n"
    proc = cli_without_kasa(fan_cluster, "switch", "status", "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)[0]["error"] == expected(prefix)
    assert "Traceback" not in proc.stderr
    assert switches.switch_log(fan_cluster) == []  # stopped before the plug: nothing to record as tried


def test_rest_answers_500_with_the_same_line(monkeypatch, tmp_path):
    import importlib.util

    import yaml

    from pibake.cluster import init_cluster
    from pibake.registry.app import create_app
    from tests.registry.conftest import Creds

    cluster = tmp_path / "cluster"
    init_cluster(cluster, manager="localhost", manager_ip="127.0.0.1", network="127.0.0.0/8", name="testlab")
    data = yaml.safe_load((cluster / "cluster.yaml").read_text())
    data["switches"] = [{"name": "fan", "driver": "kasa", "address": "127.0.0.1:9", "thing": "fan"}]
    (cluster / "cluster.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None if name == "kasa"
                        else real(name, package))
    app = create_app(cluster, test_config={"TESTING": True}, slurm_conf=str(tmp_path / "slurm.conf"),
                     slurm_apply="none", slurm_state=False)
    answer = app.test_client().post("/api/v1/switches/fan/on", auth=Creds(cluster).admin)
    assert answer.status_code == 500 and answer.json["error"] == expected(sys.prefix)


BREAK_AIOHTTP = """
import sys
sys.modules["aiohttp"] = None  # python-kasa is installed, Debian's python3-aiohttp is not
from pibake.cli import main
main(sys.argv[1:])
"""


def test_python_kasa_without_aiohttp_is_one_line_too(fan_cluster):
    """python-kasa installed (a card's deps/) but a library it imports missing (python3-aiohttp not installed):
    the same one-line error with the package to install, never an ImportError traceback."""
    prefix = subprocess.run([sys.executable, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True).stdout.strip()
    proc = subprocess.run([sys.executable, "-c", BREAK_AIOHTTP, "--cluster", str(fan_cluster), "switch", "on", "fan"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == (
        f"pibake: error: the kasa driver cannot load python-kasa in {prefix}: it needs the Python module aiohttp, "
        "which is not installed (on the manager: `apt-get install python3-aiohttp`; see docs/switches.md)\n")
    assert switches.switch_log(fan_cluster) == []
