"""The OpenAPI document is the registry's contract: valid OpenAPI 3, covers every /api/v1 route, and
schemathesis, run against the real app with all its checks, finds no request the server answers otherwise
than the document says (no 5xx, no schema-valid body refused, no schema-invalid body accepted, responses
as documented, 405 with ``Allow``)."""

import base64

import pytest
from openapi_spec_validator import validate

from pibake.model import ROLES
from pibake.registry.app import create_app
from pibake.registry.schema import openapi_document
from pibake.secrets import admin_password, load_join_token
from tests.fixtures_plugin import LOOPBACK
from tests.registry.conftest import enrolment

DOC = openapi_document()
OPERATIONS = [(path, method) for path, ops in DOC["paths"].items() for method in ops if method != "parameters"]


def test_document_is_valid_openapi_3():
    validate(DOC)
    assert DOC["openapi"].startswith("3.")


def _flask_routes(app):
    routes = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/"):
            continue
        path = rule.rule[len("/api/v1"):]
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", f"{{{arg}}}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    return routes


def test_every_api_route_is_documented_and_nothing_else(app):
    assert _flask_routes(app) == set(OPERATIONS)


def test_every_operation_documents_its_auth_failures():
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            if method == "parameters" or op.get("security") == []:
                continue
            assert "401" in op["responses"], (method, path)


def test_the_documented_roles_are_the_models():
    for name in ("Enrolment", "Node"):
        assert tuple(DOC["components"]["schemas"][name]["properties"]["role"]["enum"]) == ROLES


def test_a_405_names_the_allowed_methods(client, creds):
    r = client.put("/api/v1/nodes/red01", auth=creds.admin)
    assert r.status_code == 405 and r.is_json
    assert set(r.headers["Allow"].split(", ")) >= {"GET", "DELETE"}


# ------------------------------------------------------------------ schemathesis against the real app

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (pip install schemathesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the importorskip above)
from schemathesis.config import SchemathesisConfig  # noqa: E402

JOB_CALLS = []


def record_job(cluster_dir, params, progress):
    """What a REST job runs here: records the validated parameters; never ssh, never the network (the
    fuzzer's host lists are arbitrary addresses)."""
    JOB_CALLS.append(params)
    progress(1.0, "recorded")
    return {"params": params}


@pytest.fixture(scope="module")
def fuzz_app(make_cluster):
    """A real app over a real cluster directory (slurm apply mode none: no slurmctld here)."""
    d = make_cluster(name="fuzz", **LOOPBACK)
    return create_app(d, slurm_conf=str(d / "slurm.conf"), slurm_apply="none", slurm_state=False,
                      job_functions={"deploy": record_job, "verify": record_job, "recover": record_job})


@pytest.fixture
def fuzz_auth(fuzz_app):
    """An Authorization header per security scheme, for a node red01 enrolled afresh by each test (what
    an earlier test's requests did to red01 does not matter)."""
    d = fuzz_app.extensions["pibake_registry"].cluster_dir

    def basic(user, password):
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    auth = {"joinToken": f"Bearer {load_join_token(d).token}", "adminBasic": basic("admin", admin_password(d))}
    client = fuzz_app.test_client()
    client.delete("/api/v1/nodes/red01", headers={"Authorization": auth["adminBasic"]})
    r = client.post("/api/v1/enrol", json=enrolment("red01"), headers={"Authorization": auth["joinToken"]})
    assert r.status_code == 201, r.json
    return {**auth, "nodeBasic": basic("red01", r.json["credential"])}


def _schemes(operation):
    security = operation.get("security", DOC.get("security", []))
    return [name for requirement in security for name in requirement]


class _Target:
    """The WSGI app schemathesis calls: the module's ``fuzz_app`` (set by the test; the schema is built
    at import, before fixtures exist)."""
    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


TARGET = _Target()
# A body over MAX_BODY is refused with 413 before it is read: a refusal like 400.
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
    "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]}}})
SCHEMA = schemathesis.openapi.from_dict(DOC, config=CONFIG)
SCHEMA.app = TARGET
# What the server checks that a schema cannot say (see the ssh_options/hosts descriptions in the document):
# a schema-valid body may be refused with 400 for these, and for nothing else.
# Sensors (pibake/sensors.py): a reading's time ahead of the manager's clock, since/until/step that do not fit
# together, a threshold's min above its max or outside the metric's plausible range.
NOT_IN_SCHEMA = {("POST", "/deploy"): ("hosts: ", "options.ssh_options: "), ("POST", "/readings"): ("clock: ",),
                 ("GET", "/sensors/{node}/readings"): ("range: ",),
                 ("PUT", "/sensors/{node}/thresholds/{metric}"): ("threshold: ",)}


@schemathesis.check
def refused_only_for_what_the_schema_cannot_say(ctx, response, case):
    """schemathesis's positive_data_acceptance, except a 400 that names a rule listed in NOT_IN_SCHEMA."""
    prefixes = NOT_IN_SCHEMA.get((case.method, case.path), ())
    if response.status_code == 400 and prefixes:
        error = (response.json() or {}).get("error", "")
        if error.startswith(prefixes):
            return None
    return schemathesis.checks.positive_data_acceptance(ctx, response, case)


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
def test_schemathesis_finds_nothing(case, fuzz_app, fuzz_auth, no_remote_connections):
    """Every phase (examples, coverage incl. undeclared methods, fuzzing; positive and negative data), all
    checks, with the credential the operation asks for."""
    TARGET.app = fuzz_app
    schemes = _schemes(case.operation.definition.raw)
    headers = {"Authorization": fuzz_auth[schemes[0]]} if schemes else {}
    case.call_and_validate(headers=headers, base_url="http://localhost/api/v1",
                           excluded_checks=[schemathesis.checks.positive_data_acceptance],
                           additional_checks=[refused_only_for_what_the_schema_cannot_say])


@pytest.mark.parametrize("path,method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_generated_requests_reach_the_app_only_with_credentials(fuzz_app, fuzz_auth, path, method,
                                                                  no_remote_connections):
    """Schema-valid requests for one operation: without credentials always 401 (where it asks for one);
    with each credential it accepts, some pass authentication (the fuzzing above is not all 401s)."""
    op = SCHEMA[path][method.upper()]
    auth = fuzz_auth
    schemes = _schemes(DOC["paths"][path][method])
    with_credentials = {scheme: set() for scheme in schemes}
    TARGET.app = fuzz_app

    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              derandomize=True)
    @given(case=op.as_strategy())
    def run(case):
        if schemes:
            assert case.call(base_url="http://localhost/api/v1").status_code == 401
        for scheme in schemes:
            response = case.call(base_url="http://localhost/api/v1", headers={"Authorization": auth[scheme]})
            assert response.status_code < 500
            with_credentials[scheme].add(response.status_code)
    run()
    for scheme, codes in with_credentials.items():
        assert codes - {401}, (scheme, codes)  # authenticated: answered 2xx, or 4xx on what was asked


def test_jobs_run_the_recording_function_with_the_validated_parameters(fuzz_app, fuzz_auth, no_remote_connections):
    """A job the REST API accepts runs its kind's function with the validated parameters (here
    ``record_job``: the fuzzer's hosts never get an ssh connection)."""
    client = fuzz_app.test_client()
    admin = {"Authorization": fuzz_auth["adminBasic"]}
    r = client.post("/api/v1/deploy", json={"hosts": "10.1.1.[11-12]", "options": {"parallel": 2}}, headers=admin)
    assert r.status_code == 202, r.json
    job = fuzz_app.extensions["pibake_jobs"].wait(r.json["id"], timeout=30)
    assert job["state"] == "done" and job["result"] == {"params": {"hosts": ["10.1.1.[11-12]"],
                                                                  "options": {"parallel": 2}}}
    assert job["result"]["params"] in JOB_CALLS


def test_the_network_guard_refuses_before_anything_is_sent(no_remote_connections):
    """What keeps the fuzz tests honest: a connection to a non-loopback address (TEST-NET-1, refused before
    a packet leaves) or an ssh started from any thread is refused and recorded; loopback still works."""
    import socket
    import subprocess
    import threading

    errors = []

    def remote():
        try:
            socket.create_connection(("192.0.2.1", 22), timeout=1)
        except ConnectionRefusedError as exc:
            errors.append(str(exc))
        try:
            subprocess.run(["ssh", "-o", "BatchMode=yes", "red01", "true"], check=False)
        except PermissionError as exc:
            errors.append(str(exc))
    worker = threading.Thread(target=remote)
    worker.start()
    worker.join(10)
    assert [e.split(":")[0] for e in errors] == ["the network rule"] * 2
    assert no_remote_connections == ["connect to ('192.0.2.1', 22)", "run ['ssh', '-o', 'BatchMode=yes', 'red01']"]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(server.getsockname(), timeout=5).close()
    no_remote_connections.clear()  # seen; the fixture's teardown checks for any others
