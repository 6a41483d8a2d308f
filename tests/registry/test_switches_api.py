"""REST /api/v1/switches and /recover on the real app: admin only, the state read back from a real plug
(the npm Kasa simulator) and from the Shelly fake, faults as JSON errors, node plugs only through /recover."""

import yaml

from pibake import switches
from tests.switches.conftest import kasa_plug, needs_kasa_simulator, shelly  # noqa: F401  (fixtures)


def add_switches(cluster_dir, entries):
    path = cluster_dir / "cluster.yaml"
    data = yaml.safe_load(path.read_text())
    data["switches"] = entries
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@needs_kasa_simulator
def test_switches_over_rest(client, creds, cluster_dir, kasa_plug, shelly):  # noqa: F811
    add_switches(cluster_dir, [
        {"name": "lamp", "driver": "kasa", "address": kasa_plug.address, "thing": "lamp", "timeout": 2},
        {"name": "pi1", "driver": "shelly", "address": shelly.address, "node": "red01", "timeout": 2},
    ])
    assert client.get("/api/v1/switches").status_code == 401
    listed = client.get("/api/v1/switches", auth=creds.admin).json
    assert [s["name"] for s in listed] == ["lamp", "pi1"]

    on = client.post("/api/v1/switches/lamp/on", auth=creds.admin)
    assert on.status_code == 200 and on.json["state"]["on"] is True and on.json["state"]["power_w"] > 0
    assert client.get("/api/v1/switches/lamp", auth=creds.admin).json["state"]["on"] is True
    assert client.post("/api/v1/switches/lamp/toggle", auth=creds.admin).json["state"]["on"] is False

    refused = client.get("/api/v1/switches/pi1", auth=creds.admin)  # no credentials stored for the Shelly
    assert refused.status_code == 502 and "refused the credentials" in refused.json["error"]
    switches.set_credentials(cluster_dir, "pi1", password="shelly-pass-1")
    assert client.post("/api/v1/switches/pi1/on", auth=creds.admin).json["state"]["on"] is True
    cycle = client.post("/api/v1/switches/pi1/cycle", auth=creds.admin)
    assert cycle.status_code == 409 and "POST /api/v1/recover" in cycle.json["error"]
    assert shelly.output is True

    assert client.get("/api/v1/switches/nope", auth=creds.admin).status_code == 404
    assert client.post("/api/v1/switches/lamp/explode", auth=creds.admin).status_code == 404
    kasa_plug.stop()
    down = client.post("/api/v1/switches/lamp/on", auth=creds.admin)
    assert down.status_code == 502 and "cannot reach the device" in down.json["error"]

    log = client.get("/api/v1/switches/log", auth=creds.admin).json
    assert [(e["switch"], e["action"], e["by"], e["ok"]) for e in log] == [
        ("lamp", "on", "rest", True), ("lamp", "toggle", "rest", True), ("pi1", "on", "rest", True),
        ("lamp", "on", "rest", False)]
    assert "shelly-pass-1" not in str(log)


def test_recover_is_a_job_and_refuses_a_bad_body(client, creds):
    assert client.post("/api/v1/recover", json={}, auth=creds.admin).status_code == 400
    assert client.post("/api/v1/recover", json={"node": "red01", "colour": 1}, auth=creds.admin).status_code == 400
    assert client.post("/api/v1/recover", json={"node": "red01", "force": "yes"}, auth=creds.admin).status_code == 400
    assert client.post("/api/v1/recover", json={"node": "red01"}).status_code == 401


def test_a_recover_job_fails_saying_why(cluster_dir, app_options, creds, no_remote_connections):
    """The real recover job (the conftest app runs none): it refuses before any connection is made."""
    from pibake.jobs import MANAGER_FUNCTIONS
    from pibake.registry.app import create_app

    app = create_app(cluster_dir, test_config={"TESTING": True},
                     job_functions={"recover": MANAGER_FUNCTIONS["recover"]}, **app_options)
    client = app.test_client()
    job = client.post("/api/v1/recover", json={"node": "red01", "wait_s": 5}, auth=creds.admin)
    assert job.status_code == 202 and job.json["kind"] == "recover"
    done = app.extensions["pibake_jobs"].wait(job.json["id"], timeout=60)
    assert done["state"] == "failed" and "no switch in cluster.yaml powers red01" in done["error"]


@needs_kasa_simulator
def test_switches_page_rest_block(client, creds, cluster_dir, kasa_plug):  # noqa: F811
    """docs/switches.md, block sw-rest: each curl line's method and path, sent to the real app with the admin
    credential (the test client stands in for TLS to red00:8443)."""
    import re
    import shlex
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "switches.md").read_text()
    lines = re.search(r"```sh\n# doc-test: sw-rest\n(.*?)```", page, re.S).group(1).strip().splitlines()
    add_switches(cluster_dir, [{"name": "fan", "driver": "kasa", "address": kasa_plug.address, "thing": "fan"}])
    answers = []
    for line in lines:
        words = shlex.split(line)
        assert words[:3] == ["curl", "--cacert", "secrets/ca.crt"] and words[3] == "-u"
        method = words[words.index("-X") + 1] if "-X" in words else "GET"
        path = words[-1].split(":8443", 1)[1]
        answers.append(client.open(path, method=method, auth=creds.admin))
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json[0]["name"] == "fan" and answers[1].json["state"]["on"] is True
    assert answers[2].json[-1]["action"] == "on"
