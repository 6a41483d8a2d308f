"""Must show (issue 6), with real OpenSSH, munge, Slurm and the registry: `pibake deploy --hosts` over ssh
makes three lab hosts that run only sshd idle Slurm workers; a re-run changes nothing; a manager whose
registry answers is left alone; a stopped host is reported alone with ssh's reason (exit 1) while the others
succeed; a manager without registry that cannot be reached over ssh fails and holds the workers back; every
command of docs/deploy.md runs (deploy-manager in test_deploy_manager.py). Tests run in file order on one
lab: manager red00 (registry, no sshd), workers red01-red03 with sshd only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.deploy_fixtures import deploy_lab, deploy_lab_missing, module_lab
from tests.e2e.verify_fixtures import doc_blocks as page_blocks
from tests.fixtures_plugin import new_cluster

WORKERS = (("red01", 11), ("red02", 12), ("red03", 13))
NAMES = [n for n, _ in WORKERS]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    reason = deploy_lab_missing()
    if reason:
        pytest.skip(reason)
    with module_lab(request, deploy_lab(tmp_path_factory.mktemp("deploy"), 60 + os.getpid() % 40, WORKERS,
                                        manager="red00")) as lab:
        yield lab


def run_pibake(lab, args):
    """``pibake ARGS`` against the lab: its cluster directory and its ssh config (own key, known_hosts)."""
    argv = [sys.executable, "-m", "pibake", "--cluster", str(lab.cluster_dir), *args,
            "--ssh-option=-F", f"--ssh-option={lab.ssh_config}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def pibake_deploy(lab, hosts, *extra):
    proc = run_pibake(lab, ["deploy", "--hosts", hosts, "--json", *extra])
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = None
    return proc, report


# deploy-manager is run by tests/e2e/test_deploy_manager.py (its manager runs only sshd until deploy sets it up)
DOC_BLOCKS = ("deploy-first", "deploy-manager", "deploy-again", "deploy-json", "deploy-failure", "deploy-options")


def doc_blocks():
    """{name: ([(argv, expected exit code)], json sample or None)} of docs/deploy.md's sh blocks."""
    return {name: (commands, sample) for name, (_body, commands, sample) in page_blocks("deploy.md").items()}


def run_doc_block(lab, name):
    """Run each command of block ``name`` as written, on the lab subnet instead of 10.1.1.0/24."""
    commands, sample = doc_blocks()[name]
    assert commands, f"docs/deploy.md: block {name} has no command"
    for argv, code in commands:
        assert argv[0] == "pibake"
        args = [a.replace("10.1.1.", f"10.77.{lab.octet}.") for a in argv[1:]]
        proc = run_pibake(lab, args)
        assert proc.returncode == code, f"{name}: {' '.join(argv)} exited {proc.returncode}\n{proc.stderr}"
    return proc, sample


def same_keys(sample, real, where="$"):
    """The keys a documented JSON sample shows are the keys the command prints (recursively)."""
    if isinstance(sample, dict):
        assert isinstance(real, dict) and set(sample) == set(real), f"{where}: {sorted(sample)} vs {sorted(real)}"
        for key in sample:
            same_keys(sample[key], real[key], f"{where}.{key}")
    elif isinstance(sample, list) and sample and real:
        same_keys(sample[0], real[0], f"{where}[0]")


def daemons(lab, name):
    host = lab.hosts[name]
    return {d: host.run(["pgrep", "-x", d], check=False).stdout.split() for d in ("munged", "slurmd")}


def _peers(pid):
    """The IPv4 addresses process ``pid``'s TCP sockets are connected to (its fds' socket inodes looked up
    in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    peers = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            addr = bytes.fromhex(fields[2].split(":")[0])[::-1]
            peers.add(".".join(str(b) for b in addr))
    return peers


def leftover_ssh(lab):
    """ssh processes still connected to the lab's hosts (deploy returns once every host's session ended; another
    run on this machine, e.g. CI, has other addresses)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[0]
            if (os.path.basename(argv0) == "ssh" or argv0.startswith("ssh: ")) and \
                    any(ip.startswith(f"10.77.{lab.octet}.") for ip in _peers(pid)):
                left.append((pid, argv0))
        except OSError:  # exited meanwhile
            continue
    return left


def test_three_sshd_only_hosts_become_idle(lab):
    for name in NAMES:  # nothing but sshd runs there, nothing of pibake is installed
        assert daemons(lab, name) == {"munged": [], "slurmd": []}
        assert not lab.hosts[name].path("/etc/pibake/agent.json").exists()
    proc, report = pibake_deploy(lab, "red[01-03]")
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    assert report["ok"] is True and report["summary"] == {"hosts": 3, "changed": 3, "unchanged": 0, "failed": 0}
    assert report["manager"] == "red00" and report["registry"] == f"https://{lab.manager_ip}:8443"
    for host, name in zip(report["hosts"], NAMES):
        assert host["host"] == name and host["hostname"] == name
        assert (host["step"], host["status"], host["slurm_state"], host["error"]) == ("idle", "changed", "idle", None)
        assert "enrolment new" in host["changes"] and "slurmd started" in host["changes"]
        assert "/etc/pibake/agent.json" in host["changes"] and "/usr/local/lib/pibake/agent.py" in host["changes"]
        # packages: all installed here; the other steps ran in the host's one ssh session
        assert set(host["timings"]) == {"connect", "files", "agent", "idle"}
    # the per-host table on stderr
    table = proc.stderr[proc.stderr.index("HOST "):].splitlines()
    assert [line.split()[:4] for line in table[1:4]] == [[n, n, "idle", "changed"] for n in NAMES]
    assert table[4] == "3 host(s): 3 changed, 0 unchanged, 0 failed"
    # every host's ssh session ended with the deploy
    assert not leftover_ssh(lab)
    # Slurm agrees, and runs a job on all three
    assert all(lab.wait_idle(NAMES)[n] == "idle" for n in NAMES)
    out = lab.mgr.run(["srun", "-N3", "hostname"], timeout=60).stdout
    assert sorted(out.split()) == NAMES
    # files on a node: config without the token, token file gone (the agent removed it), modes
    h = lab.hosts["red01"]
    config = json.loads(h.path("/etc/pibake/agent.json").read_text())
    assert "join_token" not in config and config["registry_url"] == "https://red00:8443"
    assert not h.path("/etc/pibake/join-token").exists()
    assert h.run(["stat", "-c", "%a", "/etc/pibake", "/etc/pibake/agent.json", "/usr/local/lib/pibake/agent.py",
                  "/etc/munge/munge.key"]).stdout.split() == ["700", "600", "755", "400"]
    assert h.path("/etc/hosts").read_text().count(f"{lab.manager_ip} red00") == 1
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


def test_manager_in_hosts_with_its_registry_answering_is_left_alone(lab):
    proc, report = pibake_deploy(lab, "red00,red01")
    assert proc.returncode == 0, proc.stderr
    assert report["summary"] == {"hosts": 2, "changed": 0, "unchanged": 2, "failed": 0}
    m, w = report["hosts"]
    # no ssh session to the manager (it runs no sshd here): /health answered, so nothing to do there
    assert (m["host"], m["hostname"], m["role"], m["step"], m["status"], m["changes"], m["error"]) == (
        "red00", "red00", "manager", "ready", "unchanged", [], None)
    assert list(m["timings"]) == ["registry"]
    assert (w["host"], w["role"], w["step"], w["status"]) == ("red01", "worker", "idle", "unchanged")
    assert proc.stderr.splitlines()[-1] == "2 host(s): 0 changed, 2 unchanged, 0 failed"


def test_the_manual_page_commands(lab):
    assert tuple(doc_blocks()) == DOC_BLOCKS
    for name in ("deploy-first", "deploy-again", "deploy-options"):
        proc, _ = run_doc_block(lab, name)
        assert "failed" not in proc.stderr.splitlines()[-1].replace("0 failed", ""), proc.stderr
    proc, sample = run_doc_block(lab, "deploy-json")
    report = json.loads(proc.stdout)
    assert sample is not None, "docs/deploy.md: the deploy-json block must be followed by its JSON output"
    same_keys(sample, report)
    timings = sample["hosts"][0]["timings"]
    assert set(timings) == set(report["hosts"][0]["timings"]) == {"connect", "agent", "idle"}
    assert report["summary"] == {"hosts": 3, "changed": 0, "unchanged": 3, "failed": 0}


def reconfigured_since_restart(lab):
    """True when slurmctld's log shows a `scontrol reconfigure` processed after its latest start."""
    lines = lab.mgr.path("/var/log/slurm/slurmctld.log").read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if "slurmctld version" in line and "started on cluster" in line]
    reconf = [i for i, line in enumerate(lines) if "Processing Reconfiguration Request" in line]
    return bool(starts and reconf and reconf[-1] > starts[-1])


def test_a_node_removed_in_the_registry_is_enrolled_again(lab):
    status, _ = lab.api("DELETE", "/nodes/red01")
    assert status == 200
    proc, report = pibake_deploy(lab, "red01")
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    (host,) = report["hosts"]
    assert (host["step"], host["status"], host["slurm_state"]) == ("idle", "changed", "idle")
    assert "enrolment new" in host["changes"]
    assert not lab.hosts["red01"].path("/etc/pibake/join-token").exists()
    assert lab.wait_idle(NAMES)["red01"] == "idle"
    # the registry sends its reconfigure a moment after the restart that added red01 back: red01's slurmd must
    # survive it (deploy said idle), or the next deploy finds it dead
    wait_for("slurmctld to process the registry's deferred reconfigure", lambda: reconfigured_since_restart(lab),
             timeout=30)
    before = daemons(lab, "red01")["slurmd"]
    assert before, ("red01's slurmd is gone after the registry's reconfigure that followed its re-enrolment (deploy "
                    f"had seen it idle)\n{lab.diagnostics()}")
    assert lab.wait_idle(NAMES)["red01"] == "idle" and daemons(lab, "red01")["slurmd"] == before


def test_a_step_that_overruns_or_loses_its_session_fails_its_host_alone(lab, monkeypatch):
    """The runner's three ways a step ends without its result line, through real ssh sessions: the session on
    the node kills a step at its timeout (red01, its whole process group); a session that dies in the middle of
    a step (red02); a session that stops answering is closed by deploy at the step's deadline (red03, whose
    session waited for a free slot first: its deadline counts from its start)."""
    from pibake.cluster import load_cluster
    from pibake.deploy import manager_key_authorization, runner, steps
    from pibake.secrets import seed_secrets
    from pibake.ssh import SshOptions

    cluster = load_cluster(lab.cluster_dir)
    auth = manager_key_authorization(cluster, seed_secrets(lab.cluster_dir).manager_ssh_key)
    inputs = steps.Inputs(cluster, {"agent": b"", "ca": b"", "token": "", "authorize": auth})
    shells = {"red01": ("sleep 60 & wait", 1), "red02": ("kill -KILL $PPID; sleep 60", 60),
              "red03": ("kill -STOP $PPID; sleep 60", 1)}
    monkeypatch.setitem(steps.COMMANDS, "packages", lambda host, _inputs: steps.Command(
        "packages", shells[host.result.host][0], timeout=shells[host.result.host][1]))
    monkeypatch.setattr(runner, "STEP_GRACE_S", 0)  # red03's deadline: 1 s + ssh's connect timeout (2 s)
    hosts = [steps.HostState.for_target(name) for name in NAMES]
    try:
        # two sessions at once: red03's waits for a slot, and its deadlines count from its own start
        runner.Runner(inputs, parallel=2, ssh=SshOptions(extra=lab.ssh_options, connect_timeout=2)).run(hosts)
        rows = {h.result.host: (h.result.step, h.result.status, h.result.error) for h in hosts}
        assert rows["red01"] == rows["red03"] == ("packages", "failed", "packages: did not finish in time on the node")
        assert rows["red02"][:2] == ("packages", "failed") and rows["red02"][2].startswith("packages: apt-get exited")
        assert all(set(h.result.timings) == {"connect", "packages"} for h in hosts)
        assert lab.hosts["red01"].run(["pgrep", "-x", "sleep"], check=False).stdout == ""  # killed with its group
        assert not leftover_ssh(lab)
    finally:  # the stopped session on red03
        lab.hosts["red03"].run(["pkill", "-KILL", "-f", "one ssh session there"], check=False)


def test_stopped_host_is_reported_alone(lab):
    stopped = lab.stop_host("red03")
    proc, report = pibake_deploy(lab, "red[01-03]", "--connect-timeout", "3")
    assert proc.returncode == 1, proc.stderr
    assert report["ok"] is False
    assert report["summary"] == {"hosts": 3, "changed": 0, "unchanged": 2, "failed": 1}, report["hosts"]
    w1, w2, w3 = report["hosts"]
    assert (w1["status"], w2["status"]) == ("unchanged", "unchanged")
    assert w3["host"] == "red03" and w3["status"] == "failed" and w3["step"] == "connect"
    # ssh's own reason: the address is gone (no ARP answer) -> "No route to host" or a connect timeout
    assert w3["error"].startswith(f"ssh: connect to host {stopped.ip} port 22: "), w3["error"]
    assert w3["error"].split(": ")[-1] in ("No route to host", "Connection timed out"), w3["error"]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("red03 ")]
    assert lines and lines[-1].split()[:4] == ["red03", "-", "connect", "failed"]
    assert "1 failed" in proc.stderr
    proc, _ = run_doc_block(lab, "deploy-failure")  # the manual's command: exits 1
    assert proc.stderr.splitlines()[-1] == "3 host(s): 0 changed, 2 unchanged, 1 failed"


def test_stopped_sshd_says_connection_refused(lab):
    lab.hosts["red02"].run(["pkill", "-x", "sshd"])
    proc, report = pibake_deploy(lab, "red[01-02]")
    assert proc.returncode == 1
    w1, w2 = report["hosts"]
    assert w1["status"] == "unchanged"
    assert w2["error"] == f"ssh: connect to host {lab.ip(12)} port 22: Connection refused"


def test_another_clusters_registry_is_never_taken_over(lab, tmp_path):
    """A registry answers at the manager's address, but with another CA: deploy must not set up (overwrite)
    that manager; it says why, and holds the workers back."""
    other = new_cluster(tmp_path / "other", manager_ip=lab.manager_ip, network=f"10.77.{lab.octet}.0/24", name="other")
    proc = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(other), "deploy", "--hosts", "red01",
                           "--json", "--ssh-option=-F", f"--ssh-option={lab.ssh_config}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    m, w = json.loads(proc.stdout)["hosts"]
    assert (m["host"], m["role"], m["step"], m["status"]) == ("red00", "manager", "registry", "failed")
    assert m["error"] == (f"registry: https://{lab.manager_ip}:8443/api/v1/health: TLS check against the cluster "
                          "CA failed (SSLError); deploy sets up only a manager whose registry is not running (is it "
                          "this cluster's manager?)")
    assert w["error"] == "manager not ready: red00 failed at registry"
    assert lab.api("GET", "/health", auth=None)[0] == 200  # the running registry is untouched


def test_manager_without_registry_and_unreachable_holds_the_workers_back(lab):
    lab.stop_registry()
    before = daemons(lab, "red01")
    proc, report = pibake_deploy(lab, "red01", "--connect-timeout", "3")
    assert proc.returncode == 1, proc.stderr
    assert report["summary"] == {"hosts": 2, "changed": 0, "unchanged": 0, "failed": 2}
    m, w = report["hosts"]  # the manager was not in --hosts: deploy tried to set it up, so it has a row, first
    assert (m["host"], m["role"], m["step"], m["status"]) == ("red00", "manager", "connect", "failed")
    assert m["error"] == f"ssh: connect to host {lab.manager_ip} port 22: Connection refused"
    assert (w["host"], w["role"], w["step"], w["status"], w["error"]) == (
        "red01", "worker", "connect", "failed", "manager not ready: red00 failed at connect")
    assert daemons(lab, "red01") == before  # the worker was not touched
    # --manager by IP: the row names what ssh was given
    proc, report = pibake_deploy(lab, "red01", "--manager", lab.manager_ip)
    assert proc.returncode == 1
    assert report["hosts"][0]["host"] == lab.manager_ip
    assert report["hosts"][1]["error"] == f"manager not ready: {lab.manager_ip} failed at connect"
    for secret in (lab.token(), (lab.sdir / "admin-password").read_text().strip()):
        assert secret not in proc.stdout and secret not in proc.stderr


def test_bench_deploy_smoke(tmp_path):
    """bench/deploy runs (N=1, no sequential loop, the single ssh operations measured first) and writes its
    report; the figures are not checked."""
    reason = deploy_lab_missing()
    if reason:
        pytest.skip(reason)
    bench = Path(__file__).resolve().parents[2] / "bench" / "deploy"
    proc = subprocess.run([sys.executable, str(bench), "--sizes", "1", "--no-sequential", "--ssh-costs",
                           "--report-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "deploy.json").read_text())
    assert [r["n"] for r in data["results"]] == [1]
    (host,) = data["results"][0]["hosts"]
    assert host["status"] == "changed" and host["step"] == "idle"
    assert data["results"][0]["rerun_hosts"][0]["status"] == "unchanged"
    page = (tmp_path / "deploy.md").read_text()
    assert "| 1 |" in page and "shared CPU (manager + deploying machine" in page
    ops = data["ssh_costs"]["ops"]  # every operation cost the deploying side something, a new connection most
    assert len(ops) == 6 and all(op["deployer"] > 0 for op in ops.values())
    assert ops["new connection + `true`, key exchange default"]["deployer"] > \
        ops["session through an open master + `true`"]["deployer"]
    assert "| session through an open master + `true` |" in page
