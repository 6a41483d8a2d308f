"""The first-boot agent fetches the node's MQTT broker password from the real registry app (served over TLS
on 127.0.0.1, as in test_enrol.py) and stores it 0400; without MQTT in cluster.yaml it asks and goes on."""

import json
import os
import stat
import threading

import pytest
from werkzeug.serving import make_server

from pibake import mqtt, secrets
from pibake.firstboot import agent
from tests.firstboot.conftest import write_agent_config
from tests.fixtures_plugin import LOOPBACK, new_cluster

pytest.importorskip("pibake.registry.app")


def serve(cluster, tmp_path, etc_dir):
    from pibake.registry.app import create_app

    app = create_app(cluster, test_config={"PIBAKE_MQTT_ETC_DIR": str(etc_dir),
                                           "PIBAKE_MQTT_PID_FILE": str(tmp_path / "no-broker.pid")},
                     slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False)
    sdir = secrets.secrets_dir(cluster)
    server = make_server("127.0.0.1", 0, app, threaded=True,
                         ssl_context=(str(sdir / "registry.crt"), str(sdir / "registry.key")))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.mark.parametrize("enabled", [True, False])
def test_agent_stores_the_mqtt_password(tmp_path, monkeypatch, enabled):
    cluster = new_cluster(tmp_path / "cluster", name="mq", **LOOPBACK,
                          settings={"mqtt": {"enabled": True}} if enabled else None)
    etc = tmp_path / "mosquitto"
    etc.mkdir(mode=0o700)
    server = serve(cluster, tmp_path, etc)
    try:
        nd = tmp_path / "node"
        cfg = write_agent_config(nd, f"https://127.0.0.1:{server.server_port}", secrets.secrets_dir(cluster) / "ca.crt",
                                 secrets.load_join_token(cluster).token, role="sensor",
                                 mqtt_password_file=str(nd / "mqtt-password"))
        (nd / "hosts").write_text("127.0.0.1 localhost\n")
        monkeypatch.setattr(agent, "_user_exists", lambda user: False)  # a sensor: no munge package
        result = agent.run_agent(str(cfg))
        assert result["status"] == "ready" and result["warnings"] == []
        path = nd / "mqtt-password"
        if not enabled:  # the registry answers 404 and the agent goes on without
            assert not path.exists() and "mqtt" not in result
            return
        assert result["mqtt"] == "password stored" and stat.S_IMODE(os.stat(path).st_mode) == 0o400
        password = path.read_text().strip()
        entries = mqtt.parse_password_file((etc / "passwd").read_text())
        assert mqtt.check_password(password, entries[result["hostname"]])
        assert password not in json.dumps(result)
        # a later boot with the credential keeps the password it has (no new one, the broker entry stays)
        again = agent.run_agent(str(cfg))
        assert again["enrolment"] == "credential" and "mqtt" not in again
        assert mqtt.parse_password_file((etc / "passwd").read_text()) == entries
    finally:
        server.shutdown()
        server.server_close()
