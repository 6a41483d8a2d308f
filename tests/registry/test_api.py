"""REST API against a real cluster directory and a real SQLite store (Flask test client)."""

import datetime as dt
import json
import sqlite3
import threading

import pytest

from pibake.registry.app import create_app
from pibake.registry.store import SCHEMA_VERSION
from tests.registry.conftest import enrolment

NOW_EXPIRED = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)


@pytest.fixture
def enrolled(client, creds):
    """red01 and red02 enrolled; returns {hostname: credential}."""
    out = {}
    for i, name in enumerate(("red01", "red02"), start=1):
        r = client.post("/api/v1/enrol", json=enrolment(name, i), headers=creds.join)
        assert r.status_code == 201, r.json
        out[name] = r.json["credential"]
    return out


def _auth_headers(kind, creds, enrolled):
    import base64

    def basic(user, pw):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}

    return {
        "none": {},
        "bearer-wrong": {"Authorization": "Bearer K10" + "0" * 64 + "::abcdef." + "x" * 32},
        "join": creds.join,
        "admin-wrong": basic("admin", "not-the-password"),
        "node-wrong": basic("red01", "not-the-credential"),
        "unknown-node": basic("red99", enrolled["red01"]),
        "node": basic("red01", enrolled["red01"]),
        "other-node": basic("red02", enrolled["red02"]),
        "admin": basic(*creds.admin),
    }[kind]


KINDS = ("none", "bearer-wrong", "join", "admin-wrong", "node-wrong", "unknown-node", "node", "other-node",
         "admin")

# (method, path, body, {credential kind: expected status})
MATRIX = [
    ("GET", "/api/v1/health", None, dict.fromkeys(KINDS, 200)),
    ("GET", "/api/v1/openapi.json", None, dict.fromkeys(KINDS, 200)),
    ("POST", "/api/v1/enrol", enrolment("red03", 3),
     {**dict.fromkeys(KINDS, 401), "join": 201}),
    ("GET", "/api/v1/munge-key", None,
     {**dict.fromkeys(KINDS, 401), "node": 200, "other-node": 200, "admin": 403}),
    ("GET", "/api/v1/slurm.conf", None,
     {**dict.fromkeys(KINDS, 401), "node": 200, "other-node": 200, "admin": 200}),
    ("POST", "/api/v1/nodes/red01/status", {"state": "ready", "message": "slurmd up"},
     {**dict.fromkeys(KINDS, 401), "node": 200, "other-node": 403, "admin": 403}),
    ("GET", "/api/v1/nodes", None, {**dict.fromkeys(KINDS, 401), "node": 403, "other-node": 403, "admin": 200}),
    ("GET", "/api/v1/nodes/red01", None,
     {**dict.fromkeys(KINDS, 401), "node": 403, "other-node": 403, "admin": 200}),
    ("DELETE", "/api/v1/nodes/red01", None,
     {**dict.fromkeys(KINDS, 401), "node": 403, "other-node": 403, "admin": 200}),
    ("POST", "/api/v1/nodes/red01/accept", None,
     {**dict.fromkeys(KINDS, 401), "node": 403, "other-node": 403, "admin": 200}),
]
CASES = [(m, p, b, k, exp[k]) for (m, p, b, exp) in MATRIX for k in KINDS]


@pytest.mark.parametrize("method,path,body,kind,expected", CASES,
                         ids=[f"{m} {p} as {k}" for (m, p, _, k, _) in CASES])
def test_auth_matrix(client, creds, enrolled, all_logs, method, path, body, kind, expected):
    headers = _auth_headers(kind, creds, enrolled)
    r = client.open(path, method=method, json=body, headers=headers)
    assert r.status_code == expected, r.get_data(as_text=True)
    text = r.get_data(as_text=True)
    if expected >= 400:
        assert r.is_json and set(r.json) >= {"error"} and r.json["error"]
    secrets = creds.secrets() + list(enrolled.values())
    if path.endswith("/munge-key") and expected == 200:
        assert r.json["munge_key_b64"] == creds.munge_b64  # the one place the key is served
        secrets.remove(creds.munge_b64)
    if path.endswith("/enrol") and expected == 201:
        secrets = [s for s in secrets if s != r.json["credential"]]
    for secret in secrets:
        assert secret not in text
    logs = "\n".join(rec.getMessage() for rec in all_logs.records)
    for secret in creds.secrets() + list(enrolled.values()):
        assert secret not in logs


def test_enrol_returns_credential_and_conf_server(client, creds):
    r = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join)
    assert r.status_code == 201
    body = r.json
    assert body["hostname"] == "red01" and body["status"] == "enrolled" and len(body["credential"]) >= 32
    assert body["slurm"] == {"conf_server": "localhost:6817", "manager": "localhost", "manager_ip": "127.0.0.1"}


def test_credential_is_stored_hashed(client, creds, cluster_dir):
    cred = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join).json["credential"]
    raw = (cluster_dir / "registry.db").read_bytes()
    conn = sqlite3.connect(cluster_dir / "registry.db")
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert cred.encode() not in raw and cred not in dump
    assert "sha256$" in dump


def test_reenrol_same_mac_updates_without_duplicate(client, creds):
    first = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join)
    changed = enrolment("red01", ip="127.0.77.50")
    changed["agent_version"] = "0.2.0"
    second = client.post("/api/v1/enrol", json=changed, headers=creds.join)
    assert (first.status_code, second.status_code) == (201, 200)
    nodes = client.get("/api/v1/nodes", auth=creds.admin).json
    assert [n["hostname"] for n in nodes] == ["red01"]
    assert nodes[0]["ip"] == "127.0.77.50" and nodes[0]["agent_version"] == "0.2.0"
    assert nodes[0]["enrol_count"] == 2
    # the new credential works, the old one no longer does
    assert client.get("/api/v1/munge-key", auth=("red01", second.json["credential"])).status_code == 200
    assert client.get("/api/v1/munge-key", auth=("red01", first.json["credential"])).status_code == 401


def test_mac_is_normalized(client, creds):
    body = enrolment("red01", mac="DC-A6-32-00-00-01")
    assert client.post("/api/v1/enrol", json=body, headers=creds.join).status_code == 201
    again = enrolment("red01", mac="dc:a6:32:00:00:01")
    assert client.post("/api/v1/enrol", json=again, headers=creds.join).status_code == 200


def test_other_mac_conflicts_until_removed(client, creds):
    assert client.post("/api/v1/enrol", json=enrolment("red01", 1), headers=creds.join).status_code == 201
    other = enrolment("red01", 2)
    r = client.post("/api/v1/enrol", json=other, headers=creds.join)
    assert r.status_code == 409 and "pibake registry remove red01" in r.json["error"]
    assert client.delete("/api/v1/nodes/red01", auth=creds.admin).status_code == 200
    assert client.post("/api/v1/enrol", json=other, headers=creds.join).status_code == 201


def test_removed_node_credential_is_refused(client, creds):
    cred = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join).json["credential"]
    client.delete("/api/v1/nodes/red01", auth=creds.admin)
    r = client.get("/api/v1/munge-key", auth=("red01", cred))
    assert r.status_code == 401 and "enrol again" in r.json["error"]


def test_expired_join_token_is_refused(cluster_dir, app_options, creds):
    app = create_app(cluster_dir, test_config={"PIBAKE_NOW": NOW_EXPIRED}, **app_options)
    r = app.test_client().post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join)
    assert r.status_code == 401
    assert "expired" in r.json["error"] and "pibake token rotate" in r.json["error"]


def test_expired_join_token_record_is_refused(client, creds, cluster_dir, all_logs):
    from pibake.secrets import rotate_join_token

    token = rotate_join_token(cluster_dir, ttl=dt.timedelta(seconds=-1)).token  # expired when written
    r = client.post("/api/v1/enrol", json=enrolment("red01"), headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and "expired" in r.json["error"]
    assert "enrolment refused from 127.0.0.1" in all_logs.text and token not in all_logs.text


def test_rotated_join_token_refuses_the_old_one(client, creds, cluster_dir):
    from pibake.secrets import rotate_join_token

    old = creds.join
    new = rotate_join_token(cluster_dir).token
    assert client.post("/api/v1/enrol", json=enrolment("red01"), headers=old).status_code == 401
    r = client.post("/api/v1/enrol", json=enrolment("red01"), headers={"Authorization": f"Bearer {new}"})
    assert r.status_code == 201


BAD_ENROLMENTS = [
    ({"hostname": "Red01"}, "hostname:"),
    ({"hostname": "a\n  runcmd: [reboot]"}, "hostname:"),
    ({"hostname": "admin"}, "hostname: 'admin' is not a valid hostname"),  # the administrator's account
    ({"hostname": "1234"}, "hostname: '1234' is not a valid hostname"),
    ({"mac": "zz:zz"}, "mac:"),
    ({"ips": []}, "ips:"),
    ({"ips": ["10.1.1.300"]}, "ips[0]:"),
    ({"role": "boss"}, "role:"),
    ({"cpus": 0}, "cpus:"),
    ({"cpus": True}, "cpus:"),
    ({"memory_mb": "4096"}, "memory_mb:"),
    ({"slurmd_c": "UpTime=0-00:00:01"}, "NodeName="),
    ({"slurmd_c": "NodeName=x CPUs=4"}, "lacks CoresPerSocket"),
    ({"slurmd_c": "NodeName=x CPUs=four CoresPerSocket=4 ThreadsPerCore=1 RealMemory=1"}, "CPUs=four"),
    ({"os_release": "debian"}, "os_release:"),
    ({"slurmd_c": None}, "slurmd_c: must be the text printed by `slurmd -C` (required for workers)"),
]


@pytest.mark.parametrize("change,message", BAD_ENROLMENTS)
def test_bad_enrolment_names_the_problem(client, creds, change, message):
    body = {**enrolment("red01"), **change}
    r = client.post("/api/v1/enrol", json=body, headers=creds.join)
    assert r.status_code == 400
    assert message in r.json["error"]
    assert client.get("/api/v1/health").json["nodes"] == 0


def test_a_sensor_without_slurmd_enrols_and_stays_out_of_slurm_conf(client, creds):
    body = {**enrolment("red09"), "role": "sensor", "slurmd_c": None}
    r = client.post("/api/v1/enrol", json=body, headers=creds.join)
    assert r.status_code == 201, r.json
    assert client.get("/api/v1/health").json["nodes"] == 1
    assert "red09" not in client.get("/api/v1/slurm.conf", auth=creds.admin).get_data(as_text=True)


def test_every_problem_is_reported_at_once(client, creds):
    r = client.post("/api/v1/enrol", json={"hostname": "BAD", "mac": "x"}, headers=creds.join)
    assert r.status_code == 400
    fields = [p.split(":")[0] for p in r.json["problems"]]
    assert fields[:4] == ["hostname", "mac", "ips", "cpus"]


@pytest.mark.parametrize("data,ctype", [("not json", "application/json"), ("[1, 2]", "application/json"),
                                        ("hostname=red01", "application/x-www-form-urlencoded")])
def test_non_json_bodies_are_400(client, creds, data, ctype):
    r = client.post("/api/v1/enrol", data=data, headers={**creds.join, "Content-Type": ctype})
    assert r.status_code == 400 and r.is_json


def test_oversized_body_is_413(client, creds):
    body = enrolment("red01")
    body["model"] = "x" * 300_000
    r = client.post("/api/v1/enrol", json=body, headers=creds.join)
    assert r.status_code == 413 and r.is_json


def test_unknown_route_and_method_are_json(client, creds):
    assert client.get("/api/v1/nope").status_code == 404
    r = client.put("/api/v1/enrol", headers=creds.join)
    assert r.status_code == 405 and r.is_json


def test_unknown_node_is_404_for_admin(client, creds):
    for method, path in (("GET", "/api/v1/nodes/red77"), ("DELETE", "/api/v1/nodes/red77"),
                         ("POST", "/api/v1/nodes/red77/accept")):
        r = client.open(path, method=method, auth=creds.admin)
        assert r.status_code == 404 and "red77" in r.json["error"]


def test_status_report_validation(client, creds):
    cred = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join).json["credential"]
    r = client.post("/api/v1/nodes/red01/status", json={"state": "happy"}, auth=("red01", cred))
    assert r.status_code == 400 and "state:" in r.json["error"]
    r = client.post("/api/v1/nodes/red01/status", json={"state": "error", "message": "slurmd failed"},
                    auth=("red01", cred))
    assert r.status_code == 200 and r.json["status"] == "error" and r.json["message"] == "slurmd failed"


# --------------------------------------------------------------------------- approval mode


@pytest.fixture
def approval_client(cluster_dir, app_options):
    return create_app(cluster_dir, require_approval=True, **app_options).test_client()


def test_approval_flow(approval_client, creds, tmp_path):
    client = approval_client
    r = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join)
    assert r.status_code == 201 and r.json["status"] == "pending"
    cred = r.json["credential"]
    assert client.get("/api/v1/munge-key", auth=("red01", cred)).status_code == 403
    r = client.post("/api/v1/nodes/red01/status", json={"state": "ready"}, auth=("red01", cred))
    assert r.status_code == 403 and "pending" in r.json["error"]
    conf = client.get("/api/v1/slurm.conf", auth=creds.admin).get_data(as_text=True)
    assert "NodeName=red01" not in conf  # pending nodes are not Slurm nodes
    # a pending node re-enrolling stays pending
    r = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join)
    assert r.status_code == 200 and r.json["status"] == "pending"
    cred = r.json["credential"]
    r = client.post("/api/v1/nodes/red01/accept", auth=creds.admin)
    assert r.status_code == 200 and r.json["status"] == "enrolled"
    assert client.get("/api/v1/munge-key", auth=("red01", cred)).status_code == 200
    conf = client.get("/api/v1/slurm.conf", auth=creds.admin).get_data(as_text=True)
    assert "NodeName=red01 NodeAddr=127.0.77.1 " in conf
    # the file on disk is the same text (apply mode "none" writes it)
    assert (tmp_path / "etc" / "slurm.conf").read_text() == conf
    # after acceptance a re-enrolment (reboot) stays enrolled
    r = client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join)
    assert r.json["status"] == "enrolled"


# --------------------------------------------------------------------------- store


def test_db_schema_version_and_wal(client, cluster_dir):
    conn = sqlite3.connect(cluster_dir / "registry.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT version FROM migrations").fetchall()
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        conn.close()
    assert oct((cluster_dir / "registry.db").stat().st_mode & 0o777) == "0o600"


def test_newer_schema_is_refused(cluster_dir, app_options):
    from pibake.registry.store import Store

    Store(cluster_dir)
    conn = sqlite3.connect(cluster_dir / "registry.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this pibake"):
        Store(cluster_dir)


def test_concurrent_enrolments_make_no_duplicates(app, creds):
    """12 threads, each enrolling 6 hostnames drawn from 8 (same MACs): every hostname once."""
    errors, statuses = [], []
    barrier = threading.Barrier(12)

    def worker(seed):
        client = app.test_client()
        barrier.wait()
        for j in range(6):
            i = (seed + j) % 8 + 1
            r = client.post("/api/v1/enrol", json=enrolment(f"node{i}", i), headers=creds.join)
            statuses.append(r.status_code)
            if r.status_code not in (200, 201):
                errors.append(r.get_data(as_text=True))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert statuses.count(201) == 8 and statuses.count(200) == 12 * 6 - 8
    nodes = app.test_client().get("/api/v1/nodes", auth=creds.admin).json
    assert sorted(n["hostname"] for n in nodes) == [f"node{i}" for i in range(1, 9)]
    assert sum(n["enrol_count"] for n in nodes) == 72
    conf = app.extensions["pibake_registry"].slurm_conf()
    assert "NodeName=node[1-8] NodeAddr=127.0.77.[1-8] " in conf


def test_health_counts_nodes(client, creds, enrolled):
    r = client.get("/api/v1/health")
    assert r.json["status"] == "ok" and r.json["nodes"] == 2 and r.json["version"]


def test_slurm_state_is_none_without_slurm(cluster_dir, creds, tmp_path):
    app = create_app(cluster_dir, slurm_conf=str(tmp_path / "absent" / "slurm.conf"), slurm_apply="none")
    client = app.test_client()
    client.post("/api/v1/enrol", json=enrolment("red01"), headers=creds.join)
    # the conf exists now but no slurmctld answers: sinfo fails, state is null, no 500
    nodes = client.get("/api/v1/nodes", auth=creds.admin).json
    assert nodes[0]["slurm_state"] is None


def test_openapi_served_matches_file(client):
    from importlib import resources

    served = client.get("/api/v1/openapi.json").json
    assert served == json.loads(resources.files("pibake.registry").joinpath("openapi.json").read_text())
