"""The OpenAPI document: valid OpenAPI 3, covers every /api/v1 route, and schemathesis finds no 5xx."""

import base64
import json
from importlib import resources

import pytest
from openapi_spec_validator import validate

from pibake.registry.app import create_app
from tests.registry.conftest import enrolment

DOC = json.loads(resources.files("pibake.registry").joinpath("openapi.json").read_text())


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
    documented = {(path, method) for path, ops in DOC["paths"].items() for method in ops
                  if method in ("get", "post", "put", "delete", "patch")}
    assert _flask_routes(app) == documented


def test_every_operation_documents_its_auth_failures():
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            if op.get("security") == []:
                continue
            assert "401" in op["responses"], (method, path)


hypothesis = pytest.importorskip("hypothesis")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (pip install schemathesis)")


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    from pibake.cluster import init_cluster
    from pibake.secrets import admin_password, load_join_token

    d = tmp_path_factory.mktemp("fuzz") / "cluster"
    init_cluster(d, manager="localhost", manager_ip="127.0.0.1", network="127.0.0.0/8", name="fuzz")
    app = create_app(d, slurm_conf=str(d / "slurm.conf"), slurm_apply="none", slurm_state=False)
    token = load_join_token(d).token
    client = app.test_client()
    cred = client.post("/api/v1/enrol", json=enrolment("red01"),
                       headers={"Authorization": f"Bearer {token}"}).json["credential"]
    basic = lambda u, p: "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()  # noqa: E731
    app.config["FUZZ_AUTH"] = {"joinToken": f"Bearer {token}", "nodeBasic": basic("red01", cred),
                               "adminBasic": basic("admin", admin_password(d))}
    return app


SEEN = []
OPERATIONS = [(path, method) for path, ops in DOC["paths"].items() for method in ops if method != "parameters"]


@pytest.mark.parametrize("path,method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_schemathesis_finds_no_server_error(fuzz_app, path, method):
    """Generated requests for each operation, sent without credentials and with each credential the
    operation accepts: never a 5xx (no slurmctld here: apply mode none)."""
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(DOC)
    op = schema[path][method.upper()]
    auth = fuzz_app.config["FUZZ_AUTH"]
    schemes = [name for req in (DOC["paths"][path][method].get("security") or []) for name in req]
    header_sets = [{}] + [{"Authorization": auth[s]} for s in schemes]

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              derandomize=True)
    @given(case=op.as_strategy())
    def run(case):
        for headers in header_sets:
            response = case.call(app=fuzz_app, headers=headers, base_url="http://localhost/api/v1")
            assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
            SEEN.append((path, method, bool(headers), response.status_code))

    run()


def test_fuzzing_reached_the_app_with_and_without_credentials():
    """Runs after the fuzz tests (file order): they sent requests, got 2xx with credentials and 4xx."""
    if not SEEN:
        pytest.skip("run together with test_schemathesis_finds_no_server_error")
    codes = {code for *_, code in SEEN}
    assert any(200 <= c < 300 for c in codes) and 401 in codes and 400 in codes
    assert {(p, m) for p, m, *_ in SEEN} == set(OPERATIONS)
