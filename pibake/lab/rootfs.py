"""The lab's root filesystems: one cached Debian rootfs, and an overlay of it per lab host.

A lab host stands in for a Pi that has just been burned: its own /etc, /var and
packages, a boot partition at /boot/firmware holding the NoCloud seed, and
cloud-init that has never run. Building that from scratch per host would take
minutes, so the root filesystem is built once with ``debootstrap`` into a cache
(``ensure_rootfs``) and each host gets a copy-on-write overlay of it
(``make_host_root``), mounted inside the host's own mount namespace.

Everything a seed would fetch from the internet on a real Pi is pre-installed in
the cache (``LAB_PACKAGES``), and the cached rootfs has no apt sources: a seed's
``package_update``/``packages:`` then succeed offline for what is installed, and
fail loudly for anything the lab does not carry.

Both functions take plain paths; ``make_host_root`` runs its mounts through an
``enter`` argv prefix (``nsenter --target PID --mount ...``) so the mounts live
in the host's mount namespace and never in the machine's.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from pibake.bake.bootpart import find_boot_partition
from pibake.errors import CommandError, PibakeError, RootfsError
from pibake.files import atomic_write
from pibake.run import run, which

LOG = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/pibake/lab")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The lab's hosts run what Raspberry Pi OS trixie runs (cloud-init 25.1, Slurm 24.11, munge 0.5.16,
# Python 3.13). bookworm (cloud-init 22.4, Slurm 22.05, Python 3.11) stays available for users of older
# Raspberry Pi OS images and of distributions with a Slurm of that age.
DEFAULT_RELEASE = "trixie"
RELEASES = ("trixie", "bookworm")

# Bump when the build recipe below changes in a way that changes the result.
RECIPE_VERSION = 3

# What the seeds would install from the internet on a real Pi, plus what cloud-init's
# modules call (locale, timezone, users/sudo, ssh keys, ntp). Every name exists in both RELEASES
# (checked with apt-cache policy against each release's Packages index).
LAB_PACKAGES = (
    # first boot
    "cloud-init",
    "locales",
    "tzdata",
    "sudo",
    "openssh-server",
    "ca-certificates",
    # time: cloud-init's ntp module picks chrony when installed (and would try to install it
    # otherwise); in the lab it runs with -x, so it never sets the machine's clock
    "chrony",
    # Slurm and munge
    "munge",
    "slurmd",
    "slurmctld",
    "slurm-client",
    # the agent (stdlib + requests + psutil)
    "python3-requests",
    "python3-psutil",
    # pibake itself on the manager (registry, CLI), installed from a wheel without an index
    "python3-flask",
    "python3-flask-httpauth",
    "gunicorn",
    "python3-cryptography",
    "python3-click",
    "python3-jinja2",
    "python3-yaml",
    "python3-jsonschema",
    "python3-rich",
    "clustershell",
    "python3-clustershell",
    "python3-venv",
    "python3-pip",
    "mtools",
    # tools the lab and people use inside a host
    "iproute2",
    "iputils-ping",
    # sensor seeds: the sensor agent's BME280/BMP280 driver and I2C bus (RPi.bme280 + smbus2), i2c-tools;
    # a few hundred kB (python3-bme280 0.2.4 in bookworm and trixie)
    "python3-bme280",
    "python3-smbus2",
    "i2c-tools",
    # mqtt: in cluster.yaml (docs/mqtt.md): the broker on the manager, the publisher's library on every node
    "mosquitto",
    "python3-paho-mqtt",
    # Kasa switches in cluster.yaml: python-kasa's compiled dependency on the manager (pibake.layout.KASA_PACKAGES)
    "python3-aiohttp",
    # a network renderer, so cloud-init writes the seed's network-config as a file
    # (/etc/network/interfaces.d/50-cloud-init); the lab never brings it up
    "ifupdown",
    "procps",
)

STAMP_SUFFIX = ".done"


def rootfs_key(release, packages):
    """Short hash naming a cache entry: the release, the package set and the recipe version."""
    blob = json.dumps(
        {"release": release, "packages": sorted(set(packages)), "recipe": RECIPE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def rootfs_path(cache_dir=None, *, release=DEFAULT_RELEASE, packages=LAB_PACKAGES):
    """Where ``ensure_rootfs`` keeps (or would keep) this rootfs. Does not build anything."""
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    return cache_dir / f"rootfs-{release}-{rootfs_key(release, packages)}"


def check_release(release):
    """Refuse a release the lab has no package list for (the names in LAB_PACKAGES are checked per release)."""
    if release not in RELEASES:
        raise RootfsError(f"unknown lab release {release!r}: choose one of {', '.join(RELEASES)}")
    return release


def rootfs_stamp(root):
    """The stamp of a complete cached rootfs (a dict), or None when it is absent or incomplete."""
    root = Path(root)
    stamp = root.with_name(root.name + STAMP_SUFFIX)
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("name") != root.name or not root.is_dir():
        return None
    return data


def ensure_rootfs(cache_dir=None, *, release=DEFAULT_RELEASE, packages=LAB_PACKAGES, mirror=None, progress=None,
                  download_dir=None):
    """Return the path of a complete cached rootfs, building it first when needed.

    The cache entry is ``<cache_dir>/rootfs-<release>-<hash of package list>``; a stamp file
    beside it (``...done``) is written last, so a rootfs without a stamp (a build that was
    killed) is removed and rebuilt, never used. Concurrent callers wait on a lock file
    instead of building twice. ``progress`` (optional) is called with one-line messages.
    Downloaded packages are kept in ``download_dir`` (default ``<cache_dir>/debs``), so a
    rebuild does not download again; ``mirror`` defaults to this machine's Debian mirror.
    """
    note = progress or (lambda message: None)
    check_release(release)
    packages = tuple(dict.fromkeys(packages))
    root = rootfs_path(cache_dir, release=release, packages=packages)
    root.parent.mkdir(parents=True, exist_ok=True)
    if rootfs_stamp(root):
        return root
    with file_lock(root.with_name(root.name + ".lock")):
        if rootfs_stamp(root):  # built by another process while we waited
            return root
        _require_tools()
        mirror = mirror or debian_mirror()
        started = time.monotonic()
        partial = root.with_name(root.name + ".partial")
        root.with_name(root.name + STAMP_SUFFIX).unlink(missing_ok=True)  # stale: its rootfs is gone
        for leftover in (root, partial):
            if leftover.exists():
                LOG.info("removing incomplete lab rootfs %s", leftover)
                note(f"removing incomplete rootfs {leftover.name}")
                remove_tree(leftover)
        note(f"building lab rootfs {root.name} (debootstrap {release}, {len(packages)} packages)")
        debs = Path(download_dir) if download_dir else root.parent / "debs"
        try:
            _debootstrap(partial, release, mirror, debs / "debootstrap", note)
            _install_packages(partial, release, mirror, packages, debs / "apt", note)
            _strip_host_state(partial)
        except PibakeError:
            remove_tree(partial)
            raise
        partial.rename(root)
        seconds = round(time.monotonic() - started, 1)
        size = tree_size(root)
        stamp = {
            "name": root.name,
            "release": release,
            "packages": list(packages),
            "recipe": RECIPE_VERSION,
            "mirror": mirror,
            "build_seconds": seconds,
            "size_bytes": size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write(root.with_name(root.name + STAMP_SUFFIX), json.dumps(stamp, indent=2) + "\n")
        LOG.info("lab rootfs %s built in %.1f s, %d MB", root, seconds, size // 2**20)
        note(f"lab rootfs built in {seconds} s ({size // 2**20} MB)")
        return root


def debian_mirror(sources_dirs=("/etc/apt/sources.list", "/etc/apt/sources.list.d")):
    """The Debian mirror this machine's apt uses (first ``.../debian`` URI), else deb.debian.org."""
    files = []
    for entry in sources_dirs:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources")))
        elif path.is_file():
            files.append(path)
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            uris = []
            if words[:1] == ["URIs:"]:
                uris = words[1:]
            elif words[:1] == ["deb"]:
                uris = [w for w in words[1:] if "://" in w][:1]
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def copy_boot_partition(image, dest, *, timeout=300):
    """Copy every file of ``image``'s FAT boot partition into the directory ``dest`` (mtools, no mount)."""
    part = find_boot_partition(image)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    run(["mcopy", "-s", "-n", "-i", f"{part.target}@@{part.offset}", "::/*", dest],
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, timeout=timeout)
    return dest


def make_host_root(rootfs, host_dir, *, enter=(), boot_image=None, timeout=60):
    """Mount a host's own root filesystem and return its path (``<host_dir>/root``).

    ``<host_dir>/root`` becomes an overlay (lower: the cached ``rootfs``; upper and work:
    ``<host_dir>/upper``, ``<host_dir>/work``) with, inside it, /proc, /sys (a fresh sysfs,
    plus the machine's /sys/fs/cgroup bound in, which slurmd needs), a minimal /dev, a tmpfs
    /run (/run/lock 1777, /run/sshd, /run/munge) and /boot/firmware bound to
    ``<host_dir>/bootfs`` (the host's boot partition, where ``boot_host`` puts the seed).
    With ``boot_image`` (a burned .img), every file of its FAT boot partition is copied
    there first, as a Pi sees its card: config.txt, cmdline.txt, the seed, extra files.

    All mounts are made by one script run through ``enter`` (an argv prefix that puts a
    command in the host's namespaces, e.g. ``["nsenter", "--target", pid, "--mount",
    "--pid"]``), so they exist only in the host's mount namespace and go away with it. The
    returned path is only meaningful inside those namespaces. Upper and work survive, so
    calling this again for the same ``host_dir`` (after a teardown) gives the same host back.
    """
    rootfs = Path(rootfs).resolve()
    host_dir = Path(host_dir).resolve()
    if not rootfs_stamp(rootfs):
        raise RootfsError(f"{rootfs} is not a complete lab rootfs; build it with ensure_rootfs()")
    if not enter:
        raise RootfsError("make_host_root needs an enter prefix: its mounts belong in the host's mount namespace")
    for sub in ("upper", "work", "root", "bootfs"):
        (host_dir / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(host_dir, 0o700)
    os.chmod(host_dir / "bootfs", 0o700)
    if boot_image is not None:
        copy_boot_partition(boot_image, host_dir / "bootfs", timeout=timeout)
    root = host_dir / "root"
    run(
        [*enter, "sh", "-eu", "-c", _MOUNT_SCRIPT, "mount-host-root", rootfs, host_dir / "upper", host_dir / "work",
         root, host_dir / "bootfs"],
        timeout=timeout,
    )
    return root


def remove_host_root(host_dir):
    """Delete a host's overlay state (upper, work, boot partition). Call after the host's
    namespaces are gone; refuses while anything is still mounted under ``host_dir`` here."""
    host_dir = Path(host_dir).resolve()
    if host_dir.exists():
        remove_tree(host_dir)


# Runs inside the host's mount (and PID) namespace. Arguments, not string pasting:
# $1 lower  $2 upper  $3 work  $4 root  $5 bootfs
_MOUNT_SCRIPT = r"""
lower=$1 upper=$2 work=$3 root=$4 bootfs=$5
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
if [ -d /sys/fs/cgroup ] && mountpoint -q /sys/fs/cgroup; then
    mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
fi
mount -t tmpfs -o mode=0755,nosuid devtmp "$root/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read -r name major minor <<EOF
$node
EOF
    mknod -m 0666 "$root/dev/$name" c "$major" "$minor"
done
mkdir -m 0755 "$root/dev/pts" "$root/dev/shm"
chmod 1777 "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=0755,nosuid,nodev tmprun "$root/run"
mkdir -m 1777 "$root/run/lock"
mkdir -m 0755 "$root/run/sshd"
mkdir -m 0755 "$root/run/munge"
chroot "$root" sh -c 'getent passwd munge >/dev/null && chown munge:munge /run/munge || true'
mkdir -p "$root/boot/firmware"
mount --bind "$bootfs" "$root/boot/firmware"
"""


def _require_tools():
    missing = [name for name in ("debootstrap", "unshare", "chroot") if not which(name)]
    if missing:
        raise RootfsError(f"building the lab rootfs needs {', '.join(missing)}: apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise RootfsError("building the lab rootfs needs root")


def in_private_mounts(argv):
    # Mounts made by the build (debootstrap's /proc, /sys, /dev binds; our apt cache bind)
    # live in a private mount namespace and vanish with it, even if the build is killed.
    return [which("unshare"), "--mount", "--propagation", "private", "--uts", "--ipc", "--pid", "--fork",
            "--kill-child", "--", *argv]


def _debootstrap(target, release, mirror, debs, note):
    debs.mkdir(parents=True, exist_ok=True)
    note("debootstrap --variant=minbase")
    started = time.monotonic()
    try:
        run(
            in_private_mounts([which("debootstrap"), "--variant=minbase", f"--cache-dir={debs}", release, target,
                                mirror]),
            timeout=1200,
        )
    except CommandError as exc:
        raise RootfsError(f"debootstrap {release} from {mirror} failed ({tail_lines(exc)}); "
                          "check that the Debian mirror is reachable, then run again") from exc
    LOG.info("debootstrap took %.1f s", time.monotonic() - started)


# $1 root  $2 apt archive cache  $3.. packages
_INSTALL_SCRIPT = r"""
root=$1 debs=$2
shift 2
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mkdir -p "$debs/partial" "$root/var/cache/apt/archives"
mount --bind "$debs" "$root/var/cache/apt/archives"
printf '#!/bin/sh\n# pibake lab: no service starts while the image is built\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
printf 'force-unsafe-io\n' > "$root/etc/dpkg/dpkg.cfg.d/pibake-lab-build"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
chroot "$root" apt-get -q update
chroot "$root" apt-get -q -y --no-install-recommends -o Dpkg::Use-Pty=0 install "$@"
# cloud-init's default locale (en_US.UTF-8) and the Pi's (en_GB.UTF-8) must exist:
# Debian's locale-gen only builds what /etc/locale.gen enables.
if [ -f "$root/etc/locale.gen" ]; then
    sed -i -e 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' -e 's/^# *\(en_GB.UTF-8 UTF-8\)/\1/' "$root/etc/locale.gen"
    chroot "$root" locale-gen
    # A system locale is set, as on a Pi image; cloud-init then regenerates locales only
    # when a seed asks for another one.
    chroot "$root" update-locale LANG=en_US.UTF-8
fi
rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/dpkg/dpkg.cfg.d/pibake-lab-build"
umount "$root/var/cache/apt/archives"
umount -R "$root/dev"
umount "$root/proc"
"""


def _install_packages(target, release, mirror, packages, debs, note):
    sources = [f"deb {mirror} {release} main", f"deb {mirror} {release}-updates main"]
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    sources.append(f"deb {security} {release}-security main")
    (target / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    debs.mkdir(parents=True, exist_ok=True)
    note(f"apt-get install {len(packages)} packages")
    started = time.monotonic()
    try:
        run(
            in_private_mounts(["sh", "-eu", "-c", _INSTALL_SCRIPT, "lab-install", target, debs, *packages]),
            timeout=1800,
        )
    except CommandError as exc:
        raise RootfsError(f"installing the lab packages into the rootfs failed ({tail_lines(exc)}); "
                          "check the package names and that the Debian mirror is reachable") from exc
    LOG.info("package install took %.1f s", time.monotonic() - started)


_LAB_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _strip_host_state(target):
    """Remove what must differ per host or would leak from this machine into every host."""
    etc = target / "etc"
    # No package source: hosts have no route to a mirror; what seeds install is pre-installed.
    (etc / "apt/sources.list").write_text(
        "# pibake lab: no package source. Everything the seeds install is pre-installed in this rootfs.\n"
    )
    for lists in (target / "var/lib/apt/lists").glob("*"):
        if lists.is_file():
            lists.unlink()
    for path in (target / "var/cache/apt").glob("*.bin"):
        path.unlink()
    # debootstrap leaves its .debs in the target (~32 MB for trixie); the build keeps its own copies in
    # <cache>/debs, and the hosts never install from here.
    for path in (target / "var/cache/apt/archives").glob("*.deb"):
        path.unlink()
    # Identity: machine-id empty (first boot fills it), no ssh host keys (cloud-init makes
    # them), no munge key (the cluster's key comes with enrolment), no cloud-init state.
    (etc / "machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (target / "var/lib/dbus/machine-id").unlink()
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    with contextlib.suppress(FileNotFoundError):
        (etc / "munge/munge.key").unlink()
    shutil.rmtree(target / "var/lib/cloud", ignore_errors=True)
    shutil.rmtree(target / "var/log/cloud-init.log", ignore_errors=True)
    # debootstrap copies this machine's name and resolver into the target.
    (etc / "hostname").write_text("localhost\n")
    (etc / "hosts").write_text(_LAB_HOSTS)
    resolv = etc / "resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("")
    # chrony, when cloud-init's ntp module starts it, must never set this machine's clock.
    default_chrony = etc / "default/chrony"
    if default_chrony.parent.is_dir() and (etc / "chrony").is_dir():
        default_chrony.write_text(
            "# pibake lab: lab hosts share the machine's clock; -x keeps chronyd from changing it.\n"
            'DAEMON_OPTS="-F 1 -x"\n'
        )


@contextlib.contextmanager
def file_lock(path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mounts_under(path):
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return found


def remove_tree(path):
    mounted = _mounts_under(path)
    if mounted:
        raise RootfsError(f"cannot remove {path}: {mounted[0]} is still mounted (unmount it, or stop the lab)")
    run(["rm", "-rf", "--one-file-system", path], timeout=600)


def tail_lines(exc):
    lines = [line.strip() for line in (exc.stderr or exc.stdout or str(exc)).splitlines() if line.strip()]
    return "; ".join(lines[-2:]) or str(exc)


def tree_size(path):
    proc = run(["du", "-sxb", path], timeout=300)
    return int(proc.stdout.split()[0])
