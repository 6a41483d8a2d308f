"""The real target: a Raspberry Pi OS trixie Lite-shaped arm64 image, built from Debian trixie arm64 packages.

The Raspberry Pi archive (firmware, the Pi kernel, Raspberry Pi OS's own packages) cannot be reached here,
so the image is Debian trixie arm64 shaped the way Raspberry Pi OS trixie Lite is shaped where it matters to
pibake (docs/lab.md, "The arm64 target", lists every difference):

* a DOS disk label with a FAT32 ``bootfs`` partition (kernel, initramfs, ``cmdline.txt``, ``config.txt``)
  and an ext4 ``rootfs`` partition, mounted by PARTUUID (``/etc/fstab``) at ``/`` and ``/boot/firmware``;
* cloud-init configured as Raspberry Pi OS's ``rpi-cloud-init-mods`` does: NoCloud with ``seedfrom:
  file:///boot/firmware`` and ``cloud-init-main.service`` ordered after the ``/boot/firmware`` mount;
* netplan handing every device to NetworkManager (``/usr/lib/netplan/00-network-manager-all.yaml``);
* systemd, openssh-server, systemd-timesyncd, python3 - and the packages pibake's seeds install at first
  boot already installed, because the emulated machine has no internet. What the manager's seed adds on top
  (chrony, which replaces systemd-timesyncd) is in a local apt repository inside the image, so the first
  boot's ``package_update`` / ``packages`` run apt for real, offline.

The root file system is built once with ``mmdebstrap --arch=arm64`` (maintainer scripts run under
qemu-user through binfmt_misc) and cached under ``/var/cache/pibake/target`` by a hash of its recipe; the
image is assembled from it without mounting anything (``bake.synthetic.build_pi_image``) and cached too.

    image = ensure_target_image(progress=print)     # TargetImage(path=..., versions={...})
    # then: pibake burn --image image.path --output red01.img ... and pibake.lab.vm boots it
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pibake.bake.synthetic import CONFIG_TXT, build_pi_image, cmdline_for, parse_size
from pibake.errors import CommandError, PibakeError, TargetError
from pibake.files import atomic_write
from pibake.lab.rootfs import (in_private_mounts, file_lock, remove_tree, tail_lines, tree_size,
                               debian_mirror)
from pibake.run import run, which

LOG = logging.getLogger(__name__)

# PIBAKE_TARGET_CACHE: another place for the (multi-GB) cache, e.g. a bigger disk
DEFAULT_CACHE_DIR = Path(os.environ.get("PIBAKE_TARGET_CACHE") or "/var/cache/pibake/target")
RELEASE = "trixie"
ARCH = "arm64"
# Bump when the recipe below changes in a way that changes the result: ROOT_RECIPE_VERSION for what
# mmdebstrap builds (slow), RECIPE_VERSION for how the root is shaped and the image assembled (fast).
ROOT_RECIPE_VERSION = 1
RECIPE_VERSION = 2

# Raspberry Pi OS Lite's base as far as pibake's seeds and the boot depend on it, plus what the seeds of
# every role install at first boot (pre-installed: the emulated Pi has no internet). Names are trixie's.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "systemd-timesyncd", "kmod",
    "linux-image-arm64", "initramfs-tools",
    "cloud-init", "netplan.io", "network-manager",
    "openssh-server", "sudo", "locales", "tzdata", "ca-certificates",
    "iproute2", "iputils-ping", "procps", "dosfstools", "e2fsprogs", "python3",
)
ROLE_PACKAGES = (
    # worker
    "slurmd", "munge", "slurm-client", "python3-psutil",
    # manager (chrony comes from the image's local repository at first boot, see LOCAL_REPO_PACKAGES)
    "slurmctld", "python3-venv", "python3-pip", "python3-flask", "python3-flask-httpauth", "gunicorn",
    "python3-cryptography", "python3-click", "python3-jinja2", "python3-yaml", "python3-jsonschema",
    "python3-requests", "python3-clustershell", "python3-rich", "mtools",
    # sensor
    "i2c-tools", "python3-smbus",
)
# Conflicts with systemd-timesyncd (Raspberry Pi OS's time client), so it cannot be pre-installed: the
# manager's seed installs it with apt at first boot, from the image's local repository.
LOCAL_REPO_PACKAGES = ("chrony",)
LOCAL_REPO_DIR = "var/lib/pibake-target/debs"

# What Raspberry Pi OS trixie's rpi-cloud-init-mods installs (the same keys, the same files).
RPI_CLOUD_CFG = """\
# Raspberry Pi OS (rpi-cloud-init-mods): read the NoCloud seed from the boot partition.
datasource_list: [ NoCloud, None ]
datasource:
  NoCloud:
    seedfrom: file:///boot/firmware
"""
RPI_FIRMWARE_MOUNT_DROPIN = """\
# Raspberry Pi OS (rpi-cloud-init-mods): the seed lives on /boot/firmware; wait for its mount.
[Unit]
RequiresMountsFor=/boot/firmware
"""
# pi-gen stage2/04-cloud-init: netplan hands every device to NetworkManager.
NETPLAN_NETWORK_MANAGER = """\
network:
  version: 2
  renderer: NetworkManager
"""
LOCAL_REPO_SOURCES = f"""\
# pibake target image: the emulated Pi has no internet; what first boot installs with apt comes from here.
Types: deb
URIs: file:/{LOCAL_REPO_DIR}
Suites: ./
Trusted: yes
"""
STAMP_SUFFIX = ".done"
# The root's build: ~36 CPU-minutes of emulated maintainer scripts, 70 min wall on a 2-CPU machine at load 5-6.
MMDEBSTRAP_TIMEOUT = 3 * 3600
IMAGE_HEADROOM = 768 * 1024 * 1024  # free space in the root file system for first boot (logs, apt, venv)
BOOT_SIZE = "512M"  # as Raspberry Pi OS trixie
VERSIONED_PACKAGES = ("cloud-init", "slurmd", "munge", "python3", "systemd", "network-manager",
                      "netplan.io", "openssh-server", "linux-image-arm64")


@dataclass(frozen=True)
class TargetImage:
    """A built target image: its path, the versions inside it and how it was built."""

    path: Path
    stamp: dict = field(default_factory=dict, compare=False)

    @property
    def versions(self):
        return dict(self.stamp.get("versions") or {})


# ----------------------------------------------------------------------------- pure helpers


def root_key(*, release=RELEASE, arch=ARCH, packages=BASE_PACKAGES + ROLE_PACKAGES):
    """Short hash naming the cached root file system (mmdebstrap's part: release, architecture, packages)."""
    blob = json.dumps({"release": release, "arch": arch, "packages": sorted(set(packages)),
                       "recipe": ROOT_RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def recipe_key(*, release=RELEASE, arch=ARCH, packages=BASE_PACKAGES + ROLE_PACKAGES,
               repo_packages=LOCAL_REPO_PACKAGES):
    """Short hash naming the cached image: its root, and how it is shaped and assembled."""
    blob = json.dumps({"root": root_key(release=release, arch=arch, packages=packages),
                       "repo": sorted(set(repo_packages)), "recipe": RECIPE_VERSION,
                       "files": [RPI_CLOUD_CFG, RPI_FIRMWARE_MOUNT_DROPIN, NETPLAN_NETWORK_MANAGER]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def disk_id_for(key):
    """The MBR disk identifier of the image (8 hex digits), fixed by the recipe so PARTUUIDs are stable."""
    return hashlib.sha256(f"pibake-target:{key}".encode()).hexdigest()[:8]


def fstab_for(disk_id):
    """Raspberry Pi OS's /etc/fstab (pi-gen stage1), with this image's PARTUUIDs."""
    return (f"proc            /proc           proc    defaults          0       0\n"
            f"PARTUUID={disk_id}-01  /boot/firmware  vfat    defaults          0       2\n"
            f"PARTUUID={disk_id}-02  /               ext4    defaults,noatime  0       1\n")


def parse_dpkg_status(text, names=VERSIONED_PACKAGES):
    """{package: version} of the installed ``names`` in a dpkg status file's text."""
    found = {}
    for block in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", block, flags=re.MULTILINE))
        if fields.get("Package") in names and "installed" in fields.get("Status", "").split():
            found[fields["Package"]] = fields.get("Version", "")
    return found


def image_size_for(root_bytes, boot_bytes):
    """Image size: boot + root + headroom, rounded up to 64 MiB (what a card must at least hold)."""
    step = 64 * 1024 * 1024
    total = 4 * 1024 * 1024 + boot_bytes + int(root_bytes * 1.1) + IMAGE_HEADROOM
    return -(-total // step) * step


# ----------------------------------------------------------------------------- emulation


def binfmt_status(arch=ARCH, binfmt_dir="/proc/sys/fs/binfmt_misc"):
    """None when ``arch`` binaries run here through binfmt_misc, else what is missing (one line)."""
    qemu = f"qemu-{'aarch64' if arch == 'arm64' else 'arm'}"
    entry = Path(binfmt_dir) / qemu
    if not Path(binfmt_dir, "register").exists():
        return f"binfmt_misc is not mounted at {binfmt_dir}"
    if not entry.exists():
        return f"no {qemu} entry in {binfmt_dir}"
    if "enabled" not in entry.read_text():
        return f"{entry} is disabled"
    return None


def ensure_binfmt(arch=ARCH, binfmt_dir="/proc/sys/fs/binfmt_misc", conf_dir="/usr/lib/binfmt.d"):
    """Make ``arch`` binaries run through qemu-user (as systemd-binfmt would at boot); explain what is missing."""
    if binfmt_status(arch, binfmt_dir) is None:
        return
    qemu = f"qemu-{'aarch64' if arch == 'arm64' else 'arm'}"
    conf = Path(conf_dir) / f"{qemu}.conf"
    if not conf.exists():
        raise TargetError(f"running {arch} programs needs qemu-user-static: apt-get install qemu-user-static "
                          f"({conf} is missing)")
    if os.geteuid() != 0:
        raise TargetError(f"registering {qemu} with binfmt_misc needs root")
    if not Path(binfmt_dir, "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt_dir], timeout=30)
    if not (Path(binfmt_dir) / qemu).exists():
        rule = "".join(line for line in conf.read_text().splitlines(keepends=True) if not line.startswith("#"))
        Path(binfmt_dir, "register").write_text(rule.strip() + "\n")
    problem = binfmt_status(arch, binfmt_dir)
    if problem:
        raise TargetError(f"cannot run {arch} programs here: {problem}")


# ----------------------------------------------------------------------------- build


def target_paths(cache_dir=None):
    """(root file system dir, image file) of the current recipe's cache entries."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    return (cache / f"rootfs-{RELEASE}-{ARCH}-{root_key()}",
            cache / f"raspios-like-{RELEASE}-{ARCH}-{recipe_key()}.img")


def cached_target_image(cache_dir=None):
    """The built target image of the current recipe, or None (never builds)."""
    _, image = target_paths(cache_dir)
    stamp = _read_stamp(image)
    return TargetImage(path=image, stamp=stamp) if stamp else None


def ensure_target_image(cache_dir=None, *, mirror=None, progress=None):
    """Return the cached target image, building the arm64 root and the image first when needed.

    Concurrent callers wait on a lock instead of building twice; a build that was killed leaves no stamp
    and is redone. ``progress`` (optional) gets one-line messages. The first build takes a while (the
    packages' maintainer scripts run under emulation): see docs/report/target.md for measured times.
    """
    note = progress or (lambda message: None)
    key = recipe_key()
    root, image = target_paths(cache_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    found = cached_target_image(cache_dir)
    if found:
        return found
    with file_lock(root.parent / f"target-{root_key()}.lock"):  # one build of a root at a time
        found = cached_target_image(cache_dir)
        if found:
            return found
        _require_build_tools()
        ensure_binfmt()
        mirror = mirror or debian_mirror()
        started = time.monotonic()
        timings = {}
        if not _read_stamp(root):
            _build_root(root, mirror, note, timings)
        timings.update((_read_stamp(root) or {}).get("timings", {}))
        t0 = time.monotonic()
        note("local apt repository for first boot: " + " ".join(LOCAL_REPO_PACKAGES))
        _local_repo(root, mirror)
        note("shaping it like Raspberry Pi OS (cloud-init NoCloud on /boot/firmware, NetworkManager)")
        _shape_like_raspios(root)
        timings["shape_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        note("assembling the image (DOS label, FAT32 bootfs, ext4 rootfs)")
        versions = _assemble_image(root, image, disk_id_for(key))
        timings["image_s"] = round(time.monotonic() - t0, 1)
        stamp = {
            "name": image.name, "key": key, "release": RELEASE, "arch": ARCH, "recipe": RECIPE_VERSION,
            "mirror": mirror, "versions": versions, "disk_id": disk_id_for(key),
            "size_bytes": image.stat().st_size, "timings": timings,
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write(_stamp_path(image), json.dumps(stamp, indent=2) + "\n")
        note(f"target image built in {stamp['build_seconds']} s: {image}")
        LOG.info("target image %s built in %.1f s", image, stamp["build_seconds"])
        return TargetImage(path=image, stamp=stamp)


def _require_build_tools():
    if os.geteuid() != 0:
        raise TargetError("building the arm64 target image needs root")
    needs = {"mmdebstrap": "mmdebstrap", "arch-test": "arch-test", "sfdisk": "fdisk",
             "mkfs.vfat": "dosfstools", "mke2fs": "e2fsprogs", "mcopy": "mtools",
             "dpkg-scanpackages": "dpkg-dev", "unshare": "util-linux"}
    missing = sorted({pkg for tool, pkg in needs.items() if not which(tool)})
    if missing:
        raise TargetError(f"building the arm64 target image needs: apt-get install {' '.join(missing)}")


def _stamp_path(path):
    return path.with_name(path.name + STAMP_SUFFIX)


def _read_stamp(path):
    try:
        data = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("name") == path.name and path.exists() else None


def _build_root(root, mirror, note, timings):
    partial = root.with_name(root.name + ".partial")
    for leftover in (root, partial):
        if leftover.exists():
            note(f"removing incomplete {leftover.name}")
            remove_tree(leftover)
    _stamp_path(root).unlink(missing_ok=True)
    t0 = time.monotonic()
    note(f"mmdebstrap --arch={ARCH} {RELEASE}: {len(BASE_PACKAGES + ROLE_PACKAGES)} packages "
         "(maintainer scripts under emulation: the slow part)")
    try:
        _mmdebstrap(partial, mirror)
    except PibakeError:
        remove_tree(partial)
        raise
    timings["mmdebstrap_s"] = round(time.monotonic() - t0, 1)
    partial.rename(root)
    atomic_write(_stamp_path(root), json.dumps({"name": root.name, "timings": timings}) + "\n")


def _mmdebstrap(target, mirror):
    argv = [
        which("mmdebstrap"), f"--arch={ARCH}", "--variant=minbase", "--mode=root", "--format=directory",
        "--include=" + ",".join(BASE_PACKAGES + ROLE_PACKAGES),
        '--aptopt=Apt::Install-Recommends "false"',
        # no documentation (as small as Raspberry Pi OS Lite keeps it is not the point: speed under emulation)
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=force-unsafe-io",
        RELEASE, str(target), mirror,
    ]
    try:
        run(in_private_mounts(argv), timeout=MMDEBSTRAP_TIMEOUT)
    except CommandError as exc:
        if exc.returncode == -1:
            raise TargetError(f"mmdebstrap --arch={ARCH} {RELEASE} did not finish within {MMDEBSTRAP_TIMEOUT} s "
                              "(emulated maintainer scripts on a busy machine): run it again on a quieter one") from exc
        raise TargetError(f"mmdebstrap --arch={ARCH} {RELEASE} from {mirror} failed ({tail_lines(exc)}); "
                          "check that the Debian mirror is reachable and qemu-user-static is installed") from exc


# $1 root  $2 repo dir inside the root  $3 sources file naming the mirror  $4 keyring  $5.. packages
# The packages (and whatever of their dependencies the root lacks) are fetched from the mirror with the
# root's own apt, in a private sources/lists state, so the root's sources (only the local repository once
# shaped) are never touched and a rebuild gives the same result.
_REPO_SCRIPT = r"""
root=$1 repo=$2 sources=$3 keyring=$4
shift 4
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
work=/tmp/pibake-repo-build
mkdir -p "$root$work/lists/partial"
cp "$sources" "$root$work/sources.list"
cp "$keyring" "$root$work/keyring.gpg"
opts="-o Dir::Etc::SourceList=$work/sources.list -o Dir::Etc::SourceParts=/nonexistent \
      -o Dir::State::Lists=$work/lists -o APT::Sandbox::User=root -o Debug::NoLocking=1"
mount -t proc proc "$root/proc"
# this machine's resolver while apt fetches (the image itself keeps an empty resolv.conf)
rm -f "$root/etc/resolv.conf"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" apt-get -q $opts update
names=$(chroot "$root" apt-get -q -s $opts --no-install-recommends install "$@" | awk '/^Inst /{print $2}')
rm -rf "${root:?}/$repo"
mkdir -p "$root/$repo"
chroot "$root" sh -c "cd /$repo && apt-get -q $opts download $names"
umount "$root/proc"
rm -rf "${root:?}$work"
: > "$root/etc/resolv.conf"
cd "$root/$repo" && dpkg-scanpackages --multiversion . > Packages 2>/dev/null
"""


def _local_repo(root, mirror):
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    if not keyring.exists():
        raise TargetError(f"{keyring} is missing: apt-get install debian-archive-keyring")
    sources = root.parent / f"{root.name}.mirror.list"
    sources.write_text(f"deb [signed-by=/tmp/pibake-repo-build/keyring.gpg] {mirror} {RELEASE} main\n")
    try:
        run(in_private_mounts(["sh", "-eu", "-c", _REPO_SCRIPT, "target-repo", root, LOCAL_REPO_DIR, sources,
                                keyring, *LOCAL_REPO_PACKAGES]), timeout=1200)
    except CommandError as exc:
        raise TargetError(f"building the image's local apt repository failed ({tail_lines(exc)})") from exc
    finally:
        sources.unlink(missing_ok=True)
    if not list((root / LOCAL_REPO_DIR).glob("*.deb")):
        raise TargetError("the image's local apt repository is empty: " + " ".join(LOCAL_REPO_PACKAGES))


_SHAPE_SCRIPT = r"""
root=$1
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
# cloud-init's default locale (en_US) and Raspberry Pi OS's (en_GB) exist, as on a Pi image
sed -i -e 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' -e 's/^# *\(en_GB.UTF-8 UTF-8\)/\1/' "$root/etc/locale.gen"
chroot "$root" locale-gen
chroot "$root" update-locale LANG=en_GB.UTF-8
"""


def _shape_like_raspios(root):
    etc = root / "etc"
    _write(etc / "cloud/cloud.cfg.d/99_raspberry-pi.cfg", RPI_CLOUD_CFG)
    _write(root / "usr/lib/systemd/system/cloud-init-main.service.d/41-rpi-firmware-mount.conf",
           RPI_FIRMWARE_MOUNT_DROPIN)
    _write(root / "usr/lib/netplan/00-network-manager-all.yaml", NETPLAN_NETWORK_MANAGER, mode=0o600)
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    # apt: only the image's local repository (no route to a mirror from the emulated Pi)
    (etc / "apt/sources.list").unlink(missing_ok=True)
    for old in (etc / "apt/sources.list.d").glob("*"):
        old.unlink()
    _write(etc / "apt/sources.list.d/pibake-target.sources", LOCAL_REPO_SOURCES)
    try:
        run(["sh", "-eu", "-c", _SHAPE_SCRIPT, "target-shape", root], timeout=900)
    except CommandError as exc:
        raise TargetError(f"shaping the target root failed ({tail_lines(exc)})") from exc
    _strip_identity(root)


def _strip_identity(root):
    """Nothing that must differ per card stays in the image: machine-id, ssh host keys, the munge key."""
    etc = root / "etc"
    (etc / "machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    (etc / "munge/munge.key").unlink(missing_ok=True)
    # Without its key munged cannot start: not at boot (a failed unit on every card), but once the agent has
    # installed the cluster's key and enabled it. On a Pi, apt installs munge at first boot with a new key.
    for unit in ("munge.service", "slurmd.service", "slurmctld.service"):
        (etc / "systemd/system/multi-user.target.wants" / unit).unlink(missing_ok=True)
    shutil.rmtree(root / "var/lib/cloud", ignore_errors=True)
    for lists in (root / "var/lib/apt/lists").glob("*"):
        if lists.is_file():
            lists.unlink()
    (etc / "hostname").write_text("raspberrypi\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
                               "127.0.1.1\traspberrypi\n")
    resolv = etc / "resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("")


def _write(path, text, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _latest(folder, pattern):
    found = sorted(Path(folder).glob(pattern))
    if not found:
        raise TargetError(f"the target root has no {pattern} in {folder}: linux-image-{ARCH} did not install")
    return found[-1]


def _assemble_image(root, image, disk_id):
    """Write the image file from the cached root; return the versions of the key packages inside it."""
    (root / "etc/fstab").write_text(fstab_for(disk_id))
    kernel = _latest(root / "boot", "vmlinuz-*")
    initrd = _latest(root / "boot", "initrd.img-*")
    boot_files = {
        # the names Raspberry Pi OS's firmware loads on a 64-bit Pi (kernel8.img + initramfs8, auto_initramfs=1)
        "kernel8.img": kernel.read_bytes(),
        "initramfs8": initrd.read_bytes(),
        "config.txt": CONFIG_TXT,
        "cmdline.txt": cmdline_for("raspios", f"{disk_id}-02"),
        "issue.txt": f"pibake target image: Debian {RELEASE} {ARCH} shaped like Raspberry Pi OS Lite\n",
        # no Raspberry Pi firmware or device trees: the Raspberry Pi archive is not reachable here
        "kernel_2712.img": None, "bcm2711-rpi-4-b.dtb": None, "bcm2712-rpi-5-b.dtb": None,
        "start4.elf": None, "fixup4.dat": None, "overlays/README": None,
    }
    size = image_size_for(tree_size(root), parse_size(BOOT_SIZE))
    partial = image.with_name(image.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        build_pi_image(partial, rootfs_dir=root, size=size, boot_size=BOOT_SIZE, boot_files=boot_files,
                       family="raspios", disk_id=disk_id)
    except PibakeError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, image)
    return parse_dpkg_status((root / "var/lib/dpkg/status").read_text())
