"""The registry's wire contract, shared through the document it publishes (registry/openapi.json).

Two clients speak to the registry: the first-boot agent's standard-library client (``firstboot/agent.py``,
it must run on a bare Pi) and the shared client of everything beside the registry
(``pibake.registry_client``: deploy, verify, the lab). Both run here against the real registry app over TLS;
every request they put on the wire, and every answer, is checked against the published document: a
documented path and method, the credential scheme the operation asks for (and none where it asks for none),
a body valid against its schema, a documented status and a body valid against the answer's schema. Also
the shared client's own behaviour: CA pinning, timeouts, one error naming URL, status and message."""

import json
import re
import socket
import time
from pathlib import Path

import pytest
from openapi_schema_validator import OAS30Validator

from pibake.errors import RegistryClientError
from pibake.firstboot import agent
from pibake.registry_client import REFUSED, TLS_FAILED, RegistryClient
from tests.live_registry import serve

DOC = json.loads((Path(__file__).resolve().parent.parent / "registry" / "openapi.json").read_text())
SCHEMES = DOC["components"]["securitySchemes"]


@pytest.fixture
def live(tmp_path):
    live, stop = serve(tmp_path)
    yield live
    stop()


def operation(method, path):
    """(template, operation) of the document that ``method path`` is, or (None, None)."""
    for template, ops in DOC["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
            return template, ops.get(method.lower())
    return None, None


def schema_problems(schema, data):
    validator = OAS30Validator({**schema, "components": DOC["components"]})
    return [f"{'/'.join(map(str, e.absolute_path)) or 'body'}: {e.message[:160]}" for e in validator.iter_errors(data)]


def contract_problems(x):
    """How one recorded exchange departs from the published document (empty when it conforms)."""
    template, op = operation(x.method, x.path)
    if op is None:
        return [f"{x.method} {x.path} is not in the document"]
    out = []
    security = op.get("security", DOC.get("security", []))
    auth = x.headers.get("Authorization", "")
    if not security:
        if auth:
            out.append("sends a credential to an operation that takes none")
    else:
        schemes = {SCHEMES[name]["scheme"] for requirement in security for name in requirement}
        if auth.split(" ", 1)[0].lower() not in schemes:
            out.append(f"credential scheme {auth.split(' ', 1)[0] or 'none'!r}, the document asks for {sorted(schemes)}")
    if "requestBody" in op:
        if x.headers.get("Content-Type", "").split(";")[0] != "application/json":
            out.append(f"Content-Type {x.headers.get('Content-Type')!r}, the document says application/json")
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        out += [f"request {p}" for p in schema_problems(schema, json.loads(x.body or b"null"))]
    elif x.body:
        out.append("sends a body to an operation that takes none")
    answer = op["responses"].get(str(x.status)) or op["responses"].get("default")
    if answer is None:
        return out + [f"answered {x.status}, not a documented status of {x.method} {template}"]
    schema = answer.get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        out += [f"answer {p}" for p in schema_problems(schema, json.loads(x.response))]
    return out


def the_agents_enrolment(hostname):
    """The body the agent builds from this machine's facts, with a name and address of the test cluster."""
    body = agent.collect_facts({"role": "worker"})
    raw = body["slurmd_c"]
    if raw:
        raw = re.sub(r"NodeName=\S+", f"NodeName={hostname}", raw)
        body.update(slurmd_c=raw, slurmd_c_parsed=agent.parse_slurmd_c(raw))
    body.update(hostname=hostname, mac="dc:a6:32:00:00:c1", ips=["127.0.77.1"])
    return body


def test_both_clients_speak_what_the_document_says(live):
    node = agent.AgentRegistryClient(live.base, live.ca, deadline=time.monotonic() + 30, once=True)
    shared = RegistryClient(live.base, live.ca, password=live.password)
    try:
        assert node.call("GET", "/health", "health").json()["status"] == "ok"
        assert shared.health()["status"] == "ok"
        enrolled = node.call("POST", "/enrol", "enrolment", auth=live.token, body=the_agents_enrolment("red01"),
                             ok=(200, 201)).json()
        cred = ("red01", enrolled["credential"])
        assert node.call("GET", "/munge-key", "munge key", auth=cred).json()["munge_key_b64"]
        assert [n["hostname"] for n in shared.nodes()] == ["red01"]
        assert shared.call("GET", "/nodes/red01", admin=True)["hostname"] == "red01"
        with pytest.raises(agent.Refused):
            node.call("GET", "/munge-key", "munge key", auth=("red01", "wrong"))
        with pytest.raises(RegistryClientError) as err:
            RegistryClient(live.base, live.ca, password="wrong").nodes()
    finally:
        node.http.close()
        shared.close()
    assert err.value.status == 401 and err.value.url == f"{live.base}/api/v1/nodes" and err.value.server_message
    assert live.password not in str(err.value)

    by_client = {"agent": [], "shared": []}
    for x in live.exchanges:
        by_client["agent" if x.headers.get("User-Agent", "").startswith("pibake-agent/") else "shared"].append(x)
    assert [(x.method, x.path, x.status) for x in by_client["agent"]] == [
        ("GET", "/health", 200), ("POST", "/enrol", 201), ("GET", "/munge-key", 200), ("GET", "/munge-key", 401)]
    assert [(x.method, x.path, x.status) for x in by_client["shared"]] == [
        ("GET", "/health", 200), ("GET", "/nodes", 200), ("GET", "/nodes/red01", 200), ("GET", "/nodes", 401)]
    assert {f"{x.method} {x.path}": contract_problems(x) for x in live.exchanges} == {
        f"{x.method} {x.path}": [] for x in live.exchanges}


def test_the_contract_check_catches_what_breaks_the_document(live):
    """The checker above can fail: a credential where none is taken, a wrong scheme, a bad body."""
    shared = RegistryClient(live.base, live.ca, password=live.password)
    try:
        shared.call("GET", "/health", admin=True)
        with pytest.raises(RegistryClientError) as err:
            shared.call("POST", "/enrol", admin=True, body={"hostname": "red01"}, ok=(201,))
    finally:
        shared.close()
    assert err.value.status == 401
    health, enrol = live.exchanges
    assert contract_problems(health) == ["sends a credential to an operation that takes none"]
    problems = contract_problems(enrol)
    assert problems[0] == "credential scheme 'Basic', the document asks for ['bearer']"
    assert any(p.startswith("request body: 'mac' is a required property") for p in problems)


def test_the_shared_client_trusts_only_the_cluster_ca(live, tmp_path, monkeypatch):
    from pibake.cluster import init_cluster

    other = tmp_path / "other"
    init_cluster(other, manager="localhost", manager_ip="127.0.0.1", network="127.0.0.0/8", name="other")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", live.ca)  # the environment must not widen (or change) the trust
    monkeypatch.setenv("CURL_CA_BUNDLE", live.ca)
    with pytest.raises(RegistryClientError) as err:
        RegistryClient(live.base, other / "secrets" / "ca.crt").health()
    assert (err.value.reason, err.value.status) == (TLS_FAILED, None)
    assert live.exchanges == []  # nothing reached the app: no credential could have left


def test_the_shared_client_names_what_nothing_answered(tmp_path, live):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryClientError) as err:
        RegistryClient(f"https://127.0.0.1:{port}", live.ca).health()
    assert str(err.value) == f"https://127.0.0.1:{port}/api/v1/health: {REFUSED}"


def test_the_shared_client_reads_the_admin_password_of_its_cluster_only_when_needed(live, tmp_path):
    from types import SimpleNamespace

    cluster = SimpleNamespace(manager_ip="127.0.0.1", registry_port=int(live.base.rsplit(":", 1)[1]))
    client = RegistryClient.for_cluster(cluster, live.cluster_dir)
    assert client.health()["status"] == "ok" and client.password is None
    assert client.nodes() == [] and client.password == live.password
    client.close()
