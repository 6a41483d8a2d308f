"""Must show (issue 6), with real OpenSSH, munge, Slurm and the registry: `pibake deploy --hosts` over ssh
makes three lab hosts that run only sshd idle Slurm workers; a re-run changes nothing; a stopped host is
reported alone with ssh's reason (exit 1) while the others succeed. Tests run in file order on one lab."""

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import skip_reason
from tests.e2e.deploy_fixtures import deploy_lab

WORKERS = (("w1", 11), ("w2", 12), ("w3", 13))
NAMES = [n for n, _ in WORKERS]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    reason = skip_reason() or (None if os.path.exists("/usr/sbin/sshd") else "openssh-server is not installed")
    if reason:
        pytest.skip(reason)
    lab = deploy_lab(tmp_path_factory.mktemp("deploy"), 60 + os.getpid() % 40, WORKERS)
    try:
        yield lab
    finally:
        if getattr(request.session, "testsfailed", 0):
            print(lab.diagnostics(), file=sys.stderr)
        lab.destroy()


def pibake_deploy(lab, hosts, *extra):
    argv = [sys.executable, "-m", "pibake", "--cluster", str(lab.cluster_dir), "deploy", "--hosts", hosts,
            f"--ssh-option=-F", f"--ssh-option={lab.ssh_config}", "--json", *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = None
    return proc, report


def daemons(lab, name):
    host = lab.hosts[name]
    return {d: host.run(["pgrep", "-x", d], check=False).stdout.split() for d in ("munged", "slurmd")}


def test_three_sshd_only_hosts_become_idle(lab):
    for name in NAMES:  # nothing but sshd runs there, nothing of pibake is installed
        assert daemons(lab, name) == {"munged": [], "slurmd": []}
        assert not lab.hosts[name].path("/etc/pibake/agent.json").exists()
    proc, report = pibake_deploy(lab, "w[1-3]")
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    assert report["ok"] is True and report["summary"] == {"hosts": 3, "changed": 3, "unchanged": 0, "failed": 0}
    assert report["manager"] == "mgr" and report["registry"] == f"https://{lab.manager_ip}:8443"
    for host, name in zip(report["hosts"], NAMES):
        assert host["host"] == name and host["hostname"] == name
        assert (host["step"], host["status"], host["slurm_state"], host["error"]) == ("idle", "changed", "idle", None)
        assert "enrolment new" in host["changes"] and "slurmd started" in host["changes"]
        assert "/etc/pibake/agent.json" in host["changes"] and "/usr/local/lib/pibake/agent.py" in host["changes"]
        assert set(host["timings"]) == {"connect", "files", "agent", "idle"}  # packages: all installed here
    # the per-host table on stderr
    table = proc.stderr[proc.stderr.index("HOST "):].splitlines()
    assert [line.split()[:4] for line in table[1:4]] == [[n, n, "idle", "changed"] for n in NAMES]
    assert table[4] == "3 host(s): 3 changed, 0 unchanged, 0 failed"
    # Slurm agrees, and runs a job on all three
    assert all(lab.wait_idle(NAMES)[n] == "idle" for n in NAMES)
    out = lab.mgr.run(["srun", "-N3", "hostname"], timeout=60).stdout
    assert sorted(out.split()) == NAMES
    # files on a node: config without the token, token file gone (the agent removed it), modes
    h = lab.hosts["w1"]
    config = json.loads(h.path("/etc/pibake/agent.json").read_text())
    assert "join_token" not in config and config["registry_url"] == "https://mgr:8443"
    assert not h.path("/etc/pibake/join-token").exists()
    assert h.run(["stat", "-c", "%a", "/etc/pibake", "/etc/pibake/agent.json", "/usr/local/lib/pibake/agent.py",
                  "/etc/munge/munge.key"]).stdout.split() == ["700", "600", "755", "400"]
    assert h.path("/etc/hosts").read_text().count(f"{lab.manager_ip} mgr") == 1
    # what deploy installed stays on the host: the machine's own /usr/local/lib/pibake is untouched
    assert not os.path.exists("/usr/local/lib/pibake/agent.py")
    # secrets never in the output
    for secret in (lab.token(), lab.token().split(".")[1], (lab.sdir / "admin-password").read_text().strip(),
                   h.path("/etc/pibake/node-credential").read_text().strip()):
        assert secret not in proc.stdout and secret not in proc.stderr


def test_rerun_by_ip_changes_nothing(lab):
    before = {n: daemons(lab, n) for n in NAMES}
    files = ("/etc/pibake/agent.json", "/usr/local/lib/pibake/agent.py", "/etc/pibake/ca.crt", "/etc/hosts",
             "/etc/munge/munge.key", "/etc/default/slurmd")
    stat_before = {n: lab.hosts[n].run(["stat", "-c", "%i %Y", *files]).stdout for n in NAMES}
    proc, report = pibake_deploy(lab, f"10.77.{lab.octet}.[11-13]")
    assert proc.returncode == 0, proc.stderr
    assert report["summary"] == {"hosts": 3, "changed": 0, "unchanged": 3, "failed": 0}
    for host, (name, last) in zip(report["hosts"], WORKERS):
        assert host["host"] == lab.ip(last) and host["hostname"] == name
        assert (host["step"], host["status"], host["changes"]) == ("idle", "unchanged", [])
        assert "files" not in host["timings"]  # checksums matched: nothing was even sent
    assert {n: daemons(lab, n) for n in NAMES} == before  # no restart
    assert {n: lab.hosts[n].run(["stat", "-c", "%i %Y", *files]).stdout for n in NAMES} == stat_before


def test_stopped_host_is_reported_alone(lab):
    stopped = lab.stop_host("w3")
    proc, report = pibake_deploy(lab, "w[1-3]", "--connect-timeout", "3")
    assert proc.returncode == 1, proc.stderr
    assert report["ok"] is False
    assert report["summary"] == {"hosts": 3, "changed": 0, "unchanged": 2, "failed": 1}
    w1, w2, w3 = report["hosts"]
    assert (w1["status"], w2["status"]) == ("unchanged", "unchanged")
    assert w3["host"] == "w3" and w3["status"] == "failed" and w3["step"] == "connect"
    # ssh's own reason: the address is gone (no ARP answer) -> "No route to host" or a connect timeout
    assert w3["error"].startswith(f"ssh: connect to host {stopped.ip} port 22: "), w3["error"]
    assert w3["error"].split(": ")[-1] in ("No route to host", "Connection timed out"), w3["error"]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("w3 ")]
    assert lines and lines[-1].split()[:4] == ["w3", "-", "connect", "failed"]
    assert "1 failed" in proc.stderr


def test_stopped_sshd_says_connection_refused(lab):
    lab.hosts["w2"].run(["pkill", "-x", "sshd"])
    proc, report = pibake_deploy(lab, "w[1-2]")
    assert proc.returncode == 1
    w1, w2 = report["hosts"]
    assert w1["status"] == "unchanged"
    assert w2["error"] == f"ssh: connect to host {lab.ip(12)} port 22: Connection refused"


def test_manager_without_registry_is_not_built_yet(lab):
    lab.stop_registry()
    proc, report = pibake_deploy(lab, "w1")
    assert proc.returncode == 2 and report is None
    assert proc.stderr.strip() == (
        f"pibake: error: the registry at https://{lab.manager_ip}:8443/api/v1 does not answer (connection "
        "refused); setting up the manager over ssh is not built yet in this version of pibake")
