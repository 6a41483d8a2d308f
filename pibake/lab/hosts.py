"""Lab hosts: Pi-like machines on one Linux box, sharing its root file system.

A host is a network namespace (a veth into a lab bridge on an unusual subnet such as
10.77.0.0/24) plus its own UTS, mount and PID namespaces, kept alive by a small PID-1 process
(``pibake-lab-init``) that also reaps orphans. Inside, the host has

* its own hostname, /proc, a tmpfs on /run (with /run/lock 1777, /run/munge, /run/slurm, /run/sshd);
* per-host directories bind-mounted over /etc/slurm, /etc/munge, /etc/default, /etc/pibake, /etc/ssh,
  /var/lib/munge, /var/lib/slurm, /var/log, /var/spool and the files /etc/hosts, /etc/hostname;
  everything else (binaries, libraries, Python) is the machine's own.

Every name the lab creates starts with ``<prefix>-`` (network namespaces ``<prefix>-<host>``, veths
``<prefix>-<last octet>``, the bridge ``<prefix>-br``), so ``cleanup_leftovers(prefix)`` can find and
remove what a crashed run left behind. Nothing outside these namespaces, the bridge and its subnet is
touched. Enter a host with ``host.run(argv)`` / ``host.popen(argv)`` (``nsenter -t PID1 -a --wd=...``;
never ``ip netns exec``, which remounts /sys and breaks slurmd's cgroup detection).

    net = LabNetwork.create("pbk", "10.77.0.0/24")
    host = LabHost.create("red01", "10.77.0.11", network=net)
    host.run(["hostname"]).stdout  # "red01\\n"
    host.destroy(); net.destroy()
"""

import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from pibake import fields
from pibake.errors import LabError
from pibake.run import run, which

LOG = logging.getLogger(__name__)

PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,8}$")

# Directories bind-mounted per host (created empty unless listed in COPIED_DIRS).
HOST_DIRS = ("/etc/slurm", "/etc/munge", "/etc/default", "/etc/pibake", "/etc/ssh", "/var/lib/munge",
             "/var/lib/slurm", "/var/log", "/var/spool")
HOST_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")
# No DNS in the lab: lookups of names missing from /etc/hosts fail at once (127.0.0.1:53 is closed in
# the host) instead of timing out towards the machine's resolver, which the lab must never contact.
LAB_RESOLV_CONF = "# pibake lab host: no DNS; names are in /etc/hosts\nnameserver 127.0.0.1\n"
# Copied from the machine so packaged tools keep working (their defaults, ssh client config);
# secrets are never copied (no munge key, no ssh host keys).
COPIED_DIRS = {"/etc/default": (), "/etc/ssh": ("ssh_host_",), "/etc/slurm": ("slurm.conf",)}
# (path inside the host, owner, mode) created in the per-host directories.
OWNED_DIRS = (
    ("/etc/munge", "munge", 0o700),
    ("/var/lib/munge", "munge", 0o711),
    ("/var/log/munge", "munge", 0o700),
    ("/var/log/slurm", "slurm", 0o755),
    ("/var/spool/slurmd", "root", 0o755),
    ("/var/spool/slurmctld", "slurm", 0o755),
    ("/var/lib/slurm/slurmd", "root", 0o755),
    ("/var/lib/slurm/slurmctld", "slurm", 0o755),
)
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8", "TERM": "dumb"}


def init_program():
    """The source of a lab host's PID 1 (``pibake/lab/remote/lab_init.py``, package data)."""
    return resources.files("pibake.lab").joinpath("remote", "lab_init.py").read_text(encoding="utf-8")


def _check_prefix(prefix):
    if not PREFIX_RE.match(prefix or ""):
        raise LabError(f"lab prefix {prefix!r} must be 2-9 characters, a-z and 0-9, starting with a letter")


def run_ip(*args, check=True):
    return run([which("ip") or "ip", *args], check=check, timeout=30)


def _netns_names():
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _link_names():
    out = run_ip("-o", "link", "show").stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def pids_in_netns(path):
    """PIDs (of this machine's PID namespace) whose network namespace is the one bound at ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            nst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (nst.st_dev, nst.st_ino) == (st.st_dev, st.st_ino) and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    while time.monotonic() < end and any(os.path.exists(f"/proc/{p}") and not _is_zombie(p) for p in pids):
        time.sleep(0.05)


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def default_base_dir(prefix):
    return Path(tempfile.gettempdir()) / f"pibake-lab-{prefix}"


def cleanup_leftovers(prefix):
    """Remove every namespace, process, link and state directory of a lab with ``prefix``.

    Safe to call when nothing is left. Returns {"netns": [...], "links": [...], "processes": N}.
    """
    _check_prefix(prefix)
    start = f"{prefix}-"
    report = {"netns": [], "links": [], "processes": 0}
    for ns in _netns_names():
        if not ns.startswith(start):
            continue
        pids = pids_in_netns(f"/run/netns/{ns}")
        kill_all(pids)
        report["processes"] += len(pids)
        run_ip("netns", "del", ns, check=False)
        report["netns"].append(ns)
    for link in _link_names():
        if link.startswith(start):
            run_ip("link", "del", link, check=False)
            report["links"].append(link)
    base = default_base_dir(prefix)
    if base.exists():
        _unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)
    if report["netns"] or report["links"]:
        LOG.info("lab %s: removed leftovers %s", prefix, report)
    return report


def run_prefix(family, pid=None):
    """A lab prefix unique to one process: ``<family><pid>`` (e.g. ``pe12345``), so concurrent test runs
    never share names, and ``cleanup_stale(family)`` can tell a dead run's leftovers from a live one's."""
    prefix = f"{family}{pid or os.getpid()}"
    _check_prefix(prefix)
    return prefix


def cleanup_stale(family):
    """``cleanup_leftovers`` for every ``<family><pid>`` lab whose process ``pid`` is gone."""
    pattern = re.compile(rf"^({re.escape(family)}(\d+))-")
    prefixes = set()
    for name in _netns_names() + _link_names():
        m = pattern.match(name)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            prefixes.add(m.group(1))
    return {p: cleanup_leftovers(p) for p in sorted(prefixes)}


def _unmount_under(path):
    """Bind mounts live in the hosts' private mount namespaces; nothing should be mounted in ours,
    but unmount defensively anything under ``path``."""
    try:
        with open("/proc/self/mounts") as fh:
            targets = [line.split()[1] for line in fh]
    except OSError:
        return
    for target in sorted((t for t in targets if t.startswith(str(path) + "/")), reverse=True):
        run(["umount", "-l", target], check=False)


class LabNetwork:
    """The lab bridge ``<prefix>-br`` for ``subnet``.

    ``bridge_ip``: an address of ``subnet`` given to the bridge so this machine can reach the hosts
    ("auto": the subnet's last usable address); None (default): the bridge has no address and the hosts
    reach only each other.
    """

    def __init__(self, prefix, subnet, bridge_ip):
        self.prefix = prefix
        self.subnet = ipaddress.ip_network(subnet)
        self.bridge_ip = bridge_ip
        self.bridge = f"{prefix}-br"

    @classmethod
    def create(cls, prefix, subnet="10.77.0.0/24", bridge_ip=None):
        _check_prefix(prefix)
        net = ipaddress.ip_network(subnet)
        if not net.is_private or net.version != 4:
            raise LabError(f"lab subnet {subnet} must be a private IPv4 network")
        if bridge_ip == "auto":
            bridge_ip = str(list(net.hosts())[-1])
        if bridge_ip and ipaddress.ip_address(bridge_ip) not in net:
            raise LabError(f"bridge address {bridge_ip} is outside the lab subnet {net}")
        self = cls(prefix, str(net), bridge_ip)
        if self.bridge in _link_names():
            run_ip("link", "del", self.bridge, check=False)
        run_ip("link", "add", "name", self.bridge, "type", "bridge")
        if bridge_ip:
            run_ip("addr", "add", f"{bridge_ip}/{net.prefixlen}", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")
        LOG.info("lab bridge %s on %s%s", self.bridge, net, f" ({bridge_ip})" if bridge_ip else "")
        return self

    def destroy(self):
        if self.bridge in _link_names():
            run_ip("link", "del", self.bridge, check=False)


class LabHost:
    """One lab host. Create with ``LabHost.create``; always ``destroy()`` it (or ``cleanup_leftovers``)."""

    def __init__(self, name, ip, network, root, netns, veth, mac, init_proc, pid):
        self.name = name
        self.ip = ip
        self.network = network
        self.root = Path(root)  # per-host state: <root>/etc/munge, <root>/var/log, ...
        self.netns = netns
        self.veth = veth
        self.mac = mac
        self._init = init_proc
        self.pid = pid  # the host's PID 1, as seen from this machine

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, name, ip, *, network, base_dir=None, mac=None, extra_hosts=()):
        """Create and start host ``name`` with address ``ip`` on ``network`` (a LabNetwork).

        ``extra_hosts``: (ip, name) pairs added to the host's /etc/hosts. ``mac``: the MAC of its eth0
        (default: derived from ``ip`` so a re-created host keeps its MAC).
        """
        # the name goes to sethostname and the netns name <prefix>-<name>, never to an interface name (the
        # veth is named after the address): a node's hostname rule is all it needs, no shorter limit
        problem = fields.HOSTNAME.problem(name)
        if problem:
            raise LabError(f"lab host name: {problem}")
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise LabError(f"{ip!r} is not an IP address") from None
        if addr not in network.subnet or str(addr) == network.bridge_ip:
            raise LabError(f"{ip} is not a free address of the lab subnet {network.subnet}")
        prefix = network.prefix
        netns = f"{prefix}-{name}"
        veth = f"{prefix}-{str(addr).rsplit('.', 1)[1]}"
        mac = mac or "02:77:" + ":".join(f"{b:02x}" for b in addr.packed)
        base = Path(base_dir) if base_dir else default_base_dir(prefix)
        root = base / name
        if netns in _netns_names() or veth in _link_names():
            raise LabError(f"lab host {netns} (or {veth}) already exists; run cleanup_leftovers({prefix!r})")
        cls._prepare_root(root, name, ip, extra_hosts)
        created_ns = False
        try:
            run_ip("netns", "add", netns)
            created_ns = True
            run_ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            run_ip("link", "set", veth, "master", network.bridge, "up")
            run_ip("-n", netns, "link", "set", "eth0", "address", mac)
            run_ip("-n", netns, "addr", "add", f"{ip}/{network.subnet.prefixlen}", "dev", "eth0")
            run_ip("-n", netns, "link", "set", "lo", "up")
            run_ip("-n", netns, "link", "set", "eth0", "up")
            # on-link default route: the host looks like a normal machine (a default-route NIC) while
            # nothing can leave the bridge: there is no gateway and the machine does not forward.
            run_ip("-n", netns, "route", "add", "default", "dev", "eth0")
            init_proc, pid = cls.start_init(name, netns, root)
        except BaseException:
            if created_ns:
                kill_all(pids_in_netns(f"/run/netns/{netns}"))
                run_ip("netns", "del", netns, check=False)
            if veth in _link_names():
                run_ip("link", "del", veth, check=False)
            raise
        LOG.info("lab host %s up: %s (pid 1 = %d)", name, ip, pid)
        return cls(name, ip, network, root, netns, veth, mac, init_proc, pid)

    @staticmethod
    def _prepare_root(root, name, ip, extra_hosts):
        if root.exists():
            shutil.rmtree(root)
        for d in HOST_DIRS:
            target = root / d.lstrip("/")
            src = Path(d)
            skip = COPIED_DIRS.get(d)
            if skip is not None and src.is_dir():
                shutil.copytree(src, target, symlinks=True,
                                ignore=lambda _dir, names, skip=skip: [n for n in names if n.startswith(skip)]
                                if skip else [])
            else:
                target.mkdir(parents=True, exist_ok=True)
            if src.exists():
                st = src.stat()
                os.chmod(target, st.st_mode & 0o7777)
                os.chown(target, st.st_uid, st.st_gid)
        for d, user, mode in OWNED_DIRS:
            target = root / d.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            try:
                pw = pwd.getpwnam(user)
                os.chown(target, pw.pw_uid, pw.pw_gid)
            except KeyError:
                pass
            os.chmod(target, mode)
        hosts = ["127.0.0.1 localhost", f"{ip} {name}"] + [f"{i} {n}" for i, n in extra_hosts]
        (root / "etc/hosts").write_text("\n".join(hosts) + "\n")
        (root / "etc/hostname").write_text(name + "\n")
        (root / "etc/resolv.conf").write_text(LAB_RESOLV_CONF)
        (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)

    @staticmethod
    def start_init(name, netns, root):
        for d in HOST_DIRS:
            if not os.path.exists(d):  # a mount point is needed (e.g. /etc/pibake): an empty directory
                os.makedirs(d, mode=0o755)
                LOG.info("created the mount point %s (empty) on this machine", d)
        # a file bind mount follows a symlink (e.g. /etc/resolv.conf -> /run/...): skip those
        init_script = root / "pibake-lab-init.py"  # a file, so `ps` shows a short command line
        init_script.write_text(init_program())
        binds = [f"{root / p.lstrip('/')}={p}" for p in HOST_DIRS + HOST_FILES
                 if p in HOST_DIRS or (os.path.isfile(p) and not os.path.islink(p))]
        argv = [which("nsenter") or "nsenter", f"--net=/run/netns/{netns}", "--",
                which("unshare") or "unshare", "--pid", "--fork", "--mount", "--uts", "--mount-proc",
                "--propagation", "private", "--",
                sys.executable, str(init_script), name, f"pibake-lab-init:{netns}", *binds]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=CLEAN_ENV, start_new_session=True)
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            proc.kill()
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise LabError(f"lab host {name} did not start: {err[-1] if err else 'no error output'}")
        proc.stdout.close()
        pid = _child_pid(proc.pid)
        if pid is None:
            proc.kill()
            raise LabError(f"lab host {name}: cannot find its PID 1")
        return proc, pid

    # ------------------------------------------------------------------ use
    def _enter(self, argv, cwd):
        return [which("nsenter") or "nsenter", "-t", str(self.pid), "-a", f"--wd={cwd}", "--",
                *[str(a) for a in argv]]

    def run(self, argv, *, timeout=60, check=True, input=None, env=None, cwd="/"):
        """Run ``argv`` inside the host (pibake.run.run semantics: CommandError on failure)."""
        return run(self._enter(argv, cwd), timeout=timeout, check=check, input=input,
                   env={**CLEAN_ENV, **(env or {})})

    def popen(self, argv, *, env=None, cwd="/", **kwargs):
        """Start ``argv`` inside the host; returns a ``HostProcess`` (a ``subprocess.Popen`` whose
        ``terminate``/``kill``/``send_signal`` reach the program, not the nsenter wrapper)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return HostProcess(self._enter(argv, cwd), env={**CLEAN_ENV, **(env or {})}, **kwargs)

    def path(self, inside):
        """Where a path inside the host lives on this machine (only for the per-host directories)."""
        inside = "/" + str(inside).lstrip("/")
        for d in HOST_DIRS + HOST_FILES + ("/boot/firmware",):
            if inside == d or inside.startswith(d + "/"):
                return self.root / inside.lstrip("/")
        raise LabError(f"{inside} is shared with the machine, not a per-host path of {self.name}")

    def alive(self):
        return self._init.poll() is None and os.path.exists(f"/proc/{self.pid}")

    def destroy(self):
        """Kill everything in the host (its PID 1 takes its PID namespace down) and remove its network."""
        pids = pids_in_netns(f"/run/netns/{self.netns}")
        kill_all([self.pid] + pids)
        try:
            self._init.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._init.kill()
        for stream in (self._init.stdout, self._init.stderr):
            if stream and not stream.closed:
                stream.close()
        if self.netns in _netns_names():
            run_ip("netns", "del", self.netns, check=False)
        if self.veth in _link_names():
            run_ip("link", "del", self.veth, check=False)
        LOG.info("lab host %s destroyed", self.name)

    def __repr__(self):
        return f"LabHost({self.name!r}, {self.ip!r}, pid={self.pid})"


class HostProcess(subprocess.Popen):
    """A program started in a lab host through ``nsenter``, which forks to enter the PID namespace and
    does not forward signals: signals go to nsenter's child (the program itself)."""

    def inner_pid(self):
        return _child_pid(self.pid, timeout=2) if self.poll() is None else None

    def send_signal(self, sig):
        inner = self.inner_pid()
        if inner is None:
            super().send_signal(sig)
            return
        try:
            os.kill(inner, sig)
        except ProcessLookupError:
            pass


def _child_pid(pid, timeout=5):
    """The (single) child of ``pid``: unshare --fork's child is the host's PID 1, nsenter's child the
    program it runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                kids = fh.read().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    return None
