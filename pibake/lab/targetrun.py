"""An emulated arm64 Pi booting a burned card image on a lab's bridge, and what is seen of it from outside.

The tests in tests/target/ and ``bench/target`` share this: burn a node's card image from the target image
(``pibake.lab.target``), attach a tap to the running lab's bridge, power the VM on and time its phases from
its serial console (kernel, systemd, login prompt, cloud-init finished) and from the cluster (enrolled in the
registry, idle in sinfo). Everything the VM can reach is on the lab bridge; the bridge has no address here.

    run = WorkerBoot(cluster_dir, "red01", "10.77.90.11", prefix="pk123", workdir=tmp)
    run.burn(); run.power_on(); phases = run.wait_idle(timeout=900); run.close()
"""

import contextlib
import ipaddress
import json
import logging
import shlex
import time
from pathlib import Path

from pibake.bake.burn import burn
from pibake.bake.synthetic import build_pi_image
from pibake.cluster import init_cluster
from pibake.errors import PibakeError, TargetRunError
from pibake.lab.cluster import (
    host_argv,
    lab_down,
    lab_up,
    load_state,
    registry_nodes,
    slurm_states,
)
from pibake.lab.vm import TargetVM, attach_tap, detach_tap
from pibake.run import run, which
from pibake.ssh import SshOptions

LOG = logging.getLogger(__name__)

# Console lines that mark boot phases (systemd 257, cloud-init 25.1, agetty on ttyAMA0).
CONSOLE_PHASES = (
    ("kernel", r"Booting Linux on physical CPU"),
    ("systemd", r"systemd\[1\]: (Detected architecture|systemd \d+)|Welcome to Debian"),
    ("login_prompt", r"login:"),
    ("cloud_init_done", r"Cloud-init v\. \S+ finished"),
)


def tap_name(prefix, ip):
    """The tap of the VM with ``ip`` in lab ``prefix``: ``<prefix>-v<last octet>`` (<= 15 characters)."""
    return f"{prefix}-v{str(ip).rsplit('.', 1)[1]}"


def vm_mac(ip):
    """A stable locally administered MAC for the VM with ``ip`` (02:7a:<ip bytes>)."""
    return "02:7a:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(ip).packed)


def ssh_argv(host_pid, key, user, ip, command):
    """ssh to an emulated Pi from inside lab host ``host_pid``'s network namespace (this machine's ssh)."""
    # a throwaway VM with a new host key each boot: no host key to check or to remember
    ssh = SshOptions(user=user, identity=str(key), known_hosts="/dev/null", host_key_check="no", log_level="ERROR",
                     connect_timeout=10)
    return [which("nsenter") or "nsenter", "-t", str(host_pid), "--net", "--", *ssh.argv(ip, command)]


class EmulatedPi:
    """A burned card image booted in qemu on lab ``prefix``'s bridge, with phase timings."""

    def __init__(self, image, *, name, ip, prefix, workdir, memory_mb=2048, cpus=2):
        self.name, self.ip, self.prefix = name, ip, prefix
        self.workdir = Path(workdir)
        self.tap = tap_name(prefix, ip)
        self.vm = TargetVM(image, self.workdir / name, tap=self.tap, mac=vm_mac(ip), memory_mb=memory_mb,
                           cpus=cpus, name=name)
        self.phases = {}

    def power_on(self):
        attach_tap(self.tap, f"{self.prefix}-br")
        self.vm.start()
        return self

    def wait_console(self, timeout):
        """Wait for every console phase (kernel ... cloud-init finished); {phase: seconds since power-on}."""
        deadline = time.monotonic() + timeout
        for phase, pattern in CONSOLE_PHASES:
            left = deadline - time.monotonic()
            try:
                self.phases[phase] = self.vm.wait_for_serial(pattern, timeout=max(left, 1))
            except PibakeError as err:
                raise TargetRunError(f"{self.name}: did not reach '{phase}': {err}") from err
        return dict(self.phases)

    def mark(self, phase):
        self.phases.setdefault(phase, round(time.monotonic() - self.vm.started, 2))

    def console(self):
        return self.vm.serial_log.read_bytes().decode(errors="replace")

    def close(self):
        self.vm.stop()
        detach_tap(self.tap)


def lab_manager(prefix):
    """The lab state's manager host record (a dict with its PID), or TargetRunError."""
    state = load_state(prefix)
    manager = next((h for h in (state or {}).get("hosts", []) if h.get("role") == "manager"), None)
    if manager is None:
        raise TargetRunError(f"lab {prefix} has no manager host: bring it up with its manager image first")
    return state, manager


def wait_joined(pi, prefix, *, timeout):
    """Wait until ``pi`` is enrolled in the lab manager's registry, then idle in its sinfo; the phases."""
    state, manager = lab_manager(prefix)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "enrolled" not in pi.phases:
            nodes = registry_nodes(state) or []
            if any(n.get("hostname") == pi.name for n in nodes):
                pi.mark("enrolled")
        if "enrolled" in pi.phases and slurm_states(manager).get(pi.name) == "idle":
            pi.mark("idle")
            return dict(pi.phases)
        if not pi.vm.running():
            break
        time.sleep(1)
    raise TargetRunError(f"{pi.name}: not idle in sinfo after {timeout:.0f} s (phases so far: "
                         f"{json.dumps(pi.phases)}); console: {pi.vm.tail(8)}")


def manager_run(prefix, argv, timeout=120):
    """Run ``argv`` in the lab's manager host (a ``CompletedProcess``; never raises on exit status)."""
    _, manager = lab_manager(prefix)
    return run(host_argv(manager, argv), check=False, timeout=timeout)


def pi_ssh(prefix, key, user, ip, command, timeout=120, via=None):
    """Run a shell ``command`` on an emulated Pi over ssh from inside the lab (``via``: a host record;
    default the lab's manager). A ``CompletedProcess``."""
    host = via or lab_manager(prefix)[1]
    cmd = command if isinstance(command, str) else " ".join(shlex.quote(c) for c in command)
    return run(ssh_argv(host["pid"], key, user, ip, cmd), check=False, timeout=timeout)


# ----------------------------------------------------------------------------- the two scenarios


def _cluster(workdir, net, ssh_key_file):
    cluster_dir = Path(workdir) / "cluster"
    init_cluster(cluster_dir, manager="red00", manager_ip=f"{net}.10", network=f"{net}.0/24",
                 ssh_key_files=[ssh_key_file], timezone="Etc/UTC")
    return cluster_dir


def _burn(cluster_dir, hostname, ip, role, out_dir, image):
    burn(cluster_dir, hostnames=hostname, ips=ip, role=role, output=str(Path(out_dir) / "{hostname}.img"),
         image=str(image))
    return Path(out_dir) / f"{hostname}.img"


def _synthetic(workdir):
    path = Path(workdir) / "synthetic-raspios.img"
    if not path.exists():
        build_pi_image(path, size="160M", boot_size="64M", family="raspios")
    return path


@contextlib.contextmanager
def worker_join(workdir, *, net, prefix, target_image, ssh_key_file, progress=None):
    """A cluster whose manager red00 is a lab host (network namespace, the lab's Debian root, booted by
    cloud-init from its burned image) and whose worker red01 is an emulated Pi powered on from the target
    image burned by ``pibake burn``. Yields ``{"pi", "cluster_dir", "prefix"}``; removes everything after."""
    note = progress or (lambda message: None)
    cluster_dir = _cluster(workdir, net, ssh_key_file)
    note("burning red00 (manager, lab host) and red01 (worker, target image)")
    _burn(cluster_dir, "red00", f"{net}.10", "manager", Path(workdir) / "images", _synthetic(workdir))
    card = _burn(cluster_dir, "red01", f"{net}.11", "worker", Path(workdir) / "cards", target_image.path)
    pi = None
    try:
        note("lab up: the manager host")
        lab_up(cluster_dir, images_dir=Path(workdir) / "images", prefix=prefix, wait=False, progress=note)
        pi = EmulatedPi(card, name="red01", ip=f"{net}.11", prefix=prefix, workdir=Path(workdir) / "vm")
        note("powering on red01 (qemu-system-aarch64, TCG)")
        pi.power_on()
        yield {"pi": pi, "cluster_dir": cluster_dir, "prefix": prefix}
    finally:
        if pi is not None:
            pi.close()
        lab_down(prefix=prefix)


@contextlib.contextmanager
def manager_boot(workdir, *, net, prefix, target_image, ssh_key_file, progress=None):
    """A cluster whose manager red00 is an emulated Pi from the target image (its pibake wheel comes from
    the running pibake) and whose worker red01 is a lab host on the same bridge, enrolling with it.
    Yields ``{"pi", "cluster_dir", "prefix", "worker"}`` (``worker``: the lab host's record)."""
    note = progress or (lambda message: None)
    cluster_dir = _cluster(workdir, net, ssh_key_file)
    note("burning red00 (manager, target image) and red01 (worker, lab host)")
    card = _burn(cluster_dir, "red00", f"{net}.10", "manager", Path(workdir) / "cards", target_image.path)
    _burn(cluster_dir, "red01", f"{net}.11", "worker", Path(workdir) / "images", _synthetic(workdir))
    pi = None
    try:
        note("lab up: the worker host (its agent retries until the emulated manager answers)")
        lab_up(cluster_dir, images_dir=Path(workdir) / "images", prefix=prefix, wait=False, progress=note,
               manager_outside=True)
        worker = next(h for h in load_state(prefix)["hosts"] if h["name"] == "red01")
        pi = EmulatedPi(card, name="red00", ip=f"{net}.10", prefix=prefix, workdir=Path(workdir) / "vm")
        note("powering on red00 (qemu-system-aarch64, TCG)")
        pi.power_on()
        yield {"pi": pi, "cluster_dir": cluster_dir, "prefix": prefix, "worker": worker}
    finally:
        if pi is not None:
            pi.close()
        lab_down(prefix=prefix)
