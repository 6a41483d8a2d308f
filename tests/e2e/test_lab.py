"""Must show (issue 5), with the real programs: `pibake init`, `pibake burn --output` for the manager and three
workers, `pibake lab up --from-images` boots every image's own seed (read back from its FAT boot partition) with
cloud-init's four stages in a lab host with its own Debian root; the manager's cloud-init brings up the registry
and slurmctld, the workers enrol, all idle in sinfo, `srun -N3 hostname` runs on them. Also: a seed that fails
cloud-init's schema boots nothing and names host and key; workers booted 20 s before the manager still enrol;
`lab down` removes a crashed lab by name.

Subnet 10.77.77.0/24 (and .78 for the second lab), names ``pt<pid>-*``/``pu<pid>-*``: traffic stays inside
namespaces this test creates (the lab bridge has no address on this machine).
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.fixtures_plugin import booted_lab, burned_cluster, lab_prefix, needs_lab, pibake

NET = "10.77.77"
WORKERS = ["red01", "red02", "red03"]


pytestmark = [pytest.mark.e2e, needs_lab("debootstrap")]


def leftovers(prefix):
    from pibake.lab.cluster import lab_exists

    return lab_exists(prefix)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`pibake init` on 10.77.77.0/24 and `pibake burn --output` of red00 (manager) and red[01-03]."""
    tmp, cdir, images = burned_cluster(tmp_path_factory.mktemp("lab"), NET, workers=3, comment="lab@e2e")
    assert sorted(p.name for p in images.iterdir()) == ["red00.img", "red01.img", "red02.img", "red03.img"]
    return tmp, cdir, images


def test_a_seed_failing_the_schema_boots_nothing_and_names_host_and_key(cluster, tmp_path):
    from pibake.bake.bootpart import read_seed, write_seed
    from pibake.model import Seed

    tmp, cdir, images = cluster
    bad = tmp_path / "images"
    bad.mkdir()
    for name in ("red00", "red01"):
        subprocess.run(["cp", "--sparse=always", images / f"{name}.img", bad], check=True)
    seed = read_seed(bad / "red01.img")
    user = yaml.safe_load(seed.user_data)
    user["package_update"] = "sometimes"  # not a boolean: cloud-init's schema rejects it
    write_seed(bad / "red01.img", Seed(user_data="#cloud-config\n" + yaml.safe_dump(user),
                                       meta_data=seed.meta_data, network_config=seed.network_config,
                                       instance_id=seed.instance_id))
    prefix = lab_prefix("ps")
    try:
        proc = pibake(cdir, "lab", "up", "--from-images", bad, "--prefix", prefix, check=False)
    finally:
        remains = leftovers(prefix)
        pibake(cdir, "lab", "down", "--prefix", prefix, check=False)
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("pibake: error:")]
    assert len(error) == 1, proc.stderr
    assert "red01" in error[0] and "package_update" in error[0] and "nothing was booted" in error[0]
    assert "red00:" not in error[0]  # the manager's seed is fine
    assert "booting" not in proc.stderr
    assert remains == []
    assert not os.path.exists(f"/run/pibake-lab/{prefix}.json")


@pytest.fixture(scope="module")
def lab(cluster):
    """The lab booted from the burned images, manager first (the normal order)."""
    tmp, cdir, images = cluster
    with booted_lab(cdir, images, "pt", diagnostics=lambda prefix: _diagnostics(cdir, prefix)) as (prefix, report,
                                                                                                   stderr):
        print(stderr, file=sys.stderr)  # the per-host timing table, for the CI log
        yield cdir, prefix, report, stderr


def _diagnostics(cdir, prefix):
    out = []
    for host, log in (("red00", "/var/log/pibake/pibake-registry.log"), ("red00", "/var/log/slurm/slurmctld.log"),
                      ("red01", "/var/log/pibake/pibake-agent.log"), ("red01", "/var/log/slurm/slurmd.log")):
        proc = pibake(cdir, "lab", "shell", host, "--prefix", prefix, "--", "tail", "-n", "40", log, check=False)
        out.append(f"--- {host}:{log}\n{proc.stdout}{proc.stderr}")
    return "\n".join(out)


def shell(lab, host, *argv, check=True):
    cdir, prefix = lab[0], lab[1]
    return pibake(cdir, "lab", "shell", host, "--prefix", prefix, "--", *argv, check=check, timeout=120)


def test_lab_up_boots_every_image_and_all_workers_go_idle(lab):
    cdir, prefix, report, stderr = lab
    hosts = {h["name"]: h for h in report["hosts"]}
    assert sorted(hosts) == ["red00"] + WORKERS
    assert hosts["red00"]["role"] == "manager" and all(hosts[w]["role"] == "worker" for w in WORKERS)
    for name, host in hosts.items():
        assert host["boot"]["ok"] and host["boot"]["status"] == "done" and host["boot"]["errors"] == [], host
        assert host["boot"]["hostname"] == name
        assert host["ip"] == f"{NET}.{10 + int(name[-2:])}"
    # the manager booted first: its cloud-init was done before any worker's started
    assert all(hosts["red00"]["timings"]["boot_done_s"] <= hosts[w]["timings"]["boot_start_s"] for w in WORKERS)
    assert all("idle_s" in hosts[w]["timings"] for w in WORKERS)
    assert report["timings"]["all_idle_s"] >= max(hosts[w]["timings"]["idle_s"] for w in WORKERS)
    assert "all workers idle after" in stderr

    sinfo = shell(lab, "red00", "sinfo", "-N", "-h", "-o", "%N %T").stdout
    states = dict(line.split() for line in sinfo.splitlines())
    assert states == {w: "idle" for w in WORKERS}
    out = shell(lab, "red00", "srun", "-N3", "hostname").stdout
    assert sorted(out.split()) == WORKERS


def test_cloud_init_reports_done_without_errors_on_every_host(lab):
    for name in ["red00"] + WORKERS:
        status = json.loads(shell(lab, name, "cloud-init", "status", "--format", "json").stdout)
        assert status["status"] == "done", (name, status)
        assert status["errors"] == [], (name, status)
        assert status["datasource"] == "nocloud", (name, status)
        # cloud-init 22.4's status JSON has no per-stage part: its own per-stage record has
        stages = json.loads(shell(lab, name, "cat", "/run/cloud-init/status.json").stdout)["v1"]
        for stage in ("init-local", "init", "modules-config", "modules-final"):
            assert stages[stage]["errors"] == [], (name, stage, stages[stage])
            assert stages[stage]["finished"], (name, stage)
        result = json.loads(shell(lab, name, "cat", "/run/cloud-init/result.json").stdout)["v1"]
        assert result["errors"] == [] and "file:///boot/firmware/" in result["datasource"], (name, result)


def test_each_host_booted_the_seed_burned_on_its_own_image(lab):
    from pibake.bake.bootpart import read_seed

    cdir, prefix, report, _ = lab
    for host in report["hosts"]:
        seed = read_seed(host["image"])
        instance = shell(lab, host["name"], "cat", "/var/lib/cloud/data/instance-id").stdout.strip()
        assert seed.instance_id and instance == seed.instance_id, host["name"]
        assert shell(lab, host["name"], "hostname").stdout.strip() == host["name"]
    # the manager installed pibake from the wheel burned on its boot partition
    wheels = shell(lab, "red00", "ls", "/boot/firmware/pibake").stdout.split()
    assert any(w.endswith(".whl") for w in wheels)
    shell(lab, "red00", "/opt/pibake/bin/python", "-c", "import pibake.registry")


def test_status_json_shows_every_host_running_enrolled_and_idle(lab):
    cdir, prefix, _, _ = lab
    status = json.loads(pibake(cdir, "lab", "status", "--prefix", prefix, "--json").stdout)
    assert status["registry"] == "answering"
    hosts = {h["name"]: h for h in status["hosts"]}
    for name, h in hosts.items():
        assert h["running"] and h["cloud_init"] == {"status": "done", "errors": []}, h
        assert h["enrolled"] is True and h["registry_status"] == "ready", h
        assert h["sshd"] is True, h
    assert {w: hosts[w]["slurm"] for w in WORKERS} == {w: "idle" for w in WORKERS}


def test_sshd_in_the_hosts_takes_the_cluster_key(lab):
    cdir, prefix, _, _ = lab
    key = cdir.parent / "key"
    for worker in WORKERS:
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{prefix}-red00", "--", "ssh", "-i", key, "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
             f"pi@{NET}.{10 + int(worker[-2:])}", "hostname"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == worker, proc.stderr


def test_shell_runs_a_command_and_returns_its_exit_code(lab):
    assert shell(lab, "red02", "sh", "-c", "exit 7", check=False).returncode == 7
    proc = shell(lab, "red09", "true", check=False)
    assert proc.returncode == 1 and "the lab has no host 'red09'" in proc.stderr


def test_nothing_leaves_the_lab(lab):
    cdir, prefix, _, _ = lab
    bridge = subprocess.run(["ip", "-o", "addr", "show", "dev", f"{prefix}-br"], capture_output=True, text=True,
                            check=True).stdout
    assert " inet " not in bridge  # this machine has no address on the lab's subnet: no route in or out
    links = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    mine = [line for line in links.splitlines() if line.split(":")[1].strip().startswith(f"{prefix}-")]
    assert mine == []  # no IPv6 link-local address either (hosts cannot reach this machine through fe80::)
    routes = shell(lab, "red01", "ip", "-4", "route").stdout.splitlines()
    assert all(" via " not in r for r in routes), routes  # no gateway: only the on-link lab subnet
    machine = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    assert NET + "." not in machine


def test_a_second_lab_up_with_the_same_prefix_is_refused(lab):
    cdir, prefix, _, _ = lab
    images = cdir.parent / "images"
    proc = pibake(cdir, "lab", "up", "--from-images", images, "--prefix", prefix, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"pibake: error: a lab is already running (prefix {prefix}: red00, red01, red02, "
                                   "red03): run `pibake lab down` first")
    assert shell(lab, "red01", "hostname").stdout.strip() == "red01"  # untouched


def test_the_lab_runs_trixie_and_its_slurmctld_24_11_takes_node_changes_by_reconfigure(lab):
    """The default lab root is Debian trixie, as Raspberry Pi OS trixie: cloud-init 25.1, Slurm 24.11, munge
    0.5.16, Python 3.13. The registry on the manager reads slurmctld's version and writes the file for 24.11;
    slurmctld starts once (the first worker) and takes every later NodeName change by `scontrol reconfigure`
    (23.11 on: a new slurmctld process hands over), never stopped (tests/registry covers 22.05's restarts)."""
    assert lab[2]["release"] == "trixie"
    versions = shell(lab, "red00", "sh", "-c", "slurmctld -V; munged -V; python3 -V; cloud-init --version").stdout
    assert "slurm-wlm 24.11." in versions and "munge-0.5.16" in versions and "Python 3.13." in versions, versions
    assert "cloud-init 25.1" in versions, versions
    conf = shell(lab, "red00", "cat", "/etc/slurm/slurm.conf").stdout
    assert "\nCredType=cred/munge\n" in conf and "\nDebugFlags=GLOB_SILENCE\n" in conf
    assert "CryptoType" not in conf and "/none" not in conf  # 23.11 removed the none plugins

    registry_log = shell(lab, "red00", "cat", "/var/log/pibake/pibake-registry.log").stdout
    # the start, for the first workers, with no reconfigure behind it (nothing older to push)
    assert registry_log.count("(slurmctld started)") == 1 and "(slurmctld restarted)" not in registry_log, registry_log
    assert "scontrol reconfigure sent" not in registry_log, registry_log

    handovers = "Relinquishing control to new slurmctld process"
    before = shell(lab, "red00", "cat", "/var/log/slurm/slurmctld.log").stdout.count(handovers)
    proc = shell(lab, "red00", "/opt/pibake/bin/pibake", "--cluster", "/var/lib/pibake/cluster", "registry", "remove",
                 "red03")
    assert "removed red03" in proc.stderr
    states = dict(line.split() for line in shell(lab, "red00", "sinfo", "-N", "-h", "-o", "%N %T").stdout.splitlines())
    assert states == {"red01": "idle", "red02": "idle"}  # gone from Slurm when `registry remove` returned
    log = shell(lab, "red00", "cat", "/var/log/slurm/slurmctld.log").stdout
    assert log.count(handovers) == before + 1, log  # the removal was one reconfigure...
    assert "Terminate signal" not in log, log  # ...and slurmctld was never stopped
    assert "Slurm does not support glob parsing" not in log  # silenced by DebugFlags=GLOB_SILENCE


def test_lab_down_removes_the_lab(lab):
    cdir, prefix, _, _ = lab
    assert leftovers(prefix)
    proc = pibake(cdir, "lab", "down", "--prefix", prefix)
    assert "removed 4 hosts" in proc.stderr
    assert leftovers(prefix) == []
    assert not os.path.exists(f"/tmp/pibake-lab-{prefix}")
    proc = pibake(cdir, "lab", "status", "--prefix", prefix, check=False)
    assert proc.returncode == 1 and "no lab is running" in proc.stderr


def test_workers_booted_20s_before_the_manager_still_enrol(cluster, tmp_path):
    """Order fault: the workers' cloud-init (and agents) run 20 s before the manager's; they retry and enrol."""
    tmp, cdir, images = cluster
    two = tmp_path / "images"
    two.mkdir()
    for name in ("red00", "red01", "red02"):
        subprocess.run(["cp", "--sparse=always", images / f"{name}.img", two], check=True)
    prefix = lab_prefix("pu")
    try:
        proc = pibake(cdir, "lab", "up", "--from-images", two, "--prefix", prefix, "--manager-delay", 20,
                      "--json", "--timeout", 300, check=False)
        assert proc.returncode == 0, proc.stderr + _diagnostics(cdir, prefix)
        hosts = {h["name"]: h for h in json.loads(proc.stdout)["hosts"]}
        manager_start = hosts["red00"]["timings"]["boot_start_s"]
        for worker in ("red01", "red02"):
            t = hosts[worker]["timings"]
            assert round(t["boot_done_s"] + 20, 2) <= manager_start, t  # booted (agent started) 20 s before the manager (timings have 0.01 s resolution: 3.74 + 20 is 23.740000000000002 in floats)
            assert t["idle_s"] > manager_start
        log = pibake(cdir, "lab", "shell", "red01", "--prefix", prefix, "--", "cat",
                     "/var/log/pibake/pibake-agent.log").stdout
        assert "retrying" in log and "enrolled as red01" in log
        out = pibake(cdir, "lab", "shell", "red00", "--prefix", prefix, "--", "srun", "-N2", "hostname").stdout
        assert sorted(out.split()) == ["red01", "red02"]

        # a crash: the state file is gone (e.g. /run was lost); `lab down` still finds everything by name
        os.unlink(f"/run/pibake-lab/{prefix}.json")
        down = pibake(cdir, "lab", "down", "--prefix", prefix)
        assert "removed 3 hosts" in down.stderr
        assert leftovers(prefix) == []
    finally:
        pibake(cdir, "lab", "down", "--prefix", prefix, check=False)


def test_lab_up_without_images_burns_its_own_and_a_crash_mid_boot_is_cleaned_by_name(cluster):
    """`lab up` without --from-images burns the plan's manager and workers onto a synthetic Pi-like image;
    killed (SIGKILL) while its hosts boot, it leaves namespaces and processes that `lab down` finds by name."""
    import signal
    import time

    tmp, cdir, images = cluster
    prefix = lab_prefix("pv")
    proc = subprocess.Popen([sys.executable, "-m", "pibake", "--cluster", str(cdir), "lab", "up", "--workers", "1",
                             "--prefix", prefix], stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("lab: booting red01"):
                break
        assert any("burning red00 (manager) and red01" in line for line in seen), seen
        time.sleep(1)  # red01's cloud-init is running
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        state = json.loads(open(f"/run/pibake-lab/{prefix}.json").read())
        pids = [h["pid"] for h in state["hosts"]]
        assert [h["name"] for h in state["hosts"]] == ["red00", "red01"]
        assert leftovers(prefix) and all(_running(pid) for pid in pids)
    finally:
        proc.kill()
        down = pibake(cdir, "lab", "down", "--prefix", prefix)
    assert "removed 2 hosts" in down.stderr
    assert leftovers(prefix) == []
    assert not any(_running(pid) for pid in pids)
    assert not os.path.exists(f"/tmp/pibake-lab-{prefix}")


def _running(pid):
    """True while ``pid`` runs (a killed process may stay a zombie until this machine's PID 1 reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
