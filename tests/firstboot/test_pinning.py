"""CA pinning and the registry client: TLS only to the CA the join token pins, retries with backoff
and full jitter up to a deadline, final errors on 4xx with the registry's message."""

import pytest

from pibake import secrets
from pibake.firstboot import agent
from tests.firstboot.conftest import FakeTime, write_agent_config
from tests.firstboot.tlsserver import ScriptedServer, free_port


def sdir(cluster):
    return secrets.secrets_dir(cluster)


def test_ca_hash_matches_pibake_secrets(cluster_a):
    pem = (sdir(cluster_a) / "ca.crt").read_text()
    assert agent.ca_sha256(pem) == secrets.ca_fingerprint(pem)
    token = secrets.load_join_token(cluster_a).token
    assert agent.check_pin(pem, token) == agent.token_ca_hash(token)


def test_pin_mismatch_names_the_problem_not_the_token(cluster_a, cluster_b):
    token = secrets.load_join_token(cluster_a).token
    other = (sdir(cluster_b) / "ca.crt").read_text()
    with pytest.raises(agent.AgentError, match="CA pin mismatch") as err:
        agent.check_pin(other, token, "/etc/pibake/ca.crt")
    assert token.split(".")[1] not in str(err.value)
    assert "Nothing was sent" in str(err.value)


@pytest.mark.parametrize("token", ["", "K10abc::x.y", "hello", None])
def test_malformed_token(token):
    with pytest.raises(agent.AgentConfigError, match="malformed"):
        agent.token_ca_hash(token)


def test_not_a_certificate(cluster_a):
    token = secrets.load_join_token(cluster_a).token
    with pytest.raises(agent.AgentConfigError, match="no PEM certificate"):
        agent.check_pin("garbage", token, "ca.crt")


def registry(url, ca, **kw):
    kw.setdefault("deadline", 0)
    return agent.AgentRegistryClient(url, str(ca), **kw)


def test_tls_to_the_pinned_ca(cluster_a):
    s = sdir(cluster_a)
    with ScriptedServer(s / "registry.crt", s / "registry.key", [(200, {"status": "ok"})]) as srv:
        resp = registry(srv.url, s / "ca.crt").call("GET", "/health", "health")
    assert resp.json() == {"status": "ok"}
    assert srv.requests == [("GET", "/api/v1/health", None, None)]


def test_a_kept_alive_connection_the_registry_closed_is_replaced(cluster_a):
    """The agent keeps its TLS connection between requests; when the registry has closed it meanwhile (its
    keep-alive ran out while the node started munge and slurmd), the request goes out again on a new
    connection instead of failing as a TLS error (found at N=32: "TLS check ... failed" on 5 hosts)."""
    s = sdir(cluster_a)
    with ScriptedServer(s / "registry.crt", s / "registry.key", [(200, {"n": 1}), (200, {"n": 2})],
                        keepalive_then_drop=True) as srv:
        reg = registry(srv.url, s / "ca.crt")
        assert reg.call("GET", "/health", "health").json() == {"n": 1}
        assert reg.call("GET", "/munge-key", "munge key download", auth=("red01", "x")).json() == {"n": 2}
    assert [r[1] for r in srv.requests] == ["/api/v1/health", "/api/v1/munge-key"]
    assert srv.connections == 2


def test_a_dropped_handshake_is_retried_not_a_pin_failure(cluster_a):
    """A registry too busy to finish a TLS handshake (connection closed mid-handshake) is a connection
    problem: retried with backoff. Only a certificate that fails verification is the fatal pin error
    (found at N=32: five agents gave up with "TLS check ... failed (TLS handshake failed)")."""
    s = sdir(cluster_a)
    sleeps = []
    with ScriptedServer(s / "registry.crt", s / "registry.key", [(200, {"ok": True})], drop_handshakes=2) as srv:
        reg = registry(srv.url, s / "ca.crt", deadline=float("inf"), sleep=sleeps.append)
        assert reg.call("GET", "/health", "health").json() == {"ok": True}
    assert srv.connections == 3 and len(sleeps) == 2


def test_server_of_another_ca_gets_no_request(cluster_a, cluster_b):
    """The pinned CA is A's; a server with B's certificate fails the handshake: no request, no token sent."""
    sb = sdir(cluster_b)
    with ScriptedServer(sb / "registry.crt", sb / "registry.key", [(201, {})]) as srv:
        reg = registry(srv.url, sdir(cluster_a) / "ca.crt")
        with pytest.raises(agent.AgentError, match="does not chain to the pinned CA") as err:
            reg.call("POST", "/enrol", "enrolment", auth=secrets.load_join_token(cluster_a).token, body={})
    assert srv.connections == 1 and srv.requests == []
    assert "certificate verify failed" in str(err.value)


def test_system_trust_store_and_env_are_not_used(cluster_a, cluster_b, monkeypatch):
    """REQUESTS_CA_BUNDLE pointing at the server's CA must not make another CA acceptable."""
    sb = sdir(cluster_b)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sb / "ca.crt"))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    with ScriptedServer(sb / "registry.crt", sb / "registry.key", [(200, {})]) as srv:
        with pytest.raises(agent.AgentError, match="pinned CA"):
            registry(srv.url, sdir(cluster_a) / "ca.crt").call("GET", "/health", "health")
    assert srv.requests == []


def test_retries_5xx_with_capped_full_jitter(cluster_a):
    s = sdir(cluster_a)
    script = [(503, {"error": "starting"})] * 5 + [(200, {"status": "ok"})]
    t = FakeTime()
    with ScriptedServer(s / "registry.crt", s / "registry.key", script) as srv:
        reg = registry(srv.url, s / "ca.crt", deadline=1000, backoff_base=1.0, backoff_max=4.0,
                       sleep=t.sleep, clock=t.clock, rand=lambda: 1.0)
        assert reg.call("GET", "/health", "health").status_code == 200
    assert len(srv.requests) == 6
    assert t.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]  # exponential, capped at backoff_max (jitter factor 1.0)


def test_jitter_is_a_fraction_of_the_backoff(cluster_a):
    s = sdir(cluster_a)
    t = FakeTime()
    fractions = iter([0.5, 0.25])
    with ScriptedServer(s / "registry.crt", s / "registry.key", [(502, {}), (500, {}), (200, {})]) as srv:
        reg = registry(srv.url, s / "ca.crt", deadline=1000, backoff_base=2.0, backoff_max=60,
                       sleep=t.sleep, clock=t.clock, rand=lambda: next(fractions))
        reg.call("GET", "/health", "health")
    assert t.sleeps == [1.0, 1.0]  # 0.5 * 2, 0.25 * 4


def test_unreachable_until_the_deadline(cluster_a):
    t = FakeTime()
    reg = registry(f"https://127.0.0.1:{free_port()}", sdir(cluster_a) / "ca.crt", deadline=30,
                   backoff_base=1.0, backoff_max=8.0, sleep=t.sleep, clock=t.clock, rand=lambda: 1.0)
    with pytest.raises(agent.RegistryUnreachable, match="connection refused.*deadline") as err:
        reg.call("GET", "/health", "health")
    assert err.value.exit_code == agent.EXIT_TEMPFAIL
    assert t.now == 30 and t.sleeps[:4] == [1.0, 2.0, 4.0, 8.0]


def test_once_means_one_attempt(cluster_a):
    reg = registry(f"https://127.0.0.1:{free_port()}", sdir(cluster_a) / "ca.crt", deadline=1e9, once=True,
                   sleep=lambda s: pytest.fail("--once must not sleep"))
    with pytest.raises(agent.RegistryUnreachable, match="after 1 attempt"):
        reg.call("GET", "/health", "health")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
def test_4xx_is_final_with_the_registry_message(cluster_a, status):
    s = sdir(cluster_a)
    with ScriptedServer(s / "registry.crt", s / "registry.key", [(status, {"error": "you did X; do Y"})]) as srv:
        reg = registry(srv.url, s / "ca.crt", deadline=1e9, sleep=lambda s: pytest.fail("4xx is final"))
        with pytest.raises(agent.Refused) as err:
            reg.call("POST", "/enrol", "enrolment", auth="tok", body={})
    assert len(srv.requests) == 1 and srv.requests[0][2] == "Bearer"
    assert str(err.value) == f"enrolment refused by the registry (HTTP {status}): you did X; do Y"


def test_agent_stops_before_sending_anything_on_pin_mismatch(tmp_path, cluster_a, cluster_b):
    """A config whose CA does not hash to the token's pin: no connection at all."""
    sa = sdir(cluster_a)
    with ScriptedServer(sa / "registry.crt", sa / "registry.key", [(201, {})]) as srv:
        cfg = write_agent_config(tmp_path / "node", srv.url, sdir(cluster_b) / "ca.crt",
                                 secrets.load_join_token(cluster_a).token)
        with pytest.raises(agent.AgentError, match="CA pin mismatch"):
            agent.run_agent(str(cfg))
    assert srv.connections == 0
    assert not (tmp_path / "node" / "node-credential").exists()


def test_agent_main_says_why_and_exits_1(tmp_path, cluster_a, cluster_b, capsys):
    cfg = write_agent_config(tmp_path / "node", f"https://127.0.0.1:{free_port()}", sdir(cluster_b) / "ca.crt",
                             secrets.load_join_token(cluster_a).token)
    assert agent.main(["--config", str(cfg), "--json"]) == 1
    out, err = capsys.readouterr()
    assert "pibake-agent: ERROR CA pin mismatch" in err
    assert '"status": "error"' in out


@pytest.mark.parametrize("config, message", [
    ("{", "not a readable JSON config"),
    ("[]", "must be a JSON object"),
    ('{"registry_url": "http://x"}', "registry_url must be an https:// URL"),
    ('{"registry_url": "https://x", "role": "boss", "deadline_s": -1}', "role must be worker, sensor or manager; "
                                                                         "deadline_s must be a number >= 0"),
])
def test_bad_config(tmp_path, config, message):
    path = tmp_path / "agent.json"
    path.write_text(config)
    with pytest.raises(agent.AgentConfigError, match=message) as err:
        agent.load_config(str(path))
    assert err.value.exit_code == 2
