"""The first-boot agent fetches the node's MQTT broker password from the real registry app (served over TLS
on 127.0.0.1, as in test_enrol.py) and stores it 0400; without MQTT in cluster.yaml the munge key answer says
so and the agent does not ask; an older registry (no ``mqtt`` in that answer) is asked and answers 404."""

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


def serve(cluster, tmp_path, etc_dir, requests_seen, *, old_registry=False):
    from pibake.registry.app import create_app

    app = create_app(cluster, test_config={"PIBAKE_MQTT_ETC_DIR": str(etc_dir),
                                           "PIBAKE_MQTT_PID_FILE": str(tmp_path / "no-broker.pid")},
                     slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False)
    inner = app.wsgi_app

    def recording(environ, start_response):
        requests_seen.append(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}")
        return inner(environ, start_response)

    app.wsgi_app = recording
    if old_registry:  # a registry from before the munge key answer said whether the cluster has MQTT
        @app.after_request
        def without_mqtt_flag(response):
            if response.is_json and "mqtt" in (response.get_json() or {}):
                response.set_data(json.dumps({k: v for k, v in response.get_json().items() if k != "mqtt"}))
            return response
    sdir = secrets.secrets_dir(cluster)
    server = make_server("127.0.0.1", 0, app, threaded=True,
                         ssl_context=(str(sdir / "registry.crt"), str(sdir / "registry.key")))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.mark.parametrize("enabled, old_registry", [(True, False), (False, False), (True, True), (False, True)])
def test_agent_stores_the_mqtt_password(tmp_path, monkeypatch, enabled, old_registry):
    cluster = new_cluster(tmp_path / "cluster", name="mq", **LOOPBACK,
                          settings={"mqtt": {"enabled": True}} if enabled else None)
    etc = tmp_path / "mosquitto"
    etc.mkdir(mode=0o700)
    seen = []
    server = serve(cluster, tmp_path, etc, seen, old_registry=old_registry)
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
        asked = "POST /api/v1/mqtt-credential" in seen
        assert asked is (enabled or old_registry)  # "mqtt": false saves the request
        if not enabled:  # not asked, or an older registry answers 404: the agent goes on without
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
