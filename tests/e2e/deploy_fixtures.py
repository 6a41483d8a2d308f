"""Lab for `pibake deploy`: a manager host (munge + registry under gunicorn/TLS, slurmctld once a node
enrols; tests/e2e/conftest.py's LabCluster) and worker hosts that run nothing but sshd, reachable by ssh
from this machine (the bridge gets an address of the lab subnet).

Per worker: an ed25519 host key, AuthorizedKeysFile and a drop-in with ``ListenAddress <host ip>``, all
under the host's bind-mounted /etc/ssh (not /tmp: sshd's StrictModes); /usr/local/lib/pibake is a per-host
directory bind-mounted inside the host's own mount namespace, so what deploy installs there stays on that
host (as on a real Pi) and never touches this machine's /usr/local. The ssh client side is a temp
ssh_config (test key, test known_hosts, ``StrictHostKeyChecking=accept-new``, ``Host w1`` -> its IP) given
to deploy as ``ssh_options=("-F", path)``.

    lab = deploy_lab(tmp_path, octet=61)      # manager "mgr" at 10.77.61.10, registry running
    lab.add_ssh_worker("w1", 11)              # sshd only
    report = deploy(lab.cluster_dir, "w1", ssh_options=lab.ssh_options)
    lab.destroy()

With ``manager_sshd=True`` the manager runs nothing but sshd either (no munge, no registry): `pibake deploy`
sets it up. Besides /usr/local/lib/pibake, per-host directories are then bind-mounted over /opt/pibake (the
venv pibake-install makes), /var/lib/pibake (the registry's cluster directory and the wheel),
/etc/systemd/system and /etc/chrony/conf.d (the seed's units and chrony drop-in) inside the manager's own
mount namespace, so nothing deploy installs there lands on this machine (only the empty mount points are
created). Its Python libraries are this machine's Debian packages (python3-flask, gunicorn, ...: the manager
seed's package list, installed by scripts/setup), as on a manager Pi: the lab has no internet.

With ``rootfs`` (a built lab rootfs, pibake.lab.rootfs.ensure_rootfs: Debian trixie by default) every host gets
its own root instead, an overlay over that rootfs as `pibake lab up` makes them (``RootfsHost``): the target's
own sshd (OpenSSH 10), Python 3.13, Slurm 24.11 and munge, nothing of this machine's. The manager then always
runs only sshd (deploy sets it up with the rootfs's Debian packages).
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from pibake.lab import LabNetwork, cleanup_stale, run_prefix
from tests.e2e.conftest import LabCluster, skip_reason, wait_for
from tests.fixtures_plugin import make_ssh_key, new_cluster

FAMILY = "pd"
LIB_DIR = "/usr/local/lib/pibake"
WORKER_PRIVATE_DIRS = (LIB_DIR,)
MANAGER_PRIVATE_DIRS = (LIB_DIR, "/opt/pibake", "/var/lib/pibake")
SSHD_DROPIN = """\
# pibake deploy lab: this host's sshd
ListenAddress {ip}
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/pibake_lab_authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile /run/sshd.pid
"""


class RootfsHost:
    """A lab host (pibake.lab.LabHost: its namespaces and address) whose root is its own overlay over a built
    lab rootfs (pibake.lab.rootfs.make_host_root). ``run`` runs a command chrooted into that root; ``root`` is
    where that root is seen from this machine (through the host's PID 1), so ``root / "etc/ssh"`` and ``path``
    read and write the host's own files. The overlay's upper layer lives under ``host_dir``."""

    def __init__(self, host, host_dir, rootfs):
        from pibake.lab.cluster import enter_argv
        from pibake.lab.rootfs import make_host_root

        self.host = host
        self.host_dir = Path(host_dir)
        self.inner_root = make_host_root(rootfs, self.host_dir, enter=enter_argv(host.pid), timeout=120)

    def __getattr__(self, name):  # name, ip, pid, netns, alive, ...: the LabHost's
        return getattr(self.host, name)

    @property
    def root(self):
        return Path(f"/proc/{self.host.pid}/root") / str(self.inner_root).lstrip("/")

    def path(self, inside):
        return self.root / str(inside).lstrip("/")

    def run(self, argv, **kwargs):
        return self.host.run(["chroot", str(self.inner_root), *argv], **kwargs)

    def popen(self, argv, **kwargs):
        return self.host.popen(["chroot", str(self.inner_root), *argv], **kwargs)

    def destroy(self):
        self.host.destroy()


class DeployLab(LabCluster):
    """LabCluster under its own name family ``pd<pid>`` with a bridge address, plus sshd-only workers."""

    def __init__(self, tmp, octet, family=FAMILY, manager="mgr", rootfs=None):  # pylint: disable=super-init-not-called
        cleanup_stale(family)
        self.tmp = Path(tmp)
        self.octet = octet
        self.rootfs = rootfs
        self.prefix = run_prefix(family)
        self.net = LabNetwork.create(self.prefix, f"10.77.{octet}.0/24", bridge_ip="auto")
        self.hosts = {}
        self.registry = None
        try:
            self.manager_ip = self.ip(10)
            self.cluster_dir = self.tmp / "cluster"
            self.manager_name = manager
            new_cluster(self.cluster_dir, manager=manager, manager_ip=self.manager_ip,
                        network=f"10.77.{octet}.0/24", name="deploy")
            self.sdir = self.cluster_dir / "secrets"
            self.registry_log = self.tmp / "registry.log"
            self.mgr = self.add_host(manager, 10)
            self._client_files()
            self._names[manager] = self.manager_ip  # ssh reaches the manager by name too (never by DNS)
            self._write_ssh_config()
        except BaseException:
            self.destroy()
            raise

    # ---------------------------------------------------------------- ssh client side
    def _client_files(self):
        self.ssh_dir = self.tmp / "ssh"
        self.ssh_dir.mkdir(mode=0o700, exist_ok=True)
        self.key = self.ssh_dir / "id_ed25519"
        make_ssh_key(self.ssh_dir, "pibake-deploy-test")
        self.ssh_config = self.ssh_dir / "config"
        self._names = {}
        self._write_ssh_config()

    def _write_ssh_config(self):
        lines = []
        for name, ip in sorted(self._names.items()):
            lines += [f"Host {name}", f"    HostName {ip}", ""]
        lines += [
            "Host *",
            "    User root",
            f"    IdentityFile {self.key}",
            "    IdentitiesOnly yes",
            "    IdentityAgent none",
            f"    UserKnownHostsFile {self.ssh_dir / 'known_hosts'}",
            "    StrictHostKeyChecking accept-new",
            "    LogLevel ERROR",
            "",
        ]
        self.ssh_config.write_text("\n".join(lines))

    @property
    def ssh_options(self):
        return ("-F", str(self.ssh_config))

    def add_host(self, name, last):
        host = super().add_host(name, last)
        if self.rootfs is None:
            return host
        try:
            own = RootfsHost(host, self.tmp / "roots" / name, self.rootfs)
        except BaseException:
            self.hosts.pop(name).destroy()
            raise
        self.hosts[name] = own
        return own

    # ---------------------------------------------------------------- workers
    def add_ssh_worker(self, name, last):
        """A host running only sshd (root login with the test key), reachable as ``name`` or its IP."""
        host = self.add_host(name, last)
        self.make_ssh_host(host, WORKER_PRIVATE_DIRS)
        return host

    def make_manager_sshd(self):
        """The manager as a host running only sshd, with its own /opt/pibake, /var/lib/pibake, ... and /etc."""
        if self.rootfs is None:
            self.private_etc(self.mgr)
        self.make_ssh_host(self.mgr, MANAGER_PRIVATE_DIRS)
        self.registry_log = self.private_path(self.mgr, "/var/log/pibake/pibake-registry.log")

    @staticmethod
    def private_etc(host):
        """An overlay over /etc inside ``host`` (lower: this machine's /etc, upper: a per-host directory), with
        the host's own /etc/slurm, /etc/ssh, ... bound on top again. What the manager's seed writes to /etc
        (systemd units, chrony drop-in, /etc/hosts through a temp file + rename, which a bind-mounted file
        refuses with EBUSY) stays in the host; /etc/hosts becomes a plain file of the overlay."""
        from pibake.lab.hosts import HOST_DIRS, HOST_FILES

        upper, work = host.root / "etc-overlay" / "upper", host.root / "etc-overlay" / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        hosts_text = host.path("/etc/hosts").read_text()
        host.run(["mount", "-t", "overlay", "pibake-lab-etc", "-o",
                  f"lowerdir=/etc,upperdir={upper},workdir={work}", "/etc"])
        for path in HOST_DIRS + HOST_FILES:  # as LabHost bound them (a symlinked file, e.g. resolv.conf, is not)
            if path.startswith("/etc/") and path != "/etc/hosts" and (
                    path in HOST_DIRS or (os.path.isfile(path) and not os.path.islink(path))):
                host.run(["mount", "--bind", str(host.root / path.lstrip("/")), path])
        (upper / "hosts").write_text(hosts_text)

    @staticmethod
    def private_path(host, inside):
        """Where ``inside`` (a path in one of the host's per-host directories, or anywhere in a RootfsHost) is
        on this machine."""
        return host.root / inside.lstrip("/")

    def make_ssh_host(self, host, private_dirs):
        """Bind-mount per-host directories over ``private_dirs`` inside ``host`` (a RootfsHost has its own root:
        nothing to bind) and start its sshd."""
        for path in private_dirs if self.rootfs is None else ():
            own = self.private_path(host, path)
            own.mkdir(parents=True, exist_ok=True)
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o755)  # the mount point only (empty), as LabHost does for /etc/pibake
            host.run(["mount", "--bind", str(own), path])
        name = host.name
        etc_ssh = host.path("/etc/ssh")
        hostkey = etc_ssh / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(hostkey)],
                       check=True, timeout=30)
        auth = etc_ssh / "pibake_lab_authorized_keys"
        auth.write_text(Path(str(self.key) + ".pub").read_text())
        auth.chmod(0o600)
        dropin = etc_ssh / "sshd_config.d"
        dropin.mkdir(exist_ok=True)
        (dropin / "pibake-lab.conf").write_text(SSHD_DROPIN.format(ip=host.ip))
        host.run(["/usr/sbin/sshd"], timeout=30)
        self._names[name] = host.ip
        self._write_ssh_config()
        wait_for(f"ssh to {name}", lambda: self.ssh(name, "true", check=False).returncode == 0, timeout=30)
        return host

    def add_ssh_alias(self, alias, ip):
        """An extra ``Host alias`` entry (HostName ``ip``) in the test's ssh config."""
        self._names[alias] = ip
        self._write_ssh_config()

    def wait_registry_down(self):
        wait_for("the registry port to close", lambda: self.api("GET", "/health", auth=None)[0] == 0, timeout=30)

    def stop_sshd(self, host):
        """Stop the host's sshd (the pid in its /run/sshd.pid), and wait until it refuses connections."""
        pid = host.run(["cat", "/run/sshd.pid"]).stdout.strip()
        host.run(["kill", pid])
        wait_for(f"sshd of {host.name} to stop", lambda: self.ssh(host.name, "true", check=False).returncode == 255,
                 timeout=30)

    def kill_in_host(self, host, pattern, sig="TERM"):
        """Signal the processes of ``host`` (its own PID namespace) whose command line matches ``pattern``,
        by their pids; returns the pids."""
        pids = host.run(["pgrep", "-f", pattern], check=False).stdout.split()
        if pids:
            host.run(["kill", f"-{sig}", *pids], check=False)
        return pids

    def diagnostics(self):
        parts = [super().diagnostics()]
        for name, host in self.hosts.items():
            for log in ("pibake-registry.log", "pibake-agent.log"):
                path = host.root / "var/log/pibake" / log
                if path.exists() and path != self.registry_log:
                    parts.append(f"--- {name}:/var/log/pibake/{log}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def ssh(self, target, command, check=True):
        return subprocess.run(["ssh", "-F", str(self.ssh_config), target, command], capture_output=True,
                              text=True, timeout=60, check=check)

    def stop_host(self, name):
        """Power a worker off: its namespace, processes and address are gone."""
        host = self.hosts.pop(name)
        host.destroy()
        return host


def deploy_lab(tmp, octet, workers=(), family=FAMILY, manager="mgr", manager_sshd=False, rootfs=None):
    """A started DeployLab (manager ``manager`` at .10 with munge + registry; with ``manager_sshd`` only
    sshd, for deploy to set up) with sshd-only ``workers`` ((name, last octet), ...). The caller destroys it.
    ``rootfs``: every host on its own root over that built lab rootfs (the manager then runs only sshd)."""
    tmp = Path(tmp)
    tmp.chmod(0o755)  # munged and slurm insist on searchable parents
    lab = DeployLab(tmp, octet, family=family, manager=manager, rootfs=rootfs)
    try:
        if manager_sshd or rootfs is not None:
            lab.make_manager_sshd()
        else:
            lab.start_manager()
        for name, last in workers:
            lab.add_ssh_worker(name, last)
    except BaseException:
        print(lab.diagnostics(), file=sys.stderr)
        lab.destroy()
        raise
    return lab


def deploy_lab_missing():
    """Why a deploy lab cannot run here (None when it can): root, namespaces, Slurm, munge, and sshd."""
    return skip_reason() or (None if os.path.exists("/usr/sbin/sshd") else "openssh-server is not installed")


@contextlib.contextmanager
def module_lab(request, lab):
    """A test module's lab: yields it, prints its diagnostics when a test of the session failed, destroys it."""
    try:
        yield lab
    finally:
        if getattr(request.session, "testsfailed", 0):
            print(lab.diagnostics(), file=sys.stderr)
        lab.destroy()
