"""Golden images: a role's packages installed into a copy of an OS image at burn time, so first boot runs no apt.

On a real Pi the first boot spends minutes in ``apt-get update`` and installing Slurm, munge and Python
packages, once per card, from the internet. ``bake_raw_image`` (``pibake.bake.burn.bake_image`` for a catalog
name or an image file) does that once per (image, role, package set) on
this machine, the way sdm and rpi-image-gen customise images:

1. copy the image (sparse) next to the cache entry it will become;
2. attach the copy with ``losetup -P`` and mount its root partition, inside a private mount namespace
   (``unshare --mount --pid --fork --kill-child``), so every mount goes away with that process, even on a
   crash or Ctrl-C; the loop device is detached by this process in a ``finally``;
3. run the image's own ``apt-get install`` (the role's packages: ``pibake.layout.role_packages``, the same
   list the seed installs) in a chroot; for arm64/armhf programs the kernel runs them through qemu-user
   (binfmt_misc, ``ensure_emulation``). apt reads a private sources list: the image's own ``file:``
   repositories and the configured Debian mirror for the image's release, nothing else (a Raspberry Pi
   OS image's own http sources are not used); its package lists live in a tmpfs, its archive cache is
   cleaned; no service starts (``policy-rc.d``);
4. strip what must differ per card or cannot start before the agent configures it (the munge key the
   package generated, munge/slurmd/slurmctld started at boot: the agent enables them);
5. write the marker ``/etc/pibake/baked.json`` (role, packages) in the root and ``pibake-baked.json`` on the
   FAT boot partition (where ``pibake burn`` reads it without mounting anything), then rename the copy into
   the cache atomically, with a ``.done`` stamp. A second bake of the same inputs is a cache hit.

``pibake burn`` of a baked image renders seeds without ``package_update`` and without the packages the image
already holds (``baked_packages``); a plain image still installs them at first boot.

    baked = burn.bake_image("raspios-trixie-lite-arm64", cluster_dir="~/cluster", role="worker", progress=print)
    # then: pibake burn --image baked.path ...
"""

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pibake.bake import bootpart

from pibake.errors import BakeError, CommandError, PibakeError
from pibake.locks import file_lock
from pibake.run import run, which

LOG = logging.getLogger(__name__)

BAKE_VERSION = 1  # bump when how an image is baked changes its result
DEFAULT_CACHE_DIR = Path(os.environ.get("PIBAKE_BAKED_CACHE") or "/var/cache/pibake/baked")
ROOT_MARKER = "etc/pibake/baked.json"  # in the root file system (what the node itself can read)
BOOT_MARKER = "pibake-baked.json"  # on the FAT boot partition (what `pibake burn` reads)
STAMP_SUFFIX = ".done"
# Units a baked package would start at boot before the agent has configured them (no munge key yet, no
# slurm.conf): the agent enables them once it has (as it does after a first-boot install).
AGENT_STARTED_UNITS = ("munge.service", "slurmd.service", "slurmctld.service")
QEMU_NAMES = {"arm64": "qemu-aarch64", "armhf": "qemu-arm"}
APT_TIMEOUT = 3 * 3600  # dpkg's maintainer scripts under qemu-user on a busy 2-CPU machine
BINFMT_DIR = "/proc/sys/fs/binfmt_misc"


@dataclass(frozen=True)
class BakedImage:
    """A baked image in the cache: its path and its stamp (marker, timings, whether it was a cache hit)."""

    path: Path
    stamp: dict = field(default_factory=dict, compare=False)
    cached: bool = False

    def to_dict(self):
        return {"path": str(self.path), "cached": self.cached, **self.stamp}


# ----------------------------------------------------------------------------- pure helpers


def bake_key(image_sha256, role, packages):
    """Short hash naming a baked image: the source image's sha256, the role and its package set."""
    blob = json.dumps({"image": image_sha256, "role": role, "packages": sorted(set(packages)),
                       "bake": BAKE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def baked_name(source_name, role, key):
    """File name of a baked image in the cache: ``<source stem>-<role>-baked-<key>.img``."""
    stem = Path(source_name).name
    for suffix in (".xz", ".gz", ".zst", ".img", ".raw"):
        stem = stem.removesuffix(suffix)
    return f"{stem}-{role}-baked-{key}.img"


def marker(role, packages, image_sha256):
    """The marker a baked image carries (root and boot partition)."""
    return {"pibake_baked": BAKE_VERSION, "role": role, "packages": sorted(set(packages)),
            "image_sha256": image_sha256}


def parse_marker(data):
    """The marker dict from a marker file's bytes, or None when it is absent or not pibake's."""
    if not data:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if not isinstance(value, dict) or "pibake_baked" not in value or not isinstance(value.get("packages"), list):
        return None
    return value


def parse_binfmt_entry(text):
    """{enabled, interpreter, flags, magic} of a /proc/sys/fs/binfmt_misc/<name> file's text."""
    entry = {"enabled": False, "interpreter": None, "flags": "", "magic": None}
    for line in text.splitlines():
        words = line.split(None, 1)
        if not words:
            continue
        if words[0] in ("enabled", "disabled"):
            entry["enabled"] = words[0] == "enabled"
        elif words[0] == "interpreter" and len(words) > 1:
            entry["interpreter"] = words[1].strip()
        elif words[0] == "flags:":
            entry["flags"] = words[1].strip() if len(words) > 1 else ""
        elif words[0] == "magic" and len(words) > 1:
            entry["magic"] = words[1].strip()
    return entry


def binfmt_rule_with_fix_binary(conf_text):
    """The register line of a binfmt.d file (``:name:type:offset:magic:mask:interpreter:flags``) with the F
    flag: the kernel opens the interpreter once, so it runs inside a chroot that does not contain it."""
    line = next((ln.strip() for ln in conf_text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    fields = line.split(":")
    if len(fields) != 8:
        raise BakeError(f"not a binfmt_misc rule: {line!r}")
    if "F" not in fields[7]:
        fields[7] += "F"
    return ":".join(fields)


def image_arch(dpkg_arch_text):
    """The dpkg architecture of an image from its ``/var/lib/dpkg/arch`` (first line), else None."""
    lines = [ln.strip() for ln in (dpkg_arch_text or "").splitlines() if ln.strip()]
    return lines[0] if lines else None


def os_codename(os_release_text):
    """VERSION_CODENAME from an os-release file's text (``trixie``), else None."""
    for line in os_release_text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "VERSION_CODENAME":
            return value.strip().strip('"') or None
    return None


def local_sources(files):
    """The ``file:`` repositories of an image's apt sources ({file name: text}) as one-line ``deb`` entries.

    Only local repositories are kept: the network sources an image names (deb.debian.org,
    archive.raspberrypi.com) are not used by a bake; the configured mirror is added instead."""
    lines = []
    for name, text in sorted(files.items()):
        if name.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith((" ", "#")):
                        fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                    continue
                options = "[trusted=yes] " if fields.get("trusted", "").lower() == "yes" else ""
                for uri in fields.get("uris", "").split():
                    if uri.startswith("file:"):
                        lines.append(f"deb {options}{uri} {fields.get('suites', '')} "
                                     f"{fields.get('components', '')}".rstrip())
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                uri = next((w for w in words[1:] if not w.startswith("[") and not w.endswith("]")), "")
                if words and words[0] == "deb" and uri.startswith("file:"):
                    lines.append(" ".join(words))
    return lines


def private_sources(local_lines, mirror, codename, keyring):
    """The bake's apt sources list: the image's own local repositories, then the mirror (None: offline)."""
    lines = list(local_lines)
    if mirror:
        lines.append(f"deb [signed-by={keyring}] {mirror} {codename} main")
    return "".join(line + "\n" for line in lines)


def apt_fetch_summary(log_text):
    """What an apt run fetched, from its output: {"need_to_get": "N kB" or None, "installed": count}."""
    need = None
    installed = 0
    for line in log_text.splitlines():
        if line.startswith("Need to get "):
            need = line[len("Need to get "):].split(" of archives")[0]
        if " newly installed" in line:
            try:
                installed = int(line.split(" newly installed")[0].rsplit(",", 1)[-1].split()[-1])
            except (ValueError, IndexError):
                pass
    return {"need_to_get": need, "installed": installed}


# ----------------------------------------------------------------------------- emulation


def emulation_problem(arch, binfmt_dir=BINFMT_DIR, host_arch=None):
    """None when programs of ``arch`` run in a chroot here (native, or binfmt_misc with qemu-user and the F
    flag), else what is missing, as one line."""
    if arch in (host_arch or _host_arch(), None):
        return None
    qemu = QEMU_NAMES.get(arch)
    if qemu is None:
        return f"no emulation for {arch} images (pibake bakes arm64 and armhf)"
    if not Path(binfmt_dir, "register").exists():
        return f"binfmt_misc is not mounted at {binfmt_dir}"
    path = Path(binfmt_dir, qemu)
    if not path.exists():
        return f"{qemu} is not registered with binfmt_misc"
    entry = parse_binfmt_entry(path.read_text())
    if not entry["enabled"]:
        return f"{path} is disabled"
    if "F" not in entry["flags"]:
        return f"{qemu} is registered without the F (fix-binary) flag, so it cannot run inside a chroot"
    return None


def ensure_emulation(arch, binfmt_dir=BINFMT_DIR, conf_dir="/usr/lib/binfmt.d"):
    """Make ``arch`` programs run in a chroot: mount binfmt_misc, register qemu-user with the F flag.

    A registration without F that someone else made is left alone (removing it could break their running
    work): the error says so. Raises BakeError with one line saying why this machine cannot."""
    if emulation_problem(arch, binfmt_dir) is None:
        return
    qemu = QEMU_NAMES.get(arch)
    if qemu is None:
        raise BakeError(emulation_problem(arch, binfmt_dir))
    if os.geteuid() != 0:
        raise BakeError(f"baking an {arch} image needs root (binfmt_misc, loop devices, mounts)")
    if not Path(binfmt_dir, "register").exists():
        try:
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt_dir], timeout=30)
        except CommandError as exc:
            raise BakeError(f"this machine cannot run {arch} programs: binfmt_misc cannot be mounted "
                            f"({exc.stderr.strip() or exc})") from exc
    if not Path(binfmt_dir, qemu).exists():
        conf = Path(conf_dir) / f"{qemu}.conf"
        if not conf.exists():
            raise BakeError(f"this machine cannot run {arch} programs: {conf} is missing "
                            "(apt-get install qemu-user-static)")
        try:
            Path(binfmt_dir, "register").write_text(binfmt_rule_with_fix_binary(conf.read_text()) + "\n")
        except OSError as exc:
            raise BakeError(f"this machine cannot run {arch} programs: registering {qemu} with binfmt_misc "
                            f"failed ({exc.strerror})") from exc
    problem = emulation_problem(arch, binfmt_dir)
    if problem:
        raise BakeError(f"this machine cannot run {arch} programs: {problem}")


def _host_arch():
    try:
        return run(["dpkg", "--print-architecture"], timeout=10).stdout.strip()
    except PibakeError:
        return None


# ----------------------------------------------------------------------------- loop device


def root_partition(image):
    """(offset, size, number) of the image's root partition: the first non-FAT partition after the boot one."""
    parts = bootpart.partitions(image)
    bootpart.find_boot_partition(image)  # a Pi image has one (the bake's marker goes there)
    roots = [p for p in parts if not p["fat"] and p["size"] > 0]
    if not roots:
        raise BakeError(f"{image} has no root partition next to its boot partition: is it a Pi image?")
    return roots[0]["offset"], roots[0]["size"], roots[0]["number"]


class LoopDevice:
    """``losetup -P`` of an image file; ``partition(n)`` is its /dev node (made when udev does not run here)."""

    def __init__(self, image):
        self.image = Path(image)
        self.device = None

    def __enter__(self):
        self.device = run(["losetup", "--find", "--show", "--partscan", self.image], timeout=60).stdout.strip()
        return self

    def partition(self, number):
        base = Path(self.device).name
        node = Path(f"/dev/{base}p{number}")
        sysfs = Path(f"/sys/block/{base}/{base}p{number}/dev")
        for attempt in range(20):
            if node.exists():
                return str(node)
            if not sysfs.exists() and attempt in (2, 10):
                run(["partx", "--add", self.device], check=False, timeout=30)  # no udev, no partition scan
            if sysfs.exists() and not node.exists() and attempt >= 3:
                major, minor = (int(x) for x in sysfs.read_text().split(":"))
                os.mknod(node, 0o600 | 0o060000, os.makedev(major, minor))
            time.sleep(0.25)
        raise BakeError(f"{self.device}: partition {number} did not appear (losetup -P, partx)")

    def __exit__(self, *exc):
        if self.device:
            run(["losetup", "--detach", self.device], check=False, timeout=60)
            self.device = None


# ----------------------------------------------------------------------------- inside the image


# The chroot's mounts, shared by the bake and bench's plain image: the root partition ($dev on $mnt), /proc, a
# /dev of the few nodes apt and dpkg use, and a tmpfs /run.
CHROOT_MOUNTS = r"""
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount "$dev" "$mnt"
mount -t proc proc "$mnt/proc"
mount -t tmpfs -o mode=0755 tmpfs "$mnt/dev"
for n in null zero full random urandom tty; do : > "$mnt/dev/$n"; mount --bind "/dev/$n" "$mnt/dev/$n"; done
mount -t tmpfs -o mode=0755 tmpfs "$mnt/run"
"""

# Runs inside `unshare --mount --propagation private --pid --fork --kill-child`: every mount is private and
# dropped when it exits. $1 root partition device, $2 mount point, $3 work dir (sources, keyring, marker),
# $4.. packages. Prints the apt output; exit status is apt's.
_BAKE_SCRIPT = r"""
dev=$1 mnt=$2 work=$3
shift 3
""" + CHROOT_MOUNTS + r"""ln -s /proc/self/fd "$mnt/dev/fd"
mkdir -p "$mnt/run/pibake-bake/lists/partial" "$mnt/run/lock"
cp "$work/sources.list" "$work/keyring.gpg" "$mnt/run/pibake-bake/"
if [ -s "$work/resolv.conf" ]; then
  mv "$mnt/etc/resolv.conf" "$work/resolv.conf.image" 2>/dev/null || :
  cp "$work/resolv.conf" "$mnt/etc/resolv.conf"
fi
policy_new=
if [ ! -e "$mnt/usr/sbin/policy-rc.d" ]; then
  printf '#!/bin/sh\n# pibake image bake: no service starts in the image\nexit 101\n' > "$mnt/usr/sbin/policy-rc.d"
  chmod 0755 "$mnt/usr/sbin/policy-rc.d"; policy_new=1
fi
opts="-o Dir::Etc::SourceList=/run/pibake-bake/sources.list -o Dir::Etc::SourceParts=/nonexistent"
opts="$opts -o Dir::State::Lists=/run/pibake-bake/lists -o Dpkg::Use-Pty=0"
status=0
chroot "$mnt" apt-get -q $opts update || status=$?
[ $status = 0 ] && { chroot "$mnt" apt-get -q -y $opts -o Dpkg::Options::=--force-confold install "$@" || status=$?; }
chroot "$mnt" apt-get -q $opts clean || :
rm -f "$mnt/var/cache/apt/pkgcache.bin" "$mnt/var/cache/apt/srcpkgcache.bin"
[ -n "$policy_new" ] && rm -f "$mnt/usr/sbin/policy-rc.d"
if [ -s "$work/resolv.conf" ]; then
  rm -f "$mnt/etc/resolv.conf"
  if [ -e "$work/resolv.conf.image" ] || [ -L "$work/resolv.conf.image" ]; then mv "$work/resolv.conf.image" "$mnt/etc/resolv.conf"; fi
fi
if [ $status = 0 ]; then
  rm -f "$mnt/etc/munge/munge.key"
  for unit in $AGENT_STARTED_UNITS; do rm -f "$mnt/etc/systemd/system/multi-user.target.wants/$unit"; done
  install -d -m 0700 "$mnt/etc/pibake"
  install -m 0644 "$work/marker.json" "$mnt/etc/pibake/baked.json"
fi
umount -R "$mnt"
exit $status
"""

# $1 root partition device, $2 mount point: prints the image's arch, codename and apt sources (read only)
_INSPECT_SCRIPT = r"""
mount -o ro "$1" "$2"
printf '%s\n' "--- arch"; head -n1 "$2/var/lib/dpkg/arch" 2>/dev/null || :
printf '%s\n' "--- os-release"; cat "$2/etc/os-release" 2>/dev/null || cat "$2/usr/lib/os-release" 2>/dev/null || :
for f in "$2"/etc/apt/sources.list "$2"/etc/apt/sources.list.d/*.list "$2"/etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && { printf '%s\n' "--- source $(basename "$f")"; cat "$f"; printf '\n'; }
done
umount "$2"
"""


def in_private_namespaces(argv):
    """``argv`` in its own mount, UTS, IPC and PID namespaces: its mounts and processes end with it."""
    return [which("unshare") or "unshare", "--mount", "--propagation", "private", "--uts", "--ipc", "--pid",
            "--fork", "--kill-child", "--", *argv]


def inspect_root(device, mountpoint):
    """{"arch", "codename", "sources": {name: text}} of the root file system on ``device`` (mounted read-only
    in a private mount namespace)."""
    out = run(in_private_namespaces(["sh", "-eu", "-c", _INSPECT_SCRIPT, "pibake-inspect", device, mountpoint]),
              timeout=120).stdout
    sections, current = {}, None
    for line in out.splitlines(keepends=True):
        if line.startswith("--- "):
            current = line[4:].strip()
            sections[current] = ""
        elif current:
            sections[current] += line
    sources = {k.split(" ", 1)[1]: v for k, v in sections.items() if k.startswith("source ")}
    return {"arch": image_arch(sections.get("arch")), "codename": os_codename(sections.get("os-release", "")),
            "sources": sources}


# ----------------------------------------------------------------------------- the bake


def _apt_failure(exc):
    text = ((exc.stdout or "") + (exc.stderr or "")).strip().splitlines()
    errors = [line for line in text if line.startswith(("E:", "W:", "dpkg: error"))] or text[-3:]
    return "; ".join(line.strip() for line in errors[-3:]) or str(exc)


def _require_tools():
    if os.geteuid() != 0:
        raise BakeError("baking an image needs root (loop devices, mounts, binfmt_misc)")
    needs = {"losetup": "mount", "partx": "util-linux", "unshare": "util-linux", "chroot": "coreutils",
             "mcopy": "mtools"}
    missing = sorted({pkg for tool, pkg in needs.items() if not which(tool)})
    if missing:
        raise BakeError(f"baking an image needs: apt-get install {' '.join(missing)}")


def cached_bake(path):
    """The stamp of a finished bake at ``path``, or None."""
    try:
        stamp = json.loads(Path(str(path) + STAMP_SUFFIX).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("name") == Path(path).name and Path(path).exists() else None


def bake_raw_image(raw_path, *, image_sha256, source_name, role, packages, cache_dir=None, mirror=None,
                   offline=False, progress=None):
    """Bake ``packages`` for ``role`` into a copy of the raw image ``raw_path``; a ``BakedImage``.

    ``mirror``: the Debian mirror apt may fetch from (default: this machine's configured one); ``offline``:
    only the image's own ``file:`` repositories. The result is cached per (image sha256, role, packages).
    """
    note = progress or (lambda message: None)
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    packages = tuple(packages)
    key = bake_key(image_sha256, role, packages)
    final = cache / baked_name(source_name, role, key)
    stamp = cached_bake(final)
    if stamp:
        note(f"cache hit: {final}")
        return BakedImage(final, stamp, cached=True)
    _require_tools()
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{final.name}.lock"):
        stamp = cached_bake(final)
        if stamp:
            return BakedImage(final, stamp, cached=True)
        started = time.monotonic()
        work = Path(cache / f".{final.name}.work-{os.getpid()}")
        partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
        try:
            stamp = _bake(raw_path, partial, work, role=role, packages=packages, image_sha256=image_sha256,
                          mirror=mirror, offline=offline, note=note)
            stamp.update(name=final.name, key=key, source=str(source_name), role=role,
                         seconds=round(time.monotonic() - started, 1),
                         baked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            boot = bootpart.find_boot_partition(partial)
            bootpart.put_files(boot, {BOOT_MARKER: (json.dumps(marker(role, packages, image_sha256),
                                                               indent=2) + "\n").encode()})
            os.replace(partial, final)
            _write_stamp(final, stamp)
        finally:
            partial.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        note(f"baked {role} image in {stamp['seconds']} s: {final}")
        LOG.info("baked %s into %s in %.1f s", " ".join(packages), final, stamp["seconds"])
        return BakedImage(final, stamp)


def _write_stamp(path, stamp):
    target = Path(str(path) + STAMP_SUFFIX)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, target)


def _bake(raw_path, partial, work, *, role, packages, image_sha256, mirror, offline, note):
    _, _, number = root_partition(raw_path)  # not a Pi image: said before anything is copied
    note(f"copying {raw_path}")
    run(["cp", "--sparse=always", raw_path, partial], timeout=1800)
    work.mkdir(mode=0o700)
    mountpoint = work / "root"
    mountpoint.mkdir()
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    with LoopDevice(partial) as loop:
        device = loop.partition(number)
        facts = inspect_root(device, mountpoint)
        arch = facts["arch"]
        if not arch:
            raise BakeError(f"{raw_path}: partition {number} holds no Debian-style root (no /var/lib/dpkg/arch)")
        ensure_emulation(arch)
        if not offline:
            if not keyring.exists():
                raise BakeError(f"{keyring} is missing: apt-get install debian-archive-keyring")
            if not facts["codename"]:
                raise BakeError(f"{raw_path}: no VERSION_CODENAME in the image's os-release; bake it --offline")
            if not mirror:
                raise BakeError("say which Debian mirror apt may fetch from, or bake --offline")
        local = local_sources(facts["sources"])
        if offline and not local:
            raise BakeError(f"{raw_path}: --offline needs a local (file:) apt repository in the image; it has none")
        (work / "sources.list").write_text(private_sources(local, None if offline else mirror, facts["codename"],
                                                           "/run/pibake-bake/keyring.gpg"))
        if keyring.exists():
            shutil.copyfile(keyring, work / "keyring.gpg")
        else:
            (work / "keyring.gpg").write_bytes(b"")  # offline: the image's local repositories only
        if not offline:
            shutil.copyfile("/etc/resolv.conf", work / "resolv.conf")  # the mirror's name, while apt fetches
        (work / "marker.json").write_text(json.dumps(marker(role, packages, image_sha256), indent=2) + "\n")
        note(f"apt-get install in the {arch} image ({'offline' if offline else mirror}): {' '.join(packages)}")
        t0 = time.monotonic()
        env = {**os.environ, "AGENT_STARTED_UNITS": " ".join(AGENT_STARTED_UNITS)}
        try:
            proc = run(in_private_namespaces(["sh", "-u", "-c", _BAKE_SCRIPT, "pibake-bake", device, mountpoint, work,
                                 *packages]), timeout=APT_TIMEOUT, env=env)
        except CommandError as exc:
            raise BakeError(f"apt-get install {' '.join(packages)} in the image failed: {_apt_failure(exc)}") from exc
        fetched = apt_fetch_summary(proc.stdout)
        return {"arch": arch, "codename": facts["codename"], "mirror": None if offline else mirror,
                "marker": marker(role, packages, image_sha256), "apt": fetched,
                "apt_seconds": round(time.monotonic() - t0, 1), "size_bytes": partial.stat().st_size}


def read_marker(image):
    """The bake marker on an image's (or card's) boot partition, or None for a plain image."""
    try:
        part = bootpart.find_boot_partition(image)
        return parse_marker(bootpart.read_files(part, [BOOT_MARKER]).get(BOOT_MARKER))
    except PibakeError:
        return None


def baked_packages(marker_value, role):
    """The packages a baked image already holds for ``role`` (empty for a plain image or another role)."""
    if not marker_value or marker_value.get("role") != role:
        return ()
    return tuple(marker_value.get("packages") or ())
