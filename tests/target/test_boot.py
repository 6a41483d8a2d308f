"""The real target (issue 11): the very image `pibake burn` writes boots as an arm64 Raspberry Pi OS trixie-like
system under systemd (qemu-system-aarch64, TCG) and becomes an idle Slurm node; the manager image boots too.

What is checked from outside, as a person at the cluster would: the console reaches a login prompt and
"cloud-init ... finished"; over ssh with the seed's key: systemd is PID 1, the hostname and the planned static
address (configured by NetworkManager from the seed's network-config through netplan), cloud-init done without
errors, the agent started by its systemd unit, the munge key 0400; then the node is enrolled, idle in sinfo and
`srun uname -m` on it prints aarch64.

docs/commands.md's cmd-lab-target block is this path: the session's image comes from `pibake lab target-image`
(run in the background by tests/target/conftest.py) and each card from `pibake burn --image` of it.

Slow (the first run builds and caches the arm64 image under /var/cache/pibake/target; each boot is a minute or
two of emulation): deselect with `-m "not target"` on a developer machine. Networks: lab bridges this test
creates (10.77.9x.0/24, no address on this machine); the VMs have no other network.
"""

import json
import subprocess

import pytest

from tests.conftest import needs_program, needs_root
from tests.fixtures_plugin import make_ssh_key
from tests.lab.sandbox import namespaces_missing

pytestmark = [
    pytest.mark.target,
    pytest.mark.e2e,
    needs_root("booting the emulated Pi needs root (taps, namespaces, binfmt_misc)"),
    needs_program("qemu-system-aarch64", "mmdebstrap", "arch-test", "debootstrap", "mcopy", "ssh"),
    pytest.mark.skipif(bool(namespaces_missing()), reason=namespaces_missing() or "ok"),
]

BOOT_TIMEOUT = 1200  # s from power-on to cloud-init finished, under TCG on a busy 2-CPU machine
JOIN_TIMEOUT = 600  # s from cloud-init finished to idle in sinfo


@pytest.fixture(scope="session")
def target_image():
    from pibake.lab.target import ensure_target_image

    return ensure_target_image(progress=lambda line: print(f"target image: {line}", flush=True))


def _prefix(family):
    from pibake.lab import cleanup_stale, run_prefix

    cleanup_stale(family)
    return run_prefix(family)


def _key(tmp):
    return make_ssh_key(tmp, "target@test", name="key")


@pytest.fixture(scope="session")
def baked_worker_image(tmp_path_factory, target_image):
    """The target image baked for the worker role by `pibake image bake` (offline: apt reads only the image's
    own local repository), cached under /var/cache/pibake/baked so CI reruns take a cache hit. The worker VM
    boots this card, so the one worker boot covers the golden-image path (a plain image's first-boot apt
    run is covered by the manager's boot, which installs chrony)."""
    from pibake.api import bake_image
    from pibake.cluster import init_cluster
    from pibake.lab.target import TargetImage

    tmp = tmp_path_factory.mktemp("target-bake")
    key = _key(tmp)
    init_cluster(tmp / "cluster", manager="red00", manager_ip="10.77.91.10", network="10.77.91.0/24",
                 ssh_key_files=[f"{key}.pub"], timezone="Etc/UTC")
    baked = bake_image(str(target_image.path), tmp / "cluster", "worker", offline=True,
                       progress=lambda line: print(f"bake: {line}", flush=True))
    return TargetImage(path=baked.path, stamp={**target_image.stamp, "baked": baked.stamp})


@pytest.fixture(scope="module")
def worker_join(tmp_path_factory, baked_worker_image):
    """A lab manager host (netns, the lab's Debian root) and red01 as an emulated Pi from the target image,
    baked for the worker role."""
    from pibake.lab.targetrun import worker_join

    tmp = tmp_path_factory.mktemp("target-join")
    tmp.chmod(0o755)
    key = _key(tmp)
    with worker_join(tmp, net="10.77.91", prefix=_prefix("tj"), target_image=baked_worker_image,
                     ssh_key_file=f"{key}.pub", progress=print) as ctx:
        try:
            yield {**ctx, "key": key, "image": baked_worker_image, "card": tmp / "cards" / "red01.img"}
        finally:
            print(f"--- red01 console (last lines) ---\n{ctx['pi'].vm.tail(40)}")


def _ssh(ctx, command):
    from pibake.lab.targetrun import pi_ssh

    return pi_ssh(ctx["prefix"], ctx["key"], "pi", ctx["pi"].ip, command)


def test_worker_image_boots_under_systemd_with_the_seed_applied(worker_join):
    pi = worker_join["pi"]
    phases = pi.wait_console(timeout=BOOT_TIMEOUT)
    assert phases["kernel"] <= phases["systemd"] <= phases["login_prompt"]
    console = pi.console()
    assert "Cloud-init" in console and "finished" in console

    facts = _ssh(worker_join, "ps -p 1 -o comm=; hostname; uname -m; ip -4 -o addr show dev eth0; "
                              "nmcli -t -f NAME,DEVICE connection show --active; "
                              "cloud-init status --long; systemctl is-enabled pibake-agent.service; "
                              "sudo stat -c '%a %U' /etc/munge/munge.key")
    assert facts.returncode == 0, facts.stderr
    out = facts.stdout
    lines = out.splitlines()
    assert lines[0] == "systemd", out
    assert lines[1] == "red01" and lines[2] == "aarch64", out
    assert f"inet {pi.ip}/24" in out, out
    assert any(line.endswith(":eth0") for line in lines), f"NetworkManager has no active connection on eth0: {out}"
    assert "status: done" in out and "errors: []" in out, out
    assert "enabled" in lines
    assert "400 munge" in out, out


def test_worker_enrols_and_runs_jobs_as_aarch64(worker_join):
    from pibake.lab.targetrun import manager_run, wait_joined

    pi = worker_join["pi"]
    pi.wait_console(timeout=BOOT_TIMEOUT)
    phases = wait_joined(pi, worker_join["prefix"], timeout=JOIN_TIMEOUT)
    assert phases["enrolled"] <= phases["idle"]
    job = manager_run(worker_join["prefix"], ["srun", "-N1", "-w", "red01", "uname", "-m"], timeout=120)
    assert job.returncode == 0, job.stderr
    assert job.stdout.strip() == "aarch64"
    agent = _ssh(worker_join, "systemctl is-active pibake-agent.service; systemctl is-active slurmd munge")
    assert agent.stdout.split() == ["active", "active", "active"], agent.stdout + agent.stderr
    version = manager_run(worker_join["prefix"], ["scontrol", "show", "node", "red01"]).stdout
    assert "Arch=aarch64" in version, version


def test_baked_worker_first_boot_runs_no_apt(worker_join):
    """The burn saw the bake marker: the seed installs nothing, cloud-init ran no apt-get, and the packages
    are there (baked), so the node still enrols and goes idle (the next tests)."""
    import yaml

    from pibake.bake.bootpart import read_seed
    from pibake.layout import ROLE_PACKAGES

    seed = yaml.safe_load(read_seed(worker_join["card"]).user_data)
    assert seed["package_update"] is False and "packages" not in seed, seed
    worker_join["pi"].wait_console(timeout=BOOT_TIMEOUT)
    probe = _ssh(worker_join, "sudo cat /etc/pibake/baked.json; echo ---; "
                              "sudo grep -c -E \"'apt-get'|apt-get \" /var/log/cloud-init.log; echo ---; "
                              "dpkg-query -W -f '${Package} ${db:Status-Status}\\n' " + " ".join(ROLE_PACKAGES["worker"]))
    marker, apt_lines, dpkg = probe.stdout.split("---\n")
    assert json.loads(marker)["role"] == "worker", probe.stdout
    assert apt_lines.strip() == "0", f"cloud-init ran apt-get at first boot: {probe.stdout}"
    assert sorted(dpkg.split()) == sorted([*ROLE_PACKAGES["worker"], *["installed"] * len(ROLE_PACKAGES["worker"])]), probe.stdout


@pytest.fixture(scope="module")
def manager_boot(tmp_path_factory, target_image):
    """red00 (the manager) as an emulated Pi from the target image, and red01 as a lab host (netns) that
    enrols with it. The manager's pibake comes from the running pibake (no --wheel)."""
    from pibake.lab.targetrun import manager_boot

    tmp = tmp_path_factory.mktemp("target-manager")
    tmp.chmod(0o755)
    key = _key(tmp)
    with manager_boot(tmp, net="10.77.92", prefix=_prefix("tm"), target_image=target_image,
                      ssh_key_file=f"{key}.pub", progress=print) as ctx:
        try:
            yield {**ctx, "key": key}
        finally:
            print(f"--- red00 console (last lines) ---\n{ctx['pi'].vm.tail(40)}")


def _manager_ssh(ctx, command):
    from pibake.lab.targetrun import pi_ssh

    return pi_ssh(ctx["prefix"], ctx["key"], "pi", ctx["pi"].ip, command, via=ctx["worker"])


def _registry(ctx, method, path, body=None):
    """(status, JSON) of a registry request from inside the lab worker's network namespace: TLS verified
    against the cluster CA, the admin credential through curl's stdin config (never an argv)."""
    secrets = ctx["cluster_dir"] / "secrets"
    password = (secrets / "admin-password").read_text().strip()
    config = f'user = "admin:{password}"\n'
    argv = ["nsenter", "-t", str(ctx["worker"]["pid"]), "--net", "--", "curl", "-sS", "-K", "-",
            "--cacert", str(secrets / "ca.crt"), "-X", method, "-w", "\n%{http_code}",
            f"https://{ctx['pi'].ip}:8443/api/v1{path}"]
    if body is not None:
        argv[-1:-1] = ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    proc = subprocess.run(argv, input=config, capture_output=True, text=True, timeout=60)
    text, _, code = proc.stdout.rpartition("\n")
    try:
        return int(code), json.loads(text) if text.strip() else None
    except ValueError:
        return 0, proc.stderr


def test_manager_image_boots_registry_and_slurmctld_under_systemd(manager_boot):
    import time

    pi = manager_boot["pi"]
    pi.wait_console(timeout=BOOT_TIMEOUT)
    facts = _manager_ssh(manager_boot, "ps -p 1 -o comm=; hostname; cloud-init status --long; "
                                       "systemctl is-active pibake-registry.service; dpkg-query -W chrony")
    assert facts.returncode == 0, facts.stderr + facts.stdout
    out = facts.stdout
    assert out.splitlines()[:2] == ["systemd", "red00"], out
    assert "status: done" in out and "errors: []" in out, out
    assert "\nactive\n" in out, f"the registry's unit is not active: {out}"
    assert "chrony\t" in out, f"the seed's packages: chrony was not installed at first boot: {out}"
    status, health = _registry(manager_boot, "GET", "/health")
    assert status == 200, health
    # munge is the agent's to start (after cloud-init's runcmd started it), with the cluster's key
    deadline, munge = time.monotonic() + JOIN_TIMEOUT, ""
    while time.monotonic() < deadline:
        munge = _manager_ssh(manager_boot, "systemctl is-active munge.service; "
                                           "sudo stat -c '%a %U' /etc/munge/munge.key").stdout
        if munge.startswith("active\n"):
            break
        time.sleep(5)
    assert munge.splitlines() == ["active", "400 munge"], munge
    # the switch loops (issue 14) run under their sandboxed units: idle rounds with no switch in cluster.yaml,
    # but a unit that cannot start (its sandbox, its command) would be "activating" (auto-restart) or "failed"
    loops = _manager_ssh(manager_boot, "systemctl is-active pibake-switch-auto.service pibake-switch-rules.service; "
                                       "sudo journalctl -b --no-pager -o cat -u pibake-switch-auto.service "
                                       "-u pibake-switch-rules.service | tail -20")
    assert loops.stdout.splitlines()[:2] == ["active", "active"], loops.stdout + loops.stderr


def test_a_lab_worker_joins_the_emulated_manager(manager_boot):
    import time

    pi = manager_boot["pi"]
    pi.wait_console(timeout=BOOT_TIMEOUT)
    deadline = time.monotonic() + JOIN_TIMEOUT
    states = ""
    while time.monotonic() < deadline:
        states = _manager_ssh(manager_boot, "sinfo -N -h -o '%N %T'").stdout
        if "red01 idle" in states:
            break
        time.sleep(3)
    assert "red01 idle" in states, f"red01 not idle on the emulated manager: {states!r}"
    ctld = _manager_ssh(manager_boot, "systemctl is-active slurmctld.service; scontrol -V; "
                                      "sudo journalctl -b --no-pager -o cat -u slurmctld.service")
    assert ctld.stdout.splitlines()[0] == "active", ctld.stdout
    assert " 24.11." in ctld.stdout.splitlines()[1], ctld.stdout  # Debian prints "slurm-wlm 24.11.5"
    # the registry waits for the manager's munged before it starts slurmctld: no failed start this boot
    # (systemd's own lines; slurmctld's log has unrelated "failed" words, e.g. a plugstack.conf Include)
    starts = [line for line in ctld.stdout.splitlines() if line.startswith("Starting slurmctld.service")]
    assert len(starts) == 1 and "Failed to start" not in ctld.stdout and \
        "slurmctld.service: Failed with result" not in ctld.stdout, ctld.stdout
    status, nodes = _registry(manager_boot, "GET", "/nodes")
    assert status == 200 and {n["hostname"] for n in nodes} >= {"red00", "red01"}, nodes


def test_rest_verify_on_the_emulated_manager_reaches_its_nodes(manager_boot):
    """The booted manager's registry runs `verify` as a REST job; its ssh checks log in to the lab worker
    with the manager's own ssh identity (from its seed; every node's seed authorizes it)."""
    import time

    manager_boot["pi"].wait_console(timeout=BOOT_TIMEOUT)
    status, job = _registry(manager_boot, "POST", "/verify", {"bench": False})
    assert status == 202, job
    deadline = time.monotonic() + 600
    while job.get("state") not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(3)
        status, job = _registry(manager_boot, "GET", f"/jobs/{job['id']}")
    assert job.get("state") == "done", job
    checks = {c["name"]: c for c in job["result"]["checks"]}
    assert checks["reachable"]["status"] == "ok", checks["reachable"]
    assert checks["munge"]["status"] == "ok", checks["munge"]
    assert checks["srun"]["status"] == "ok", checks["srun"]
