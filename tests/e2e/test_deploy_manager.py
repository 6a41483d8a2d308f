"""Must show (issue 6): "The manager (registry + slurmctld) is set up first if it is not running." With real
OpenSSH, munge, Slurm, gunicorn and Debian's python3: a manager red00 and workers red01-red03 that all run
nothing but sshd (tests/e2e/deploy_fixtures.py, ``manager_sshd=True``); one `pibake deploy` sets up the
manager from its seed's own steps (packages, files, pibake from the wheel, registry, agent) and makes the
workers idle; a re-run changes nothing; a manager whose registry died gets it started again, nothing else;
a manager that cannot be reached is reported with ssh's reason, and the workers say the manager is not
ready. Tests run in file order on one lab."""

import json
import os
import shutil
import subprocess

import pytest

from tests.e2e.deploy_fixtures import deploy_lab, deploy_lab_missing, module_lab
from tests.e2e.test_deploy import doc_blocks, run_pibake

WORKERS = (("red01", 11), ("red02", 12), ("red03", 13))
NAMES = [n for n, _ in WORKERS]
MANAGER = "red00"
HOSTS = "red00,red[01-03]"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    reason = deploy_lab_missing()
    if reason:
        pytest.skip(reason)
    imports = "import flask, flask_httpauth, gunicorn, click, ClusterShell, rich, cryptography, jsonschema"
    if subprocess.run(["/usr/bin/python3", "-c", imports], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("the manager's Debian python3 packages (python3-flask, gunicorn, ...) are missing: "
                    "run scripts/setup")
    from pibake.bake.burn import manager_wheel

    tmp = tmp_path_factory.mktemp("deploy-manager")
    lab = deploy_lab(tmp, 140 + os.getpid() % 20, WORKERS, family="pm", manager=MANAGER, manager_sshd=True)
    with module_lab(request, lab):
        # one wheel for the whole module (--wheel): the re-runs must not see a new build of a changed checkout
        built = manager_wheel()
        lab.wheel = tmp / built.name
        shutil.copyfile(built, lab.wheel)
        yield lab


def deploy(lab, *args):
    proc = run_pibake(lab, ["deploy", *args, "--json", "--wheel", str(lab.wheel)])
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = None
    return proc, report


def pids(lab, name, *programs):
    """{program: pids} of programs running in host ``name`` (its own PID namespace)."""
    host = lab.hosts[name]
    return {p: host.run(["pgrep", "-f", p], check=False).stdout.split() for p in programs}


MANAGER_DAEMONS = ("/opt/pibake/bin/pibake", "munged", "slurmctld")


def test_one_deploy_sets_up_the_manager_and_three_workers(lab):
    mgr = lab.mgr
    assert pids(lab, MANAGER, *MANAGER_DAEMONS) == {p: [] for p in MANAGER_DAEMONS}  # sshd only
    assert not any(lab.private_path(mgr, "/opt/pibake").iterdir())
    (commands, _), = [doc_blocks()["deploy-manager"]]
    (argv, code), = commands
    assert argv[:3] == ["pibake", "deploy", "--hosts"] and argv[3] == HOSTS and code == 0
    proc, report = deploy(lab, *argv[2:])  # the manual's command, as written (plus --json and --wheel)
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    assert report["summary"] == {"hosts": 4, "changed": 4, "unchanged": 0, "failed": 0}
    m, *workers = report["hosts"]
    assert (m["host"], m["hostname"], m["role"], m["step"], m["status"], m["error"]) == (
        MANAGER, MANAGER, "manager", "ready", "changed", None)
    for needed in ("/var/lib/pibake/cluster/secrets/munge.key", "/etc/systemd/system/pibake-registry.service",
                   "pibake installed into /opt/pibake", "pibake-registry started", "enrolment new", "munge started"):
        assert needed in m["changes"], m["changes"]
    # every step of the seed ran except packages (all installed: the lab has no internet)
    assert set(m["timings"]) == {"connect", "files", "install", "registry", "agent"}
    for host, name in zip(workers, NAMES):
        assert (host["host"], host["role"], host["step"], host["status"], host["slurm_state"]) == (
            name, "worker", "idle", "changed", "idle")
    table = proc.stderr[proc.stderr.index("HOST "):].splitlines()
    assert table[1].split()[:4] == [MANAGER, MANAGER, "ready", "changed"]
    assert table[5] == "4 host(s): 4 changed, 0 unchanged, 0 failed"

    # the registry (from the wheel, in /opt/pibake on Debian's python3) reports the nodes, sinfo says idle
    status, nodes = lab.api("GET", "/nodes")
    assert status == 200
    by_name = {n["hostname"]: n for n in nodes}
    assert {n: by_name[n]["slurm_state"] for n in NAMES} == {n: "idle" for n in NAMES}
    assert (by_name[MANAGER]["role"], by_name[MANAGER]["status"]) == ("manager", "ready")
    running = pids(lab, MANAGER, *MANAGER_DAEMONS)
    assert all(running.values()), running
    out = mgr.run(["srun", "-N3", "hostname"], timeout=60).stdout
    assert sorted(out.split()) == NAMES

    # the seed's files with the seed's modes; the join token left the agent config after enrolment
    stat = mgr.run(["stat", "-c", "%n %a", "/var/lib/pibake", "/var/lib/pibake/cluster",
                    "/var/lib/pibake/cluster/secrets", "/var/lib/pibake/cluster/cluster.yaml",
                    "/var/lib/pibake/cluster/secrets/munge.key", "/var/lib/pibake/cluster/secrets/registry.key",
                    "/var/lib/pibake/cluster/secrets/admin-password", "/etc/pibake/agent.json",
                    "/etc/munge/munge.key"]).stdout.split()
    assert dict(zip(stat[::2], stat[1::2])) == {
        "/var/lib/pibake": "700", "/var/lib/pibake/cluster": "700", "/var/lib/pibake/cluster/secrets": "700",
        "/var/lib/pibake/cluster/cluster.yaml": "600", "/var/lib/pibake/cluster/secrets/munge.key": "400",
        "/var/lib/pibake/cluster/secrets/registry.key": "400", "/var/lib/pibake/cluster/secrets/admin-password":
        "400", "/etc/pibake/agent.json": "600", "/etc/munge/munge.key": "400"}
    assert "join_token" not in json.loads(lab.hosts[MANAGER].path("/etc/pibake/agent.json").read_text())
    assert lab.private_path(mgr, "/var/lib/pibake/cluster/secrets/ca.key").exists() is False  # never the CA key
    # nothing landed on this machine: its /opt/pibake and /var/lib/pibake are the empty mount points
    assert os.listdir("/opt/pibake") == [] and os.listdir("/var/lib/pibake") == []
    # secrets never in the output
    secrets = [lab.token(), lab.token().split(".")[1], (lab.sdir / "admin-password").read_text().strip(),
               lab.hosts[MANAGER].path("/etc/pibake/node-credential").read_text().strip()]
    for secret in secrets:
        assert secret not in proc.stdout and secret not in proc.stderr


def test_rerun_changes_nothing_and_restarts_nothing(lab):
    before = {n: pids(lab, n, "munged", "slurmd") for n in NAMES}
    before[MANAGER] = pids(lab, MANAGER, *MANAGER_DAEMONS)
    proc, report = deploy(lab, "--hosts", HOSTS)
    assert proc.returncode == 0, proc.stderr
    assert report["summary"] == {"hosts": 4, "changed": 0, "unchanged": 4, "failed": 0}
    m = report["hosts"][0]
    # the registry answers: the manager is left alone (no ssh session at all)
    assert (m["role"], m["step"], m["status"], m["changes"], list(m["timings"])) == (
        "manager", "ready", "unchanged", [], ["registry"])
    assert all((h["step"], h["status"], h["changes"]) == ("idle", "unchanged", []) for h in report["hosts"][1:])
    after = {n: pids(lab, n, "munged", "slurmd") for n in NAMES}
    after[MANAGER] = pids(lab, MANAGER, *MANAGER_DAEMONS)
    assert after == before


def test_the_manager_under_another_name_is_not_made_a_worker(lab):
    lab.add_ssh_alias("boss", lab.manager_ip)  # an ssh alias deploy cannot tell is the manager before it logs in
    proc, report = deploy(lab, "--hosts", "boss")
    assert proc.returncode == 1
    (host,) = report["hosts"]
    assert (host["host"], host["hostname"], host["step"], host["status"]) == ("boss", MANAGER, "facts", "failed")
    assert host["error"] == (f"facts: this machine is the cluster's manager ({MANAGER}); name it {MANAGER} or "
                             f"{lab.manager_ip} in --hosts")


def test_a_manager_with_another_hostname_is_not_set_up(lab):
    assert lab.kill_in_host(lab.mgr, "/opt/pibake/bin/pibake")
    lab.wait_registry_down()
    lab.mgr.run(["hostname", "raspberrypi"])
    try:
        proc, report = deploy(lab, "--hosts", "red00")
    finally:
        lab.mgr.run(["hostname", MANAGER])
    assert proc.returncode == 1
    (m,) = report["hosts"]
    assert (m["host"], m["hostname"], m["role"], m["step"], m["status"]) == (
        MANAGER, "raspberrypi", "manager", "facts", "failed")
    assert m["error"] == (f"facts: this machine is named raspberrypi, but cluster.yaml's manager is {MANAGER}: "
                          f"rename it (hostnamectl set-hostname {MANAGER}) and deploy again")
    assert not pids(lab, MANAGER, "/opt/pibake/bin/pibake")["/opt/pibake/bin/pibake"]  # nothing was started


def test_a_dead_registry_is_started_again_and_nothing_else(lab):
    files = ("/var/lib/pibake/cluster/cluster.yaml", "/var/lib/pibake/cluster/secrets/munge.key",
             "/etc/pibake/agent.json", "/usr/local/lib/pibake/agent.py", "/opt/pibake/bin/pibake")
    stat_before = lab.mgr.run(["stat", "-c", "%i %Y", *files]).stdout
    munged = pids(lab, MANAGER, "munged", "slurmctld")
    proc, report = deploy(lab, "--hosts", "red[01-03]")  # the manager is not in --hosts: deploy adds its row
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    assert report["summary"] == {"hosts": 4, "changed": 1, "unchanged": 3, "failed": 0}
    m = report["hosts"][0]
    assert (m["host"], m["role"], m["step"], m["status"]) == (MANAGER, "manager", "ready", "changed")
    assert m["changes"] == ["pibake-registry started"], m["changes"]  # no file written, no reinstall, the agent changed nothing
    assert lab.mgr.run(["stat", "-c", "%i %Y", *files]).stdout == stat_before
    assert pids(lab, MANAGER, "munged", "slurmctld") == munged
    assert pids(lab, MANAGER, "/opt/pibake/bin/pibake")["/opt/pibake/bin/pibake"]


def test_unreachable_manager_is_reported_and_workers_wait(lab):
    lab.kill_in_host(lab.mgr, "/opt/pibake/bin/pibake")
    lab.wait_registry_down()
    lab.stop_sshd(lab.mgr)
    proc, report = deploy(lab, "--hosts", "red[01-03]", "--connect-timeout", "3")
    assert proc.returncode == 1, proc.stderr
    assert report["ok"] is False
    assert report["summary"] == {"hosts": 4, "changed": 0, "unchanged": 0, "failed": 4}
    m, *workers = report["hosts"]
    assert (m["host"], m["role"], m["step"], m["status"]) == (MANAGER, "manager", "connect", "failed")
    assert m["error"] == f"ssh: connect to host {lab.manager_ip} port 22: Connection refused"
    for host, name in zip(workers, NAMES):
        assert (host["host"], host["step"], host["status"], host["error"]) == (
            name, "connect", "failed", f"manager not ready: {MANAGER} failed at connect")
    lines = proc.stderr[proc.stderr.index("HOST "):].splitlines()
    assert lines[1].split()[:4] == [MANAGER, MANAGER, "connect", "failed"]
    assert lines[-1] == "4 host(s): 0 changed, 0 unchanged, 4 failed"
