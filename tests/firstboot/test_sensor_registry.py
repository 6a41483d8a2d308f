"""The sensor agent against the REAL registry app (helper M's POST /api/v1/readings, real SQLite store), served
over TLS on 127.0.0.1 with the cluster's own certificate: a sensor node enrolled with the join token sends its
buffered readings (the real driver over the simulated bus), they come back from GET /api/v1/sensors/<node>/readings;
the registry stopped for a while loses no reading and stores none twice; the agent's metric list is the
registry's (the agent is a single file and cannot import pibake.sensors_model)."""

import json
import sqlite3
import threading

import pytest
import requests
from werkzeug.serving import make_server

from pibake import secrets
from tests.firstboot.sensorkit import FIXTURES, load_agent
from tests.firstboot.tlsserver import free_port

sa = load_agent()
pytest.importorskip("bme280", reason="test extra RPi.bme280 not installed (pip install -e .[test])")
sensors_model = pytest.importorskip("pibake.sensors_model")


def test_metric_names_and_ranges_match_the_registry():
    registry = {m.name: (m.low, m.high) for m in sensors_model.METRICS.values()}
    assert {name: sa.RANGES[name] for name in sa.METRICS} == registry
    assert sa.MAX_BATCH == sensors_model.MAX_BATCH


class ServedRegistry:
    """The registry app over TLS on a fixed port, which can be stopped and started again (same cluster dir)."""

    def __init__(self, cluster, tmp_path):
        self.cluster, self.tmp = cluster, tmp_path
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from pibake.registry.app import create_app

        app = create_app(self.cluster, slurm_conf=str(self.tmp / "slurm.conf"), slurm_apply="none", slurm_state=False)
        sdir = secrets.secrets_dir(self.cluster)
        self.server = make_server("127.0.0.1", self.port, app, threaded=True,
                                  ssl_context=(str(sdir / "registry.crt"), str(sdir / "registry.key")))
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def call(self, method, path, **kw):
        return requests.request(method, f"{self.url}/api/v1{path}", verify=str(secrets.secrets_dir(self.cluster) /
                                                                              "ca.crt"), timeout=10, **kw)

    def admin(self, path):
        return self.call("GET", path, auth=("admin", secrets.admin_password(self.cluster))).json()


@pytest.fixture
def registry(cluster, tmp_path):
    reg = ServedRegistry(cluster, tmp_path)
    reg.start()
    yield reg
    if reg.server is not None:
        reg.stop()


def enrol_sensor(registry, cluster, node_dir, hostname="red-zero"):
    """What the first-boot agent does: enrol with the join token, keep the per-node credential (0600)."""
    facts = {"hostname": hostname, "mac": "b8:27:eb:00:00:40", "ips": ["127.0.77.40"], "role": "sensor",
             "model": "Raspberry Pi Zero W Rev 1.1", "cpus": 1, "memory_mb": 427,
             "slurmd_c": f"NodeName={hostname} CPUs=1 Boards=1 SocketsPerBoard=1 CoresPerSocket=1 "
                         "ThreadsPerCore=1 RealMemory=427", "os_release": {"ID": "debian"}, "agent_version": "0.1.0"}
    token = secrets.load_join_token(cluster).token
    r = registry.call("POST", "/enrol", json=facts, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    node_dir.mkdir(parents=True, exist_ok=True)
    (node_dir / "node-credential").write_text(r.json()["credential"] + "\n")
    (node_dir / "node-credential").chmod(0o600)
    (node_dir / "agent.json").write_text(json.dumps({
        "registry_url": registry.url, "ca_cert": str(secrets.secrets_dir(cluster) / "ca.crt"), "hostname": hostname,
        "credential_file": str(node_dir / "node-credential")}))


def test_readings_reach_the_registry_and_survive_it_being_away(registry, cluster, tmp_path):
    node = tmp_path / "node"
    enrol_sensor(registry, cluster, node)
    (node / "sensor.json").write_text(json.dumps({
        "sim_bus": str(FIXTURES / "bme280-lab.json"), "bus": 1, "wifi_interface": None,
        "thermal_dir": str(tmp_path / "no-thermal"), "buffer": str(node / "buffer.sqlite3"),
        "agent_config": str(node / "agent.json"), "place": "kitchen", "batch": 2,
        "offsets": {"temperature_c": -0.5}, "backoff_base_s": 0.01, "backoff_max_s": 0.05}))
    settings = sa.load_settings(node / "sensor.json")
    agent = sa.Agent(settings, sa.load_agent_config(settings["agent_config"]))
    for _ in range(3):
        agent.step()
    assert agent.buffer.pending() == 0

    registry.stop()  # the manager reboots: readings pile up in the buffer
    for _ in range(4):
        agent.step()
        agent.shipper.next_try = 0.0
    assert agent.buffer.pending() == 4
    registry.start()
    agent.shipper.next_try = 0.0
    assert agent.shipper.flush() == 4 and agent.buffer.pending() == 0
    agent.close()

    series = registry.admin("/sensors/red-zero/readings?metric=temperature_c")
    assert sum(p["n"] for p in series["points"]) == 7, series  # every reading, each once
    assert {p["min"] for p in series["points"]} == {p["max"] for p in series["points"]} == {24.58}  # 25.08 - 0.5
    db = sqlite3.connect(cluster / "readings.db")
    try:
        assert db.execute("SELECT seq, place FROM readings ORDER BY seq").fetchall() == [
            (seq, "kitchen") for seq in range(1, 8)]
    finally:
        db.close()
    listed = registry.admin("/sensors")
    assert "red-zero" in json.dumps(listed)
    humidity = registry.admin("/sensors/red-zero/readings?metric=humidity_pct")
    assert "39.04" in json.dumps(humidity)


def test_another_nodes_credential_is_refused_and_the_readings_kept(registry, cluster, tmp_path):
    node = tmp_path / "node"
    enrol_sensor(registry, cluster, node)
    (node / "agent.json").write_text(json.dumps({**json.loads((node / "agent.json").read_text()),
                                                 "hostname": "red-other"}))
    settings = {**sa.DEFAULTS, "sim_bus": str(FIXTURES / "bme280-lab.json"), "wifi_interface": None,
                "thermal_dir": str(tmp_path / "none"), "buffer": str(node / "b.sqlite3")}
    agent = sa.Agent(settings, sa.load_agent_config(node / "agent.json"))
    agent.step()
    assert agent.buffer.pending() == 1 and agent.buffer.rejected() == []  # 401: kept for a later credential
    assert "HTTP 401" in agent.shipper.last_problem
    agent.close()
