"""Must show (issue 3), with real components: Pi-like lab hosts enrol themselves through the first-boot
agent (Debian's python3) with the registry (gunicorn + TLS) and become idle Slurm nodes; a fourth joins
while a job runs and the job completes; refusals say why. Tests run in file order on one lab cluster."""

import datetime as dt
import json
import subprocess

from pibake import secrets
from tests.e2e.conftest import wait_for

WORKERS = ("w1", "w2", "w3")


def test_three_workers_enrol_and_become_idle(lab_cluster):
    c = lab_cluster
    hosts = [c.add_worker(name, 11 + i) for i, name in enumerate(WORKERS)]
    procs = [h.popen(c.agent_argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in hosts]
    outs = [p.communicate(timeout=240) for p in procs]
    for host, proc, (out, err) in zip(hosts, procs, outs):
        assert proc.returncode == 0, f"{host.name}: {err}\n{c.diagnostics()}"
        result = json.loads(out)
        assert result["status"] == "ready" and result["enrolment"] == "new" and result["hostname"] == host.name
        assert result["services"] == {"munge": "started", "slurmd": "started"}
        assert "enrolled as" in err and "CA" in err and "pinned" in err
        credential = host.path("/etc/pibake/node-credential").read_text().strip()
        for secret in (c.token(), c.token().split(".")[1], credential,
                       (c.sdir / "admin-password").read_text().strip()):
            assert secret not in err and secret not in out  # never logged

    states = c.wait_idle(WORKERS)
    assert all(states[n] == "idle" for n in WORKERS)
    out = c.mgr.run(["srun", "-N3", "hostname"], timeout=60).stdout
    assert sorted(out.split()) == sorted(WORKERS)

    status, nodes = c.api("GET", "/nodes")
    assert status == 200
    by_name = {n["hostname"]: n for n in nodes}
    for i, name in enumerate(WORKERS):
        node = by_name[name]
        assert node["status"] == "ready" and node["ip"] == c.ip(11 + i) and node["role"] == "worker"
        assert node["mac"] == c.hosts[name].mac and node["cpus"] >= 1


def test_token_is_gone_and_secrets_are_private(lab_cluster):
    c = lab_cluster
    token = c.token()
    for name in WORKERS:
        h = c.hosts[name]
        config = json.loads(h.path("/etc/pibake/agent.json").read_text())
        assert "join_token" not in config and config["registry_url"] == "https://mgr:8443"
        assert token not in h.path("/boot/firmware/user-data").read_text()
        modes = h.run(["stat", "-c", "%a %U", "/etc/pibake/agent.json", "/etc/pibake/node-credential",
                       "/etc/munge/munge.key"]).stdout.split("\n")
        assert modes[:3] == ["600 root", "600 root", "400 munge"]
        assert h.path("/etc/munge/munge.key").read_bytes() == (c.sdir / "munge.key").read_bytes()
        defaults = h.path("/etc/default/slurmd").read_text().splitlines()
        assert [ln for ln in defaults if ln.startswith("SLURMD_OPTIONS=")] == ['SLURMD_OPTIONS="--conf-server mgr:6817"']
        assert '#SLURMD_OPTIONS=""' in defaults  # the packaged comment is kept
        hosts = h.path("/etc/hosts").read_text()
        assert hosts.count(f"{c.manager_ip} mgr") == 1


def test_running_the_agent_again_changes_nothing(lab_cluster):
    """Every boot runs the agent: it converges without rewriting files or restarting daemons."""
    c = lab_cluster
    h = c.hosts["w1"]
    before = h.run(["pgrep", "-x", "slurmd"]).stdout.split() + h.run(["pgrep", "-x", "munged"]).stdout.split()
    code, result, err = c.run_agent(h)
    assert code == 0, err
    assert result["enrolment"] == "credential" and result["changed"] == []
    assert result["services"] == {"munge": "running", "slurmd": "running"}
    after = h.run(["pgrep", "-x", "slurmd"]).stdout.split() + h.run(["pgrep", "-x", "munged"]).stdout.split()
    assert before == after
    assert h.path("/etc/hosts").read_text().count(f"{c.manager_ip} mgr") == 1


def test_fourth_worker_joins_while_a_job_runs(lab_cluster):
    c = lab_cluster
    job = c.mgr.popen(["srun", "-N3", "--job-name=e2e-long", "sleep", "20"], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)

    def running():
        out = c.mgr.run(["squeue", "-h", "-o", "%j %T"], check=False).stdout
        return "e2e-long RUNNING" in out
    wait_for("the job to run", running, timeout=60)

    w4 = c.add_worker("w4", 14)
    code, result, err = c.run_agent(w4)
    assert code == 0, err
    assert result["status"] == "ready"
    states = c.wait_idle(["w4"])
    assert states["w4"] == "idle"
    assert "e2e-long RUNNING" in c.mgr.run(["squeue", "-h", "-o", "%j %T"]).stdout  # still running

    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, f"the job did not survive the new node: {err}\n{c.diagnostics()}"
    out = c.mgr.run(["srun", "-N4", "hostname"], timeout=60).stdout
    assert sorted(out.split()) == ["w1", "w2", "w3", "w4"]


def test_wrong_token_is_refused(lab_cluster):
    c = lab_cluster
    real = c.token()
    wrong = real[:-32] + "x" * 32  # the right CA pin, a wrong secret
    h = c.add_worker("w5", 15, token=wrong)
    code, result, err = c.run_agent(h)
    assert code == 1 and result["status"] == "error"
    assert "enrolment refused by the registry (HTTP 401): join token rejected" in result["message"]
    assert "x" * 32 not in err
    assert json.loads(h.path("/etc/pibake/agent.json").read_text())["join_token"] == wrong
    assert not h.path("/etc/pibake/node-credential").exists()


def test_wrong_ca_pin_sends_nothing(lab_cluster, tmp_path):
    c = lab_cluster
    other = tmp_path / "other-cluster"
    secrets.ensure_secrets(other, "other", "mgr", c.manager_ip)  # its registry cert would even name mgr
    h = c.add_worker("w6", 16, ca_crt=other / "secrets" / "ca.crt")
    code, result, err = c.run_agent(h)
    assert code == 1
    assert result["message"].startswith("CA pin mismatch: /etc/pibake/ca.crt has sha256")
    assert "Nothing was sent to the registry" in result["message"]
    assert h.ip not in c.registry_log.read_text()  # gunicorn's access log never saw this host


def test_expired_token_is_refused(lab_cluster):
    c = lab_cluster
    old = secrets.rotate_join_token(c.cluster_dir, ttl=dt.timedelta(seconds=-1))
    try:
        h = c.add_worker("w7", 17, token=old.token)
        code, result, _err = c.run_agent(h)
    finally:
        secrets.rotate_join_token(c.cluster_dir)
    assert code == 1
    assert "HTTP 401" in result["message"] and "expired" in result["message"]


def test_worker_booting_before_the_manager_waits_for_the_registry(lab_cluster):
    """Workers often boot first: the agent retries (backoff + jitter) until the registry answers."""
    c = lab_cluster
    c.stop_registry()
    h = c.add_worker("w8", 18)
    err_path = c.tmp / "w8-agent.err"
    with open(err_path, "w") as err_file:
        agent = h.popen(c.agent_argv(), stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        wait_for("the agent to log a retry", lambda: "retrying in" in err_path.read_text(), timeout=60)
    finally:
        c.start_registry()
    out, _ = agent.communicate(timeout=240)
    err = err_path.read_text()
    assert agent.returncode == 0, err
    assert "cannot reach the registry at https://mgr:8443 (connection refused); attempt 1, retrying in" in err
    assert json.loads(out)["status"] == "ready"
    assert c.wait_idle(["w8"])["w8"] == "idle"


def test_removed_node_credential_is_refused(lab_cluster):
    c = lab_cluster
    h = c.hosts["w8"]
    status, _ = c.api("DELETE", "/nodes/w8")
    assert status == 200
    code, result, err = c.run_agent(h)
    assert code == 1
    assert result["message"].startswith("the registry rejected this node's credential (HTTP 401")
    assert "removed by an admin" in result["message"]
    assert "w8" not in c.slurm_states()
