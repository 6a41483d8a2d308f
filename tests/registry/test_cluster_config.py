"""The registry parses cluster.yaml once per process (``RegistryService.cluster_config``) and again only when
the file changes: an edit made while the registry runs is seen by the next request."""

import yaml

from pibake.registry import service
from pibake.registry.app import create_app
from pibake.secrets import load_join_token
from tests.registry.conftest import enrolment, no_real_job


def count_loads(monkeypatch):
    calls = []
    real = service.load_cluster

    def counting(cluster_dir):
        calls.append(cluster_dir)
        return real(cluster_dir)

    monkeypatch.setattr(service, "load_cluster", counting)
    return calls


def set_mqtt(cluster_dir, enabled):
    path = cluster_dir / "cluster.yaml"
    data = yaml.safe_load(path.read_text())
    data["mqtt"] = {"enabled": enabled}
    path.write_text(yaml.safe_dump(data))


def test_cluster_config_is_parsed_once_and_again_after_an_edit(cluster_dir, app_options, monkeypatch):
    reg = service.RegistryService(cluster_dir, **app_options)
    calls = count_loads(monkeypatch)
    first = reg.cluster_config()
    assert all(reg.cluster_config() is first for _ in range(5))
    assert len(calls) == 1
    set_mqtt(cluster_dir, not first.mqtt.enabled)
    edited = reg.cluster_config()
    assert edited.mqtt.enabled is not first.mqtt.enabled and len(calls) == 2
    assert reg.cluster_config() is edited and len(calls) == 2


def test_mqtt_credential_sees_mqtt_turned_on_while_the_registry_runs(cluster_dir, app_options, tmp_path,
                                                                       monkeypatch):
    etc = tmp_path / "mosquitto"
    etc.mkdir(mode=0o700)
    set_mqtt(cluster_dir, False)
    app = create_app(cluster_dir, test_config={"TESTING": True, "PIBAKE_MQTT_ETC_DIR": str(etc),
                                               "PIBAKE_MQTT_PID_FILE": str(tmp_path / "no-broker.pid")},
                     job_functions=dict.fromkeys(("deploy", "verify", "recover"), no_real_job), **app_options)
    client = app.test_client()
    resp = client.post("/api/v1/enrol", json=enrolment("red01", 1),
                       headers={"Authorization": f"Bearer {load_join_token(cluster_dir).token}"})
    auth = ("red01", resp.get_json()["credential"])
    calls = count_loads(monkeypatch)
    assert client.post("/api/v1/mqtt-credential", auth=auth, json={}).status_code == 404
    assert client.post("/api/v1/mqtt-credential", auth=auth, json={}).status_code == 404
    set_mqtt(cluster_dir, True)
    for _ in range(2):
        resp = client.post("/api/v1/mqtt-credential", auth=auth, json={})
        assert resp.status_code == 200 and resp.get_json()["username"] == "red01"
    assert "red01:" in (etc / "passwd").read_text()
    assert len(calls) == 2  # once before the edit, once after: not once per request


def test_munge_key_answer_says_whether_the_cluster_has_mqtt(cluster_dir, app, client, creds):
    resp = client.post("/api/v1/enrol", json=enrolment("red01", 1), headers=creds.join)
    auth = ("red01", resp.get_json()["credential"])
    for enabled in (False, True, False):
        set_mqtt(cluster_dir, enabled)
        body = client.get("/api/v1/munge-key", auth=auth).get_json()
        assert body["mqtt"] is enabled and body["munge_key_b64"] == creds.munge_b64
