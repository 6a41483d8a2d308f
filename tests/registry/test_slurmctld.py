"""The registry puts slurm.conf in force on a real slurmctld (Slurm 22.05 here): restart on node changes,
reconfigure for settings only; enrol returns once the node is known to slurmctld."""

import pytest

from pibake.registry.app import create_app
from pibake.registry.service import RegistryService
from tests.registry.conftest import enrolment


@pytest.fixture
def slurm_app(cluster_dir, slurm_sandbox):
    app = create_app(cluster_dir, slurm_conf=str(slurm_sandbox.conf), slurm_apply="direct",
                     slurm_settings=slurm_sandbox.settings, apply_timeout=30)
    return app, slurm_sandbox


def _node_field(box, name, field):
    out = box.scontrol("show", "node", name)
    assert out.returncode == 0, out.stderr + box.log()[-2000:]
    for token in out.stdout.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    raise AssertionError(f"{field} not in {out.stdout}")


def test_enrol_add_remove_nodes_on_real_slurmctld(slurm_app, creds):
    app, box = slurm_app
    client = app.test_client()
    assert not box.conf.exists()

    r = client.post("/api/v1/enrol", json=enrolment("red01", 1, kind="vm"), headers=creds.join)
    assert r.status_code == 201, r.get_data(as_text=True) + box.log()[-2000:]
    # in force when enrol returned: slurmctld is up and knows the node, with its address and topology
    assert _node_field(box, "red01", "NodeAddr") == "127.0.77.1"
    assert _node_field(box, "red01", "CoresPerSocket") == "2"
    assert _node_field(box, "red01", "RealMemory") == "23360"
    first_pid = box.slurmctld_pid()
    assert first_pid

    # a job queued now must survive the restart that adding a node needs
    job = __import__("subprocess").run(["sbatch", "--parsable", "-N1", "--wrap", "sleep 600"],
                                       capture_output=True, text=True, env=box.env, timeout=30)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]

    r = client.post("/api/v1/enrol", json=enrolment("red02", 2, kind="vm"), headers=creds.join)
    assert r.status_code == 201
    assert _node_field(box, "red02", "NodeAddr") == "127.0.77.2"
    assert box.slurmctld_pid() != first_pid  # 22.05 cannot add nodes by reconfigure: restarted
    assert "NodeName=red[01-02] NodeAddr=127.0.77.[1-2]" in box.conf.read_text()
    squeue = __import__("subprocess").run(["squeue", "-h", "-o", "%i", "-j", job_id], capture_output=True,
                                          text=True, env=box.env, timeout=30)
    assert squeue.stdout.split() == [job_id]

    # the page/API reads states from sinfo
    nodes = client.get("/api/v1/nodes", auth=creds.admin).json
    assert {n["hostname"]: n["slurm_state"] for n in nodes}.keys() == {"red01", "red02"}
    assert all(n["slurm_state"] for n in nodes)  # e.g. "unknown*"/"down*" while no slurmd runs

    # re-enrolment of a known node changes nothing in Slurm: no restart
    pid = box.slurmctld_pid()
    assert client.post("/api/v1/enrol", json=enrolment("red02", 2, kind="vm"), headers=creds.join).status_code == 200
    assert box.slurmctld_pid() == pid

    # settings only: reconfigure, no restart
    reg = RegistryService(app.extensions["pibake_registry"].cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct",
                   slurm_settings={**box.settings, "MessageTimeout": "25"})
    assert reg.apply_slurm()["action"] == "reconfigured"
    assert box.slurmctld_pid() == pid
    config = box.scontrol("show", "config").stdout
    assert "MessageTimeout          = 25 sec" in config

    # removal: restart, the node is gone
    assert client.delete("/api/v1/nodes/red02", auth=creds.admin).status_code == 200
    assert box.scontrol("show", "node", "red02").returncode != 0
    assert _node_field(box, "red01", "NodeAddr") == "127.0.77.1"


def test_accept_in_approval_mode_reaches_slurmctld(cluster_dir, slurm_sandbox, creds):
    box = slurm_sandbox
    app = create_app(cluster_dir, require_approval=True, slurm_conf=str(box.conf), slurm_apply="direct",
                     slurm_settings=box.settings, apply_timeout=30)
    client = app.test_client()
    r = client.post("/api/v1/enrol", json=enrolment("red01", 1, kind="vm"), headers=creds.join)
    assert r.json["status"] == "pending"
    assert box.slurmctld_pid() is None  # no accepted node yet: slurmctld is not started
    assert client.post("/api/v1/nodes/red01/accept", auth=creds.admin).status_code == 200
    assert _node_field(box, "red01", "NodeAddr") == "127.0.77.1"


def test_apply_failure_is_503_not_500(cluster_dir, slurm_sandbox, creds):
    box = slurm_sandbox
    bad = {**box.settings, "SelectType": "select/does-not-exist"}
    app = create_app(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=bad,
                     apply_timeout=5)
    r = app.test_client().post("/api/v1/enrol", json=enrolment("red01", 1, kind="vm"), headers=creds.join)
    assert r.status_code == 503
    assert "could not be put in force" in r.json["error"] and "retry" in r.json["error"]


def test_unordered_addresses_reach_slurmctld_paired_right(cluster_dir, slurm_sandbox):
    """Three identical nodes whose addresses do not ascend with their names: one folded line, and
    slurmctld gives each node its own address."""
    from pibake.registry.service import validate_enrolment

    box = slurm_sandbox
    reg = RegistryService(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                   apply_timeout=30)
    wanted = {"red01": "127.0.77.13", "red02": "127.0.77.11", "red03": "127.0.77.12", "red04": "127.0.78.2"}
    for i, (name, ip) in enumerate(wanted.items(), start=1):
        reg.store.enrol(validate_enrolment(enrolment(name, i, kind="vm", ip=ip)))
    assert reg.apply_slurm()["action"] == "restarted"
    lines = [ln for ln in box.conf.read_text().splitlines() if ln.startswith("NodeName=")]
    assert len(lines) == 1 and "NodeAddr=127.0.77.13,127.0.77.[11-12],127.0.78.2 " in lines[0]
    assert {name: _node_field(box, name, "NodeAddr") for name in wanted} == wanted


def test_enrolled_node_becomes_idle_when_its_slurmd_starts(slurm_app, creds):
    """Right after the enrol answer, a slurmd for the node registers and the node is idle; a job runs.
    (slurmd reads the registry's file here: configless fetching is what the lab e2e test covers, since a
    configless slurmd talks to the default munge socket and this test's munged has its own.)"""
    import subprocess
    import time

    app, box = slurm_app
    client = app.test_client()
    r = client.post("/api/v1/enrol", json=enrolment("red01", 1, kind="vm", ip="127.0.0.1"), headers=creds.join)
    assert r.status_code == 201
    started = subprocess.run(["slurmd", "-f", str(box.conf), "-N", "red01"], capture_output=True, text=True,
                             env=box.env, timeout=60)
    assert started.returncode == 0, started.stderr
    state = None
    for _ in range(150):  # bounded wait: slurmd registers within a second here
        state = {n["hostname"]: n["slurm_state"] for n in client.get("/api/v1/nodes", auth=creds.admin).json}
        if state.get("red01") == "idle":
            break
        time.sleep(0.2)
        app.extensions["pibake_registry"]._sinfo_cache = (0.0, None)  # read sinfo afresh
    assert state == {"red01": "idle"}, box.log()[-2000:]
    job = subprocess.run(["srun", "-N1", "-w", "red01", "echo", "ran"], capture_output=True, text=True,
                         env=box.env, timeout=60)
    assert job.returncode == 0 and job.stdout.strip() == "ran", job.stderr


def test_concurrent_enrolments_share_few_restarts(cluster_dir, slurm_sandbox):
    """A burst of enrolments (as `pibake deploy` onto many hosts makes) shares few slurmctld restarts, and each
    enrolment returns only once slurmctld knows that node."""
    import threading

    box = slurm_sandbox
    reg = RegistryService(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                   apply_timeout=30)
    reg.enrol(enrolment("red01", 1, kind="vm"))  # slurmctld starts with the first node
    assert reg.applier.counters.get("restarted") == 1
    first_pid = box.slurmctld_pid()
    assert first_pid

    names = [f"red{i:02d}" for i in range(2, 14)]
    barrier = threading.Barrier(len(names))
    known, errors = {}, []

    def enrol(i, name):
        try:
            barrier.wait(timeout=30)
            reg.enrol(enrolment(name, i, kind="vm"))
            out = box.scontrol("show", "node", name)  # right when the answer came back
            known[name] = out.returncode == 0 and f"NodeName={name} " in out.stdout
        except Exception as exc:  # reported below with the node's name
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=enrol, args=(i, name)) for i, name in enumerate(names, start=2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert known == {name: True for name in names}, box.log()[-2000:]
    restarts = reg.applier.counters.get("restarted", 0) - 1
    assert 1 <= restarts <= len(names) // 4, reg.applier.counters  # 12 enrolments, at most 3 restarts
    assert box.slurmctld_pid() != first_pid
    assert box.scontrol("show", "node", "red01").returncode == 0


def test_the_conf_follows_this_machines_slurm_22_05(cluster_dir, slurm_sandbox):
    """The shared-root tests run the build machine's own Slurm (22.05 on Debian 12; the lab's trixie root runs
    24.11, tests/e2e/test_lab.py): the registry reads its version from `slurmctld -V` and slurmctld 22.05
    runs on the file generated for it, CredType included; adding a node needs a restart there."""
    import subprocess

    from pibake.registry.slurmconf import parse_slurm_version

    box = slurm_sandbox
    reg = RegistryService(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                   apply_timeout=30)
    reg.applier.reconfigure_grace = 0
    version = reg.applier.slurm_version()
    assert version == parse_slurm_version(subprocess.run(["slurmctld", "-V"], capture_output=True, text=True).stdout)
    assert version[:2] == (22, 5), f"this test covers the build machine's Slurm 22.05, found {version}"
    assert not reg.applier.reconfigure_adds_nodes()
    reg.enrol(enrolment("red01", 1, kind="vm"))
    config = box.scontrol("show", "config").stdout
    assert "CredType                = cred/munge" in config and "TaskPlugin              = task/none" in config
    assert "CredType=cred/munge" in box.conf.read_text() and "DebugFlags" not in box.conf.read_text()
    pid = box.slurmctld_pid()
    reg.enrol(enrolment("red02", 2, kind="vm"))
    assert box.slurmctld_pid() != pid and reg.applier.counters["restarted"] == 2


def test_slurmctld_start_waits_for_munge(cluster_dir, slurm_sandbox_without_munge, creds):
    """A worker that enrols before the manager's munged runs (a burned manager's first boot): the registry
    waits for munged instead of starting a slurmctld that must fail (24.11 under systemd does; this
    machine's 22.05 started directly waits, so the test checks the order: slurmctld starts after munged)."""
    import threading

    box = slurm_sandbox_without_munge
    app = create_app(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                     apply_timeout=30)
    late = threading.Timer(1.5, box.start_munge)
    late.start()
    try:
        r = app.test_client().post("/api/v1/enrol", json=enrolment("red01", 1, kind="vm"), headers=creds.join)
    finally:
        late.join()
    assert r.status_code == 201, r.get_data(as_text=True) + box.log()[-2000:]
    assert _node_field(box, "red01", "NodeAddr") == "127.0.77.1"
    counters = app.extensions["pibake_registry"].applier.counters
    assert counters.get("restarted") == 1 and "munge_not_ready" not in counters
    munged_pid = int((box.root / "munge" / "munged.pid").read_text())
    assert _process_start_time(box.slurmctld_pid()) >= _process_start_time(munged_pid)


def _process_start_time(pid):
    """Unix time a process started, from /proc/<pid>/stat (clock ticks after boot) and /proc/stat's btime."""
    import os

    ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
    btime = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def test_no_munge_no_slurmctld_start_and_a_503(cluster_dir, slurm_sandbox_without_munge, creds):
    box = slurm_sandbox_without_munge
    app = create_app(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                     apply_timeout=30)
    app.extensions["pibake_registry"].applier.munge_wait = 0.5
    r = app.test_client().post("/api/v1/enrol", json=enrolment("red01", 1, kind="vm"), headers=creds.join)
    assert r.status_code == 503
    assert "munge is not running" in r.json["error"] and str(box.socket) in r.json["error"]
    assert box.slurmctld_pid() is None and box.log() == ""  # slurmctld was never started


def test_munge_socket_from_authinfo():
    from pibake.registry.slurmctl import DEFAULT_MUNGE_SOCKET, munge_socket

    assert munge_socket("AuthType=auth/munge\nAuthInfo=socket=/tmp/x/munge.socket\n") == "/tmp/x/munge.socket"
    assert munge_socket("AuthInfo=cred_expire=120,socket=/s\n") == "/s"
    assert munge_socket("ClusterName=red\n") == DEFAULT_MUNGE_SOCKET
    assert munge_socket(None) == DEFAULT_MUNGE_SOCKET


def test_slurmctld_up_starts_scontrol_only_when_the_port_answers(slurm_app, creds, monkeypatch):
    """While nothing listens at SlurmctldPort (stopped, or starting after a restart) the answer comes from a
    TCP connect, without a process; when slurmctld listens, `scontrol ping` still decides."""
    import os
    import signal
    import time

    from pibake.registry import slurmctl

    app, box = slurm_app
    r = app.test_client().post("/api/v1/enrol", json=enrolment("red01", 1, kind="vm"), headers=creds.join)
    assert r.status_code == 201, r.get_data(as_text=True) + box.log()[-2000:]
    applier = app.extensions["pibake_registry"].applier
    commands = []
    real_run = slurmctl.run

    def counting_run(argv, *args, **kwargs):
        commands.append(argv)
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(slurmctl, "run", counting_run)
    assert applier.slurmctld_up() and commands == [["scontrol", "ping"]]

    pid = box.slurmctld_pid()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while slurmctl.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    commands.clear()
    assert not applier.slurmctld_up() and commands == []
