"""`pibake registry nodes|accept|remove|slurm-conf` against a real cluster directory and store."""

import json
import subprocess
import sys

from pibake.registry.app import create_app
from tests.registry.conftest import enrolment


def pibake(cluster_dir, *args):
    return subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(cluster_dir), "registry", *args],
                          capture_output=True, text=True, timeout=60)


def test_nodes_accept_remove(cluster_dir, tmp_path, creds):
    conf = tmp_path / "slurm.conf"
    app = create_app(cluster_dir, require_approval=True, slurm_conf=str(conf), slurm_apply="none",
                     slurm_state=False)
    client = app.test_client()
    client.post("/api/v1/enrol", json=enrolment("red01", 1, kind="pi4"), headers=creds.join)
    client.post("/api/v1/enrol", json=enrolment("red02", 2, kind="pi5"), headers=creds.join)

    out = pibake(cluster_dir, "nodes", "--json")
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout)
    assert [(n["hostname"], n["status"]) for n in nodes] == [("red01", "pending"), ("red02", "pending")]

    human = pibake(cluster_dir, "nodes")
    assert human.returncode == 0 and human.stdout == ""
    assert "red02" in human.stderr and "Raspberry Pi 5 Model B Rev 1.0" in human.stderr and "7.9 GiB" in human.stderr

    accepted = pibake(cluster_dir, "accept", "red01", "--apply", "none", "--slurm-conf", str(conf), "--json")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["status"] == "enrolled"
    assert "NodeName=red01 NodeAddr=127.0.77.1 " in conf.read_text()
    assert "red02" not in conf.read_text()

    text = pibake(cluster_dir, "slurm-conf")
    assert text.returncode == 0 and text.stdout == conf.read_text()

    removed = pibake(cluster_dir, "remove", "red01", "--apply", "none", "--slurm-conf", str(conf))
    assert removed.returncode == 0 and "removed red01" in removed.stderr
    assert "NodeName=" not in conf.read_text()
    assert [n["hostname"] for n in json.loads(pibake(cluster_dir, "nodes", "--json").stdout)] == ["red02"]


def test_unknown_host_is_one_line_error(cluster_dir):
    for action in ("accept", "remove"):
        out = pibake(cluster_dir, action, "red77", "--apply", "none")
        assert out.returncode == 1
        assert out.stderr.strip() == "pibake: error: no node named red77 is enrolled"


def test_missing_cluster_is_one_line_error(tmp_path):
    out = pibake(tmp_path / "nowhere", "nodes")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("pibake: error:") and len(out.stderr.strip().splitlines()) == 1


def test_serve_refuses_bad_bind(cluster_dir):
    out = pibake(cluster_dir, "serve", "--bind", "127.0.0.1:99999", "--apply", "none")
    assert out.returncode == 1 and "port must be a number from 1 to 65535" in out.stderr
