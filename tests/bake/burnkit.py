"""Helpers shared by the burn tests: loop devices, filesystem checks (the cluster: ``make_cluster``)."""

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

from pibake.bake import bootpart
from pibake.run import run


@contextlib.contextmanager
def loop_device(backing):
    """Attach ``backing`` to a free loop device; always detached afterwards."""
    dev = run(["losetup", "--find", "--show", backing]).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def region(path, offset, size):
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def region_sha256(path, offset, size):
    return hashlib.sha256(region(path, offset, size)).hexdigest()


def check_filesystems(path, tmp_dir):
    """fsck.vfat -n on the boot partition and e2fsck -fn on the root partition of an image (or device)."""
    parts = bootpart.partitions(path)
    boot = next(p for p in parts if p["fat"])
    root = next(p for p in parts if p["type"] == "0x83")
    fat = Path(tmp_dir) / f"boot-{os.getpid()}-{abs(hash(str(path)))}.fat"
    fat.write_bytes(region(path, boot["offset"], boot["size"]))
    try:
        run(["fsck.vfat", "-n", fat])
    finally:
        fat.unlink()
    run(["e2fsck", "-fn", f"{path}?offset={root['offset']}"])
    return boot, root


def random_file(path, size, seed=1):
    """A target 'card' full of random bytes (so a sparse write cannot pass by accident)."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 1 << 20)
            fh.write(rnd.randbytes(n))
            left -= n
    return Path(path)
