"""The registry as users run it: `pibake registry serve` (gunicorn, TLS with the cluster's cert) on a free
loopback port, checked with requests against the cluster CA; SIGTERM; kill -9 during enrolments."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from pibake.secrets import ensure_secrets
from tests.registry.conftest import enrolment
from tests.registry.slurm_fixture import free_port


class Server:
    def __init__(self, cluster_dir, tmp_path, *extra):
        self.cluster_dir = cluster_dir
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/api/v1"
        self.ca = str(cluster_dir / "secrets" / "ca.crt")
        self.stderr_path = tmp_path / f"serve-{self.port}.log"
        self.extra = extra
        self.proc = None

    def start(self):
        self.stderr = open(self.stderr_path, "ab")
        self.stdout = open(self.stderr_path.with_suffix(".stdout"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pibake", "--cluster", str(self.cluster_dir), "registry", "serve",
             "--bind", f"127.0.0.1:{self.port}", "--workers", "2", "--apply", "none",
             "--slurm-conf", str(self.cluster_dir / "slurm.conf"), *self.extra],
            stdout=self.stdout, stderr=self.stderr)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log()}")
            try:
                if requests.get(f"{self.url}/health", verify=self.ca, timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError("registry did not answer within 30 s: " + self.log())

    def log(self):
        return self.stderr_path.read_text(errors="replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.stderr.close()
            self.stdout.close()


@pytest.fixture
def server(cluster_dir, tmp_path):
    srv = Server(cluster_dir, tmp_path).start()
    yield srv
    srv.stop()


def test_tls_enrol_and_munge_key(server, creds):
    r = requests.post(f"{server.url}/enrol", json=enrolment("red01", ip="127.0.0.1"), headers=creds.join,
                      verify=server.ca, timeout=10)
    assert r.status_code == 201, r.text
    cred = r.json()["credential"]
    # NodeAddr is the address the request came from (listed in ips)
    node = requests.get(f"{server.url}/nodes/red01", auth=creds.admin, verify=server.ca, timeout=10).json()
    assert node["ip"] == "127.0.0.1"
    r = requests.get(f"{server.url}/munge-key", auth=("red01", cred), verify=server.ca, timeout=10)
    assert r.status_code == 200 and r.json()["munge_key_b64"] == creds.munge_b64
    r = requests.get(f"{server.url}/munge-key", auth=("red01", "wrong"), verify=server.ca, timeout=10)
    assert r.status_code == 401


def test_management_commands_act_like_the_running_server(server, creds):
    """`pibake registry remove` without options writes the slurm.conf the server writes."""
    requests.post(f"{server.url}/enrol", json=enrolment("red01"), headers=creds.join, verify=server.ca, timeout=10)
    conf = server.cluster_dir / "slurm.conf"  # the server runs with --slurm-conf <cluster>/slurm.conf --apply none
    assert "NodeName=red01 " in conf.read_text()
    out = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(server.cluster_dir), "registry", "remove",
                          "red01"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "NodeName=" not in conf.read_text()


def test_verify_trusts_the_cluster_ca_whatever_the_environment_says(server, creds, monkeypatch):
    """REQUESTS_CA_BUNDLE (set on many machines) must not replace the cluster CA in verify's session."""
    from types import SimpleNamespace

    from pibake.verify import fetch_registry

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    cluster = SimpleNamespace(manager_ip="127.0.0.1", registry_port=server.port)
    health, nodes, error = fetch_registry(server.cluster_dir, cluster)
    assert error is None and health["status"] == "ok" and nodes == []


def test_another_ca_is_rejected_by_the_client(server, tmp_path):
    other = tmp_path / "other"
    ensure_secrets(other, "other", "localhost", "127.0.0.1")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.url}/health", verify=str(other / "secrets" / "ca.crt"), timeout=10)


def test_sigterm_stops_cleanly_and_logs_hold_no_secret(server, creds):
    r = requests.post(f"{server.url}/enrol", json=enrolment("red01"), headers=creds.join, verify=server.ca,
                      timeout=10)
    cred = r.json()["credential"]
    requests.post(f"{server.url}/enrol", json=enrolment("red02"), headers={"Authorization": "Bearer wrong"},
                  verify=server.ca, timeout=10)
    requests.get(f"{server.url}/nodes", auth=("admin", "wrong"), verify=server.ca, timeout=10)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    log = server.log()
    assert "Listening at: https://127.0.0.1" in log and "enrolled red01" in log
    assert '"POST /api/v1/enrol HTTP/1.1" 201' in log  # the access log, on stderr too
    assert server.stderr_path.with_suffix(".stdout").read_text() == ""  # stdout stays clean
    assert "join token" in log  # the refusal is logged ...
    for secret in creds.secrets() + [cred]:
        assert secret not in log  # ... without any secret


def test_kill_9_during_concurrent_enrolments_loses_no_acknowledged_one(cluster_dir, tmp_path, creds):
    """200 enrolments, 20 at a time; the gunicorn master and its workers are killed -9 midway.
    After a restart every enrolment that got a 2xx is present, and no hostname is there twice."""
    srv = Server(cluster_dir, tmp_path).start()
    acknowledged = []
    session_local = {}

    def enrol(i):
        session = session_local.setdefault(os.getpid(), requests.Session())
        try:
            r = session.post(f"{srv.url}/enrol", json=enrolment(f"n{i:03d}", i % 250 + 1, ip=f"127.0.78.{i % 250 + 1}",
                                                                 mac=f"dc:a6:32:00:{i // 256:02x}:{i % 256:02x}"),
                             headers=creds.join, verify=srv.ca, timeout=10)
        except requests.RequestException:
            return None
        if 200 <= r.status_code < 300:
            acknowledged.append(f"n{i:03d}")
        return r.status_code

    def kill_all():
        workers = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(srv.proc.pid, signal.SIGKILL)
        for pid in workers:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        srv.proc.wait()

    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(enrol, i) for i in range(200)]
            while len(acknowledged) < 60:
                time.sleep(0.005)
            kill_all()
            concurrent.futures.wait(futures)
        assert 60 <= len(acknowledged) < 200
        srv.start()
        nodes = requests.get(f"{srv.url}/nodes", auth=creds.admin, verify=srv.ca, timeout=10).json()
        names = [n["hostname"] for n in nodes]
        assert len(names) == len(set(names))
        assert set(acknowledged) <= set(names)
    finally:
        srv.stop()


def tls_client(maximum):
    """A client context trusting only the cluster CA, capped at TLS version ``maximum``."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = maximum
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old versions: the server must refuse
    return context


def test_served_tls_keeps_its_minimum_version_and_connections_stay_open(server):
    import http.client
    import ssl

    def connect(maximum):
        context = tls_client(maximum)
        context.load_verify_locations(server.ca)
        return http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)

    with pytest.raises(ssl.SSLError):
        connect(ssl.TLSVersion.TLSv1_1).request("GET", "/api/v1/health")
    conn = connect(ssl.TLSVersion.TLSv1_2)
    try:
        for pause in (0, 3):  # longer than gunicorn's default keepalive (2 s): the connection must still serve
            time.sleep(pause)
            conn.request("GET", "/api/v1/health")
            resp = conn.getresponse()
            assert resp.status == 200 and b'"ok"' in resp.read()
            if pause == 0:
                sock = conn.sock
                assert sock.version() == "TLSv1.2"
        assert conn.sock is sock  # one TLS connection for both requests
    finally:
        conn.close()


def test_one_ssl_context_per_worker_until_the_certificate_changes(cluster_dir):
    from gunicorn import sock
    from gunicorn.config import Config

    from pibake.registry.server import gunicorn_options, shared_ssl_context

    options = gunicorn_options(cluster_dir, "127.0.0.1:0")
    # the project's own environment has the hook (setup.cfg: gunicorn>=21); a manager on Debian bookworm's
    # gunicorn 20.1 has not, and gunicorn_options leaves it out there (tests/e2e/test_deploy_manager.py)
    assert options["ssl_context"] is shared_ssl_context
    cfg = Config()
    for key in ("certfile", "keyfile", "ssl_context"):
        cfg.set(key, options[key])
    first = sock.ssl_context(cfg)
    assert sock.ssl_context(cfg) is first
    cert = cluster_dir / "secrets" / "registry.crt"
    stat = cert.stat()
    os.utime(cert, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a rotated certificate
    renewed = sock.ssl_context(cfg)
    assert renewed is not first and sock.ssl_context(cfg) is renewed
