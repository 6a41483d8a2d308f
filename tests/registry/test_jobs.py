"""The REST jobs model on the real app and SQLite store: auth, validation, states, progress, results, the
bounded queue, and jobs of a killed registry process shown as failed (interrupted). The job functions here
stand in for verify/deploy (which need a cluster: tests/e2e/test_rest_jobs.py runs the real ones)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pibake.errors import PibakeError
from pibake.jobs import JobRunner, validate, JobError
from pibake.registry.app import create_app
from tests.registry.conftest import Creds
from tests.fixtures_plugin import new_cluster


def wait_done(client, admin, job_id, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/api/v1/jobs/{job_id}", auth=admin).json
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture
def gate():
    return threading.Event()


@pytest.fixture
def jobs_app(cluster_dir, app_options, gate):
    def fake_verify(cluster_dir_, params, progress):
        progress(0.5, "half way")
        gate.wait(10)
        return {"cluster": "testlab", "ok": True, "bench": params["bench"], "options": params["options"],
                "dir": str(cluster_dir_)}

    def failing_deploy(cluster_dir_, params, progress):
        raise PibakeError(f"cannot deploy {params['hosts'][0]}: no registry")

    return create_app(cluster_dir, test_config={"TESTING": True}, job_workers=1,
                      job_functions={"verify": fake_verify, "deploy": failing_deploy}, **app_options)


@pytest.fixture
def creds(cluster_dir):
    return Creds(cluster_dir)


def test_jobs_need_the_admin(jobs_app, creds):
    client = jobs_app.test_client()
    assert client.post("/api/v1/verify", json={}).status_code == 401
    assert client.post("/api/v1/deploy", json={"hosts": "red01"}, auth=("admin", "wrong")).status_code == 401
    assert client.get("/api/v1/jobs/abc").status_code == 401
    assert client.get("/api/v1/jobs").status_code == 401


def test_verify_job_runs_reports_progress_and_returns_the_function_result(jobs_app, creds, gate, cluster_dir):
    client = jobs_app.test_client()
    r = client.post("/api/v1/verify", json={"bench": True, "options": {"user": "pi", "connect_timeout": 3}},
                    auth=creds.admin)
    assert r.status_code == 202
    job = r.json
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert job["kind"] == "verify" and job["state"] in ("queued", "running") and job["result"] is None
    end = time.monotonic() + 10
    while client.get(f"/api/v1/jobs/{job['id']}", auth=creds.admin).json["progress"]["message"] != "half way":
        assert time.monotonic() < end
        time.sleep(0.02)
    running = client.get(f"/api/v1/jobs/{job['id']}", auth=creds.admin).json
    assert running["state"] == "running" and running["progress"] == {"fraction": 0.5, "message": "half way"}
    assert running["started"] and running["finished"] is None
    gate.set()
    done = wait_done(client, creds.admin, job["id"])
    assert done["state"] == "done" and done["progress"]["fraction"] == 1.0 and done["error"] is None
    assert done["result"] == {"cluster": "testlab", "ok": True, "bench": True,
                              "options": {"user": "pi", "connect_timeout": 3}, "dir": str(cluster_dir)}
    listed = client.get("/api/v1/jobs", auth=creds.admin).json
    assert listed[0]["id"] == job["id"] and "result" not in listed[0]


def test_a_failing_job_says_why(jobs_app, creds):
    client = jobs_app.test_client()
    r = client.post("/api/v1/deploy", json={"hosts": "red[01-02]", "options": {"parallel": 4}}, auth=creds.admin)
    assert r.status_code == 202
    job = wait_done(client, creds.admin, r.json["id"])
    assert job["state"] == "failed" and job["error"] == "cannot deploy red[01-02]: no registry"
    assert job["result"] is None


@pytest.mark.parametrize("path,body,message", [
    ("/api/v1/verify", {"bench": "yes"}, "bench: must be true or false"),
    ("/api/v1/verify", {"bench": False, "color": 1}, "unknown field(s) color; known: bench, options"),
    ("/api/v1/verify", {"options": {"proxy": "x"}}, "options: unknown field(s) proxy; known: connect_timeout, "
                                                    "identity, known_hosts, user"),
    ("/api/v1/verify", {"options": {"connect_timeout": -1}}, "options.connect_timeout: must be a positive number"),
    ("/api/v1/verify", {"options": {"known_hosts": "/etc/passwd"}},
     "options.known_hosts: must be the path of a file whose name ends in known_hosts"),
    ("/api/v1/deploy", {"hosts": "red01", "options": {"ssh_options": ["-o", "UserKnownHostsFile=/etc/shadow"]}},
     "options.ssh_options: -o userknownhostsfile: 'shadow' is not a known_hosts file"),
    ("/api/v1/deploy", {}, "hosts: must be a host list like \"red[01-04]\" or a list of names/IPs"),
    ("/api/v1/deploy", {"hosts": "red[01-"}, "hosts: --hosts 'red[01-'"),
    ("/api/v1/deploy", {"hosts": ["red01"], "options": {"ssh_options": ["-o", "ProxyCommand=sh -c x"]}},
     "options.ssh_options: -o ProxyCommand is not allowed through the REST API"),
    ("/api/v1/deploy", {"hosts": ["red01"], "options": {"ssh_options": ["-v"]}},
     "options.ssh_options: '-v' is not allowed"),
    ("/api/v1/deploy", {"hosts": "red01", "options": {"parallel": 0}}, "options.parallel: must be a positive whole"),
])
def test_bad_requests_say_what_to_fix(jobs_app, creds, path, body, message):
    r = jobs_app.test_client().post(path, json=body, auth=creds.admin)
    assert r.status_code == 400, r.json
    assert r.json["error"].startswith(message), r.json["error"]


def test_unknown_job_is_404(jobs_app, creds):
    r = jobs_app.test_client().get("/api/v1/jobs/0123456789abcdef", auth=creds.admin)
    assert r.status_code == 404 and r.json == {"error": "no job 0123456789abcdef"}


def test_the_queue_is_bounded(cluster_dir, gate):
    runner = JobRunner(cluster_dir, workers=1, max_pending=2,
                       functions={"verify": lambda d, p, progress: gate.wait(10) and {"ok": True}})
    a = runner.submit("verify", {})
    runner.submit("verify", {})
    with pytest.raises(JobError) as err:
        runner.submit("verify", {})
    assert err.value.status == 429 and "2 jobs are queued or running" in err.value.message
    gate.set()
    assert runner.wait(a["id"])["state"] == "done"


KILLED_REGISTRY = r"""
import sys, time
from pibake.jobs import JobRunner
runner = JobRunner(sys.argv[1], workers=1, functions={"verify": lambda d, p, progress: time.sleep(600)})
running = runner.submit("verify", {})
queued = runner.submit("verify", {"bench": True})
while runner.get(running["id"])["state"] != "running":
    time.sleep(0.02)
print(running["id"], queued["id"], flush=True)
time.sleep(600)
"""


def test_jobs_of_a_killed_registry_show_as_interrupted(cluster_dir, app_options, creds):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_REGISTRY, str(cluster_dir)], stdout=subprocess.PIPE,
                            text=True)
    try:
        running_id, queued_id = proc.stdout.readline().split()
        # while that process lives, another process (a second gunicorn worker) leaves its jobs alone
        other = create_app(cluster_dir, **app_options).test_client()
        assert other.get(f"/api/v1/jobs/{running_id}", auth=creds.admin).json["state"] == "running"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    # the other process notices at once (a gunicorn worker that died), and so does a restarted registry
    assert other.get(f"/api/v1/jobs/{running_id}", auth=creds.admin).json["state"] == "failed"
    client = create_app(cluster_dir, **app_options).test_client()
    for job_id in (running_id, queued_id):
        job = client.get(f"/api/v1/jobs/{job_id}", auth=creds.admin).json
        assert job["state"] == "failed" and job["finished"]
        assert job["error"].startswith("interrupted: the registry stopped or restarted")


def test_validate_is_the_same_for_python_callers():
    assert validate("verify", {"bench": True}) == {"bench": True, "options": {}}
    assert validate("deploy", {"hosts": "red[01-02]"}) == {"hosts": ["red[01-02]"], "options": {}}
    with pytest.raises(JobError):
        validate("reboot", {})
    json.dumps(validate("deploy", {"hosts": ["10.1.1.11"], "options": {"ssh_options": ["-F", "cfg"]}}))


def test_the_page_shows_the_latest_report_with_plots(cluster_dir, app_options, creds):
    """A report written by verify's own writer (bench input as recorded from a lab run) appears on the page."""
    from pibake.verify import CheckResult, VerifyReport, write_report

    bench = {"ok": True, "nodes": ["w1", "w2"], "parameters": {},
             "srun_latency": [{"nodes": 1, "runs": 3, "failures": 0, "p50_s": 0.031, "p95_s": 0.04,
                               "samples_s": [0.03, 0.031, 0.04]},
                              {"nodes": 2, "runs": 3, "failures": 0, "p50_s": 0.05, "p95_s": 0.07,
                               "samples_s": [0.05, 0.05, 0.07]}],
             "sbatch": {"jobs": 20, "elapsed_s": 2.5, "jobs_per_s": 8.0, "error": None},
             "cpu_sha256": {"w1": {"mb_per_s": 510.2}, "w2": {"mb_per_s": 498.7}},
             "disk_write": {"w1": {"mb_per_s": 88.1}, "w2": {"mb_per_s": 90.4}},
             "network": {"status": "ok", "pairs": [{"from": "w2", "to": "w1", "mbit_per_s": 9400.0}]}}
    checks = [CheckResult("registry", "ok", "healthy"),
              CheckResult("clock-skew", "fail", "w2's clock is 612 s ahead of the manager", action="fix time sync")]
    report = VerifyReport("testlab", "localhost", [], checks, "2026-11-25T15:00:00Z", "2026-11-25T15:00:09Z", 9.0,
                          bench=bench)
    out = cluster_dir / "reports" / "20261125T150000Z"
    write_report(report, out, cluster_dir)
    assert sorted(p.name for p in out.iterdir()) == ["cpu.png", "disk.png", "network.png", "report.json",
                                                     "report.md", "srun_latency.png"]
    client = create_app(cluster_dir, **app_options).test_client()
    assert client.get("/").status_code == 302  # login first
    assert client.post("/login", data={"password": creds.admin[1]}).status_code == 302
    page = client.get("/").get_data(as_text=True)
    assert "checks failed" in page and "w2&#39;s clock is 612 s ahead of the manager" in page
    assert "fix time sync" in page and "8.0 jobs/s" in page and "w1 CPU / disk" in page
    for name in ("srun_latency.png", "cpu.png", "disk.png", "network.png"):
        assert f'src="/reports/latest/{name}"' in page
        png = client.get(f"/reports/latest/{name}")
        assert png.status_code == 200 and png.mimetype == "image/png" and png.data.startswith(b"\x89PNG")
    assert client.get("/reports/latest/report.json").status_code == 404  # only the plots are served
    assert client.get("/reports/latest/..%2Fregistry.db").status_code == 404
    md = (out / "report.md").read_text()
    assert "| clock-skew | fail |" in md and "![cpu.png](cpu.png)" in md


def test_the_page_without_a_report_says_how_to_make_one(cluster_dir, app_options, creds):
    client = create_app(cluster_dir, **app_options).test_client()
    client.post("/login", data={"password": creds.admin[1]})
    assert "No report yet: run <code>pibake verify --bench</code>" in client.get("/").get_data(as_text=True)


FORKED = r"""
import json, os, sys, time
from pibake.jobs import JobRunner
runner = JobRunner(sys.argv[1], workers=1, functions={"verify": lambda d, p, progress: {"pid": os.getpid()}})
pid = os.fork()  # as gunicorn forks its workers after building the app
if pid == 0:
    job = runner.submit("verify", {})
    print(json.dumps(runner.wait(job["id"], timeout=30)), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print(os.getpid(), pid, flush=True)
"""


def test_a_forked_worker_runs_its_own_jobs(cluster_dir):
    out = subprocess.run([sys.executable, "-c", FORKED, str(cluster_dir)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    job = json.loads(out[0])
    parent, child = map(int, out[1].split())
    assert job["state"] == "done" and job["result"] == {"pid": child} and child != parent


def test_jobs_log_in_with_the_manager_key_unless_the_request_names_its_own(tmp_path):
    """What run_verify/run_deploy pass on: the manager's identity and the cluster user fill only what the
    request left open (a caller's own identity, user or ssh config is never mixed with it)."""
    from pibake.jobs import manager_identity_options
    from pibake.secrets import ensure_secrets

    assert manager_identity_options("verify", tmp_path, {}, None) == {}  # no key in this cluster (yet)
    ensure_secrets(tmp_path, "red", "red00", "10.1.1.10")
    key = str(tmp_path / "secrets" / "manager-ssh.key")
    assert manager_identity_options("verify", tmp_path, {}, None) == {"identity": key}
    assert manager_identity_options("verify", tmp_path, {"bench": 1, "connect_timeout": 3}, None) == \
        {"bench": 1, "connect_timeout": 3, "identity": key}
    for own in ({"identity": "/root/k"}, {"user": "root"}):
        assert manager_identity_options("verify", tmp_path, own, None) == own
    assert manager_identity_options("deploy", tmp_path, {"parallel": 4}, "pi") == \
        {"parallel": 4, "user": "pi", "ssh_options": ["-i", key, "-o", "IdentitiesOnly=yes"]}
    assert manager_identity_options("deploy", tmp_path, {"ssh_options": ["-o", "Port=2222"]}, "pi") == \
        {"user": "pi", "ssh_options": ["-o", "Port=2222", "-i", key, "-o", "IdentitiesOnly=yes"]}
    for own in ({"user": "root"}, {"ssh_options": ["-F", "/x/ssh_config"]}, {"ssh_options": ["-i", "/k"]},
                {"ssh_options": ["-o", "IdentityFile=/k"]}, {"ssh_options": ["-o", "User=admin"]},
                {"ssh_options": ["-l", "admin"]}, {"ssh_options": ["-oUser=admin"]}):
        assert manager_identity_options("deploy", tmp_path, own, "pi") == own, own


def test_only_the_registrys_jobs_log_in_as_the_manager(tmp_path, monkeypatch):
    """The nodes accept the manager's key only from the manager's address: a JobRunner made on a person's
    machine (pibake.jobs.FUNCTIONS, the REST page's Python example) keeps that person's ssh login; the
    registry's (MANAGER_FUNCTIONS, the default of create_app) uses the manager's key."""
    import pibake.verify
    from pibake import jobs
    from pibake.registry.app import create_app
    new_cluster(tmp_path)
    seen = []

    class Report:
        def to_json(self):
            return {}

    monkeypatch.setattr(pibake.verify, "verify", lambda cluster_dir, bench, progress, **options: seen.append(options)
                        or Report())
    params = {"bench": False, "options": {}}
    jobs.FUNCTIONS["verify"](tmp_path, params, lambda *a: None)
    jobs.MANAGER_FUNCTIONS["verify"](tmp_path, params, lambda *a: None)
    assert seen == [{}, {"identity": str(tmp_path / "secrets" / "manager-ssh.key")}]
    app = create_app(tmp_path)
    assert app.extensions["pibake_jobs"].functions == jobs.MANAGER_FUNCTIONS
