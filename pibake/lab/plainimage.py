"""A plain target image for a role: its packages are not installed, so first boot installs them with apt.

The target image (``pibake.lab.target``) comes with every role's packages pre-installed, because the emulated
Pi has no internet. To measure what a golden image (``pibake image bake``) saves, the comparison needs an
image shaped like a real Raspberry Pi OS Lite card: the role's packages absent, first boot's ``apt-get
install`` doing the work. This module makes one from a copy of the target image: the role's packages are
purged (with what only they needed), and the ``.deb`` files a first-boot install of them needs are put into
the image's own local apt repository (fetched from the configured Debian mirror here, once), which is the
only apt source the emulated Pi has. Cached next to the baked images, by the target image's name and the
package set. Bench and test helper: nothing here runs on a user's image.

    plain = plain_role_image(target_image.path, ("slurmd", "munge"), mirror=debian_mirror(), progress=print)
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from pibake.bake.golden import CHROOT_MOUNTS, DEFAULT_CACHE_DIR, LoopDevice, cached_bake, in_private_namespaces, root_partition
from pibake.errors import CommandError, PibakeError
from pibake.locks import file_lock
from pibake.run import run, which

PLAIN_VERSION = 1

# $1 root partition device  $2 mount point  $3 work dir (sources.list, keyring.gpg, resolv.conf)
# $4 local repository dir inside the root  $5.. packages
_PLAIN_SCRIPT = r"""
dev=$1 mnt=$2 work=$3 repo=$4
shift 4
""" + CHROOT_MOUNTS + r"""mkdir -p "$mnt/run/plain/lists/partial"
cp "$work/sources.list" "$work/keyring.gpg" "$mnt/run/plain/"
printf '#!/bin/sh\nexit 101\n' > "$mnt/usr/sbin/policy-rc.d"; chmod 0755 "$mnt/usr/sbin/policy-rc.d"
chroot "$mnt" apt-get -q -y -o Dpkg::Use-Pty=0 purge --autoremove "$@"
# what a first-boot `apt-get install` of them needs now (the image's own apt settings), from the mirror
mv "$mnt/etc/resolv.conf" "$work/resolv.image"; cp "$work/resolv.conf" "$mnt/etc/resolv.conf"
opts="-o Dir::Etc::SourceList=/run/plain/sources.list -o Dir::Etc::SourceParts=/nonexistent"
opts="$opts -o Dir::State::Lists=/run/plain/lists"
chroot "$mnt" apt-get -q $opts update
names=$(chroot "$mnt" apt-get -q -s $opts install "$@" | awk '/^Inst /{printf "%s ", $2}')
chroot "$mnt" sh -c "cd /$repo && apt-get -q $opts download $names"
rm -f "$mnt/etc/resolv.conf"; mv "$work/resolv.image" "$mnt/etc/resolv.conf"
rm -f "$mnt/usr/sbin/policy-rc.d"
chroot "$mnt" apt-get clean
(cd "$mnt/$repo" && dpkg-scanpackages --multiversion . > Packages 2>/dev/null)
echo "plain: removed and put into the local repository: $names"
umount -R "$mnt"
"""


def plain_role_image(target_path, packages, *, mirror, repo_dir, cache_dir=None, progress=None):
    """Path of a copy of ``target_path`` without ``packages`` installed and with the debs their first-boot
    install needs in its local repository ``repo_dir`` (relative to the root); cached."""
    note = progress or (lambda message: None)
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    key = hashlib.sha256(json.dumps({"image": Path(target_path).name, "packages": sorted(packages),
                                     "plain": PLAIN_VERSION}).encode()).hexdigest()[:12]
    final = cache / f"{Path(target_path).stem}-plain-{key}.img"
    if cached_bake(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{final.name}.lock"):
        if cached_bake(final):
            return final
        started = time.monotonic()
        partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
        work = cache / f".{final.name}.work-{os.getpid()}"
        try:
            note(f"plain image: copying {target_path}")
            run(["cp", "--sparse=always", target_path, partial], timeout=1800)
            work.mkdir(mode=0o700)
            (work / "root").mkdir()
            (work / "sources.list").write_text(
                f"deb [signed-by=/run/plain/keyring.gpg] {mirror} trixie main\n")
            shutil.copyfile("/usr/share/keyrings/debian-archive-keyring.gpg", work / "keyring.gpg")
            shutil.copyfile("/etc/resolv.conf", work / "resolv.conf")
            _, _, number = root_partition(partial)
            note(f"plain image: purging {' '.join(packages)} (qemu-user), their debs into the local repository")
            with LoopDevice(partial) as loop:
                device = loop.partition(number)
                proc = run(in_private_namespaces(["sh", "-eu", "-c", _PLAIN_SCRIPT, "pibake-plain", device, work / "root",
                                     work, repo_dir, *packages]), timeout=3 * 3600)
            names = proc.stdout.strip().splitlines()[-1]
            os.replace(partial, final)
            Path(str(final) + ".done").write_text(json.dumps({
                "name": final.name, "packages": list(packages), "note": names,
                "seconds": round(time.monotonic() - started, 1)}) + "\n")
        except CommandError as exc:
            raise PibakeError(f"making the plain image failed: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        note(f"plain image in {time.monotonic() - started:.0f} s: {final}")
        return final


def have_tools():
    return all(which(t) for t in ("dpkg-scanpackages", "losetup", "unshare"))
