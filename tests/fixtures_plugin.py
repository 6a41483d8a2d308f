"""The suite's shared fixtures (registered by tests/conftest.py): a cluster directory, an ssh key, the lab's
rootfs, lab hosts and labs booted from burned images. One home for each, so a test that needs "a cluster"
asks for ``make_cluster`` instead of calling ``init_cluster`` with its own copy of the arguments.

- ``recorded(path)``, ``slurmd_c(board, hostname)``: the one corpus of recorded outputs (tests/fixtures/).
- ``make_ssh_key(directory)``: a real ed25519 pair made by ssh-keygen; ``ssh_key`` (session): one for all.
- ``new_cluster(directory, **overrides)``: the real ``init_cluster`` with the suite's defaults (``RED``:
  red00 on 10.1.1.0/24, or ``LOOPBACK``: the manager on 127.0.0.1 for tests that serve the registry),
  then ``settings`` merged into cluster.yaml (what tests used to edit by hand). ``make_cluster`` (session
  scope, so module fixtures can use it too) is the same with a fresh directory and the suite's ssh key.
- ``no_remote_connections``: fails a test whose process (any thread) connects to an address that is not
  loopback or starts ssh (the network rule; for tests that hand arbitrary host lists to the code).
- ``lab_missing(*programs)``/``needs_lab(...)``: why lab hosts cannot be made here (root, namespaces,
  overlayfs, programs); ``lab_rootfs`` (session): the lab's Debian root, built once per machine.
- ``make_lab`` (function scope): a lab network on its own subnet and a factory of lab hosts on it,
  destroyed after the test; ``burned_cluster`` + ``booted_lab``: a cluster made and burned with the CLI,
  then ``pibake lab up --from-images`` (module-scoped fixtures in tests/e2e build on them: a lab is
  expensive).
"""

import contextlib
import functools
import ipaddress
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import running_as_root

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RED = {"manager": "red00", "manager_ip": "10.1.1.10", "network": "10.1.1.0/24"}
LOOPBACK = {"manager": "localhost", "manager_ip": "127.0.0.1", "network": "127.0.0.0/8"}
SSH_KEY_COMMENT = "pibake-test@lab"


# --------------------------------------------------------------------------- the corpus of recorded outputs


def recorded(relpath, binary=False):
    """A recorded output from tests/fixtures/ (each folder's README says where it comes from)."""
    path = FIXTURES / relpath
    return path.read_bytes() if binary else path.read_text()


def slurmd_c(board, hostname=None):
    """``slurmd -C`` of ``board`` (tests/fixtures/slurm/slurmd-C.<board>.txt), its NodeName made ``hostname``."""
    text = recorded(f"slurm/slurmd-C.{board}.txt")
    return text if hostname is None else re.sub(r"^NodeName=\S+", f"NodeName={hostname}", text)


# --------------------------------------------------------------------------- ssh key, cluster directory


def make_ssh_key(directory, comment=SSH_KEY_COMMENT, name="id_ed25519"):
    """A real ed25519 key pair (no passphrase) in ``directory``: the private key's path (public: + .pub)."""
    key = Path(directory) / name
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                       check=True, capture_output=True)
    return key


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory):
    return make_ssh_key(tmp_path_factory.mktemp("ssh-key"))


def wait_for_port(port, proc, name, timeout=10):
    """Wait until something accepts connections on loopback ``port``; fail the test, with the program's
    stderr, if ``proc`` (a Popen with stderr=PIPE) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited: {proc.stderr.read()}")
            time.sleep(0.05)
    pytest.fail(f"{name} does not accept connections on 127.0.0.1:{port} after {timeout} s")


def update_cluster_yaml(cluster_dir, settings):
    """Merge ``settings`` (top-level keys) into cluster.yaml, as a person editing it would."""
    path = Path(cluster_dir) / "cluster.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(settings)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def new_cluster(directory, *, settings=None, **overrides):
    """A real cluster directory (cluster.yaml + secrets) by ``init_cluster``: ``RED`` unless ``overrides``
    say otherwise (``**LOOPBACK`` for a registry served on 127.0.0.1), then ``settings`` merged into
    cluster.yaml. Returns the directory."""
    from pibake.cluster import init_cluster

    init_cluster(directory, **{**RED, **overrides})
    if settings:
        update_cluster_yaml(directory, settings)
    return Path(directory)


@pytest.fixture(scope="session")
def make_cluster(tmp_path_factory, ssh_key):
    """``make_cluster(directory=None, **overrides)``: ``new_cluster`` in a fresh directory (or ``directory``),
    with the suite's ssh key unless ``ssh_keys``/``ssh_key_files``/``home`` say otherwise (never the
    invoking person's ~/.ssh keys)."""
    def make(directory=None, **overrides):
        if directory is None:
            directory = tmp_path_factory.mktemp("cluster") / "cluster"
        if not {"ssh_keys", "ssh_key_files", "home"} & set(overrides):
            overrides["ssh_key_files"] = [f"{ssh_key}.pub"]
        return new_cluster(directory, **overrides)
    return make


@pytest.fixture
def loopback_cluster(make_cluster, tmp_path):
    """A cluster whose manager is 127.0.0.1 (the registry these tests serve), made afresh for each test."""
    return make_cluster(tmp_path / "cluster", name="testlab", **LOOPBACK)


# --------------------------------------------------------------------------- the network rule

REMOTE_PROGRAMS = {"ssh", "scp", "sftp", "rsync", "clush", "curl", "wget"}


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a name: it would need a DNS lookup, which is traffic too
        return False


@pytest.fixture
def no_remote_connections(monkeypatch):
    """Refuse, record and (at teardown) fail on every connection of this process to an address that is not
    loopback and every ssh/scp/... it starts, from any thread (REST jobs run in worker threads)."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_popen_init = subprocess.Popen.__init__

    def refuse_remote(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(str(address[0])):
            attempts.append(f"connect to {address}")
            raise ConnectionRefusedError(f"the network rule: this test may not connect to {address}")

    def connect(sock, address):
        refuse_remote(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        refuse_remote(sock, address)
        return real_connect_ex(sock, address)

    def popen_init(self, args, *rest, **kw):
        argv = [args] if isinstance(args, (str, bytes, Path)) else list(args)
        if argv and Path(str(argv[0])).name in REMOTE_PROGRAMS:
            attempts.append(f"run {argv[:4]}")
            raise PermissionError(f"the network rule: this test may not run {argv[0]}")
        real_popen_init(self, args, *rest, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    yield attempts
    monkeypatch.undo()
    assert attempts == [], f"the test tried to leave this machine: {attempts}"


# --------------------------------------------------------------------------- lab hosts


@functools.cache
def lab_missing(*programs):
    """Why lab hosts cannot be made here ('' when they can): root, namespaces and overlayfs, ``programs``."""
    from tests.lab.sandbox import namespaces_missing

    if not running_as_root():
        return "the lab needs root (network, mount, UTS and PID namespaces)"
    missing = [p for p in programs if not shutil.which(p, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    if missing:
        return f"not installed: {', '.join(missing)}"
    return namespaces_missing()


def needs_lab(*programs):
    """A mark: skip (fail under CI, see tests/conftest.py) when ``lab_missing(*programs)`` names a reason."""
    reason = lab_missing(*programs)
    return pytest.mark.skipif(bool(reason), reason=reason or "lab hosts can be made here")


@pytest.fixture(scope="session")
def lab_rootfs():
    """The lab's Debian root (built once per machine, ~1-2 min cold; then a stamp read)."""
    reason = lab_missing("debootstrap", "unshare", "nsenter", "chroot")
    if reason:
        pytest.skip(reason)
    from pibake.lab.rootfs import ensure_rootfs

    return ensure_rootfs()


def lab_prefix(family):
    """A fresh lab name prefix ``<family><pid>``, after removing leftovers of dead runs of ``family``."""
    from pibake.lab import cleanup_stale, run_prefix

    cleanup_stale(family)
    return run_prefix(family)


@pytest.fixture
def make_lab(tmp_path):
    """``make_lab(family, subnet)`` -> ``host(name, last_octet or ip, **LabHost options)``: lab hosts on a
    new lab network; every host and the network are destroyed after the test, and nothing may be left by
    name (namespaces, links) for ``cleanup_leftovers``."""
    from pibake.lab import LabHost, LabNetwork, cleanup_leftovers

    made, nets = [], []

    def make(family, subnet):
        prefix = lab_prefix(family)
        net = LabNetwork.create(prefix, subnet)
        nets.append((prefix, net))
        base = subnet.rsplit(".", 1)[0]

        def host(name, last_octet, **options):
            ip = last_octet if isinstance(last_octet, str) else f"{base}.{last_octet}"
            made.append(LabHost.create(name, ip, network=net, base_dir=tmp_path / prefix, **options))
            return made[-1]
        host.prefix, host.network = prefix, net
        return host

    yield make
    for host in made:
        host.destroy()
    for prefix, net in nets:
        net.destroy()
        left = cleanup_leftovers(prefix)  # a clean destroy leaves nothing for the by-name cleanup
        assert not (left["netns"] or left["links"]), f"lab {prefix}: destroy left {left}"


# --------------------------------------------------------------------------- labs booted from burned images


def pibake(cluster_dir, *args, check=True, timeout=900):
    """``python -m pibake --cluster DIR ARGS`` (the CLI, as a person runs it); asserts exit 0 when ``check``."""
    proc = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(cluster_dir), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"pibake {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stderr}"
    return proc


def burned_cluster(tmp, net, *, workers, comment, configure=None):
    """`pibake init` on <net>.0/24 (an ssh key made here) and `pibake burn --output` of red00 (manager) and
    ``workers`` workers from red01 onto a synthetic Pi image: (tmp, cluster dir, images dir).
    ``configure(cluster dir)``: called between init and burn (to edit cluster.yaml the manager's card carries)."""
    from pibake.bake.synthetic import build_pi_image
    from pibake.lab.rootfs import ensure_rootfs

    ensure_rootfs()  # cold build once (~1-2 min); a no-op when cached
    tmp.chmod(0o755)
    key = make_ssh_key(tmp, comment, name="key")
    cdir = tmp / "cluster"
    pibake(cdir, "init", "--manager", "red00", "--manager-ip", f"{net}.10", "--network", f"{net}.0/24",
           "--ssh-key", f"{key}.pub", "--timezone", "Etc/UTC")
    if configure is not None:
        configure(cdir)
    build_pi_image(tmp / "raspios.img", size="160M", boot_size="64M", family="raspios")
    images = tmp / "images"
    pibake(cdir, "burn", "--hostname", "red00", "--ip", f"{net}.10", "--role", "manager",
           "--output", f"{images}/{{hostname}}.img", "--image", tmp / "raspios.img")
    pibake(cdir, "burn", "--hostname", f"red[01-{workers:02d}]", "--ip", f"{net}.[11-{10 + workers}]",
           "--output", f"{images}/{{hostname}}.img", "--image", tmp / "raspios.img")
    return tmp, cdir, images


@contextlib.contextmanager
def booted_lab(cdir, images, family, *, diagnostics=None):
    """``pibake lab up --from-images`` under a fresh ``<family><pid>`` prefix: yields (prefix, JSON report,
    stderr); ``lab down`` afterwards, also when the boot failed (``diagnostics(prefix)`` adds to the error)."""
    prefix = lab_prefix(family)
    try:
        proc = pibake(cdir, "lab", "up", "--from-images", images, "--prefix", prefix, "--json", "--timeout", 300,
                      check=False)
        assert proc.returncode == 0, proc.stderr + (diagnostics(prefix) if diagnostics else "")
        yield prefix, json.loads(proc.stdout), proc.stderr
    finally:
        pibake(cdir, "lab", "down", "--prefix", prefix, check=False)


@pytest.fixture(params=["spawn", "clustershell"])
def process_start(request, monkeypatch):
    """How pibake.connect starts a command's process: "spawn" (pibake.connect_workers, subprocess) or
    "clustershell" (its fallback, ClusterShell's own start, as with a ClusterShell without the internals
    connect_workers uses)."""
    from pibake import connect_workers

    if request.param == "clustershell":
        monkeypatch.setattr(connect_workers, "ExecClient", None)
    return request.param
