"""`pibake deploy` onto hosts that run the target's software, not this machine's: every host (manager red00,
workers red01-red02, later red03) is a lab host on its own root over the lab's Debian trixie rootfs, as `pibake
lab up` makes them (tests/e2e/deploy_fixtures.py ``rootfs=``): OpenSSH 10's sshd, Python 3.13, Slurm 24.11 and
munge 0.5.16, as on Raspberry Pi OS trixie. Each runs nothing but sshd until deploy sets it up. Shows: one
deploy sets up the manager and makes the workers idle; a re-run changes nothing; a worker added later joins by
`scontrol reconfigure`, without a slurmctld restart (Slurm 23.11 on; 22.05 on this machine must restart); a worker
reached as a user with passwordless sudo (`--user pi`) is deployed through `sudo -n`. Tests run in file order on
one lab."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.deploy_fixtures import deploy_lab, deploy_lab_missing, module_lab
from tests.e2e.test_deploy import run_pibake

WORKERS = (("red01", 11), ("red02", 12))
LATER = ("red03", 13)
MANAGER = "red00"
RESTARTED = "restarting slurmctld"
RECONFIGURED = "in force (scontrol reconfigure)"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request, lab_rootfs):
    reason = deploy_lab_missing()
    if reason:
        pytest.skip(reason)
    from pibake.bake.burn import manager_wheel

    tmp = tmp_path_factory.mktemp("deploy-trixie")
    lab = deploy_lab(tmp, 180 + os.getpid() % 20, WORKERS, family="px", manager=MANAGER, rootfs=lab_rootfs)
    with module_lab(request, lab):
        built = manager_wheel()  # one wheel for the module: a re-run must not see a new build
        lab.wheel = tmp / built.name
        shutil.copyfile(built, lab.wheel)
        yield lab


def deploy(lab, hosts):
    proc = run_pibake(lab, ["deploy", "--hosts", hosts, "--json", "--wheel", str(lab.wheel)])
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    return json.loads(proc.stdout)


def registry_log(lab):
    return lab.registry_log.read_text(errors="replace")


def test_the_hosts_run_the_targets_software(lab):
    for name in (MANAGER, *dict(WORKERS)):
        out = lab.ssh(name, "python3 -V; slurmd -V; sshd -V 2>&1 | head -1 || true").stdout
        assert "Python 3.13." in out and "slurm-wlm 24.11." in out, (name, out)
    assert "OpenSSH_10." in lab.ssh(MANAGER, "ssh -V 2>&1").stdout


def test_one_deploy_sets_up_the_manager_and_the_workers(lab):
    report = deploy(lab, f"{MANAGER},red[01-02]")
    assert report["summary"] == {"hosts": 3, "changed": 3, "unchanged": 0, "failed": 0}
    m, *workers = report["hosts"]
    assert (m["host"], m["role"], m["step"], m["status"]) == (MANAGER, "manager", "ready", "changed")
    assert "pibake installed into /opt/pibake" in m["changes"] and "pibake-registry started" in m["changes"]
    assert [(h["host"], h["step"], h["status"], h["slurm_state"]) for h in workers] == [
        (name, "idle", "changed", "idle") for name, _ in WORKERS]
    # the registry runs from the wheel on the rootfs's python3 (3.13) and its Debian packages
    version = lab.mgr.run(["/opt/pibake/bin/python3", "-c", "import sys, flask; print(sys.version_info[:2])"])
    assert version.stdout.strip() == "(3, 13)"
    out = lab.mgr.run(["srun", "-N2", "hostname"], timeout=60).stdout
    assert sorted(out.split()) == [name for name, _ in WORKERS]


def test_rerun_changes_nothing(lab):
    restarts = registry_log(lab).count(RESTARTED)
    report = deploy(lab, f"{MANAGER},red[01-02]")
    assert report["summary"] == {"hosts": 3, "changed": 0, "unchanged": 3, "failed": 0}
    assert registry_log(lab).count(RESTARTED) == restarts


def test_a_worker_added_later_joins_by_reconfigure_without_a_restart(lab):
    """Slurm 24.11 takes a new NodeName by `scontrol reconfigure` (slurmctld restarts itself in place, jobs and
    node states kept): the registry does that instead of stopping and starting slurmctld (registry/slurmctl.py)."""
    log = registry_log(lab)
    restarts, reconfigures = log.count(RESTARTED), log.count(RECONFIGURED)
    assert restarts >= 1  # the first workers' enrolment started slurmctld (it waits for a first node)
    lab.add_ssh_worker(*LATER)
    report = deploy(lab, LATER[0])
    assert [(h["host"], h["step"], h["status"], h["slurm_state"]) for h in report["hosts"]] == [
        (LATER[0], "idle", "changed", "idle")]
    log = registry_log(lab)
    assert log.count(RESTARTED) == restarts, log[-3000:]
    assert log.count(RECONFIGURED) > reconfigures, log[-3000:]
    states = dict(line.split() for line in lab.mgr.run(["sinfo", "-N", "-h", "-o", "%N %T"]).stdout.splitlines())
    assert states == {"red01": "idle", "red02": "idle", "red03": "idle"}


def test_a_login_that_is_not_root_deploys_through_sudo(lab):
    """`--user pi` with passwordless sudo, as Raspberry Pi OS sets up its first user: the host's one ssh session
    runs under `sudo -n` (every step goes down its stdin, through sudo), and the files step authorizes the
    manager's key for pi, cluster.yaml's user, beside the key deploy logged in with."""
    name = "red04"
    lab.add_ssh_worker(name, 14)
    host = lab.hosts[name]
    login_key = Path(f"{lab.key}.pub").read_text().strip()
    # no password, not a locked one ("!"): without PAM sshd refuses a locked account even with a key
    host.run(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", "pi"])
    host.run(["sh", "-c", "echo 'pi ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/010_pi-nopasswd && "
                          "chmod 0440 /etc/sudoers.d/010_pi-nopasswd"])
    host.run(["install", "-d", "-m", "0700", "-o", "pi", "-g", "pi", "/home/pi/.ssh"])
    host.run(["install", "-m", "0600", "-o", "pi", "-g", "pi", "/dev/stdin", "/home/pi/.ssh/authorized_keys"],
             input=login_key + "\n")
    # the lab's sshd reads root's key from a file in /etc/ssh; pi's own file as on a Pi too (sshd started again)
    dropin = host.path("/etc/ssh/sshd_config.d/pibake-lab.conf")
    dropin.write_text(dropin.read_text().replace("AuthorizedKeysFile /etc/ssh/pibake_lab_authorized_keys",
                                                 "AuthorizedKeysFile /etc/ssh/pibake_lab_authorized_keys "
                                                 ".ssh/authorized_keys"))
    lab.stop_sshd(host)
    host.run(["/usr/sbin/sshd"], timeout=30)
    check = lab.ssh(f"pi@{name}", "sudo -n id -un", check=False)  # sshd daemonized listening
    assert check.stdout.strip() == "root", check.stderr
    proc = run_pibake(lab, ["deploy", "--hosts", name, "--json", "--wheel", str(lab.wheel), "--user", "pi"])
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    (row,) = json.loads(proc.stdout)["hosts"]
    assert (row["step"], row["status"], row["slurm_state"]) == ("idle", "changed", "idle"), row
    assert "/home/pi/.ssh/authorized_keys" in row["changes"]
    keys = host.path("/home/pi/.ssh/authorized_keys").read_text().splitlines()
    assert keys[0] == login_key and len(keys) == 2 and keys[1].endswith(" pibake-manager@deploy"), keys
    assert host.path("/etc/pibake/agent.json").stat().st_uid == 0  # written as root, through sudo
    # the sudo session ended with the deploy: nothing of it is left on the host
    assert host.run(["pgrep", "-u", "pi"], check=False).stdout == ""


def test_bench_deploy_on_trixie_smoke(tmp_path, lab_rootfs):
    """bench/deploy --rootfs --ssh-client rootfs runs (N=1, the single ssh operations first): the hosts are the
    rootfs's, deploy's ssh is the rootfs's OpenSSH 10 client, so the key exchange is OpenSSH 10's post-quantum
    default; the wrapper's own cost is measured and on the page. The figures are not checked."""
    reason = deploy_lab_missing()
    if reason:
        pytest.skip(reason)
    bench = Path(__file__).resolve().parents[2] / "bench" / "deploy"
    before = set(Path("/run").glob("pibake-bench-ssh-*"))
    proc = subprocess.run([sys.executable, str(bench), "--rootfs", "--ssh-client", "rootfs", "--sizes", "1",
                           "--no-sequential", "--ssh-costs", "--report-dir", str(tmp_path), "--report-name", "t"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "t.json").read_text())
    (host,) = data["results"][0]["hosts"]
    assert (host["status"], host["step"]) == ("changed", "idle")
    assert data["results"][0]["rerun_hosts"][0]["status"] == "unchanged"
    info = data["lab_rootfs"]
    assert info["hosts"] == "rootfs" and info["versions"]["slurmd"].startswith("24.11")
    assert info["ssh_client"]["version"].startswith("OpenSSH_10.") and info["ssh_client"]["wrapper_overhead_ms"] > 0
    costs = data["ssh_costs"]
    assert costs["ssh_version"].startswith("OpenSSH_10.")
    assert any("mlkem768x25519-sha256" in line for line in costs["negotiated"]), costs["negotiated"]
    page = (tmp_path / "t.md").read_text()
    assert page.startswith("# bench/deploy --rootfs:") and "exec wrapper (bench/rootfs_ssh.py)" in page
    # the wrapper's work directory (its mounts lived in the holder's namespace) is gone with the run
    assert set(Path("/run").glob("pibake-bench-ssh-*")) <= before
