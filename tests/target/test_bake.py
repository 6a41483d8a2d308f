"""`pibake image bake` on the arm64 target image (issue 15, golden images): apt runs inside the image under
qemu-user, the result is cached per (image sha256, role, package set), and a failing apt leaves nothing behind
(no loop device, no mount, no partial file). The worker boot of a baked image is in test_boot.py.

docs/commands.md's cmd-image-bake block is this path (the bake of a catalog image downloads it first; here
the target image stands in for it, and the burn of a baked image is test_boot.py's worker card).

Slow-ish (apt under emulation, ~10-30 s per bake here) and needs the target image: marked like the boots."""

import json
import subprocess

import pytest

from tests.conftest import needs_program, needs_root

pytestmark = [
    pytest.mark.target,
    needs_root("baking an image needs root (loop devices, mounts, binfmt_misc)"),
    needs_program("qemu-system-aarch64", "mmdebstrap", "arch-test", "losetup", "partx", "mcopy"),
]


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    from pibake.cluster import init_cluster

    tmp = tmp_path_factory.mktemp("bake-cluster")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp / "key"], check=True)
    init_cluster(tmp / "cluster", manager="red00", manager_ip="10.77.94.10", network="10.77.94.0/24",
                 ssh_key_files=[tmp / "key.pub"], timezone="Etc/UTC")
    return tmp / "cluster"


@pytest.fixture(scope="module")
def target_image():
    from pibake.lab.target import ensure_target_image

    return ensure_target_image(progress=lambda line: print(f"target image: {line}", flush=True))


def _leftovers(path):
    """Loop devices backed by files under ``path`` and mounts under it (what a bake must not leave)."""
    loops = [line for line in subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"],
                                             capture_output=True, text=True).stdout.splitlines()
             if str(path) in line]
    mounts = [line for line in open("/proc/self/mountinfo").read().splitlines() if str(path) in line]
    return loops, mounts


def test_a_failing_apt_leaves_no_loop_device_mount_or_partial_file(tmp_path, target_image):
    from pibake.bake.golden import BakeError, bake_raw_image

    cache = tmp_path / "baked"
    with pytest.raises(BakeError) as failed:
        bake_raw_image(target_image.path, image_sha256="0" * 64, source_name=target_image.path.name, role="worker",
                       packages=("slurmd", "pibake-no-such-package"), cache_dir=cache, offline=True)
    message = str(failed.value)
    assert "pibake-no-such-package" in message and "\n" not in message, message
    assert _leftovers(tmp_path) == ([], [])
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_bake_marks_the_image_and_a_second_bake_is_a_cache_hit(tmp_path, target_image, cluster_dir):
    from pibake.api import bake_image
    from pibake.bake.golden import read_marker
    from pibake.layout import ROLE_PACKAGES

    cache = tmp_path / "baked"
    first = bake_image(str(target_image.path), cluster_dir, "worker", cache_dir=cache, offline=True)
    assert not first.cached and first.path.parent == cache
    assert read_marker(first.path) == first.stamp["marker"]
    assert first.stamp["marker"]["packages"] == sorted(ROLE_PACKAGES["worker"])
    assert _leftovers(tmp_path) == ([], [])
    again = bake_image(str(target_image.path), cluster_dir, "worker", cache_dir=cache, offline=True)
    assert again.cached and again.path == first.path
    assert json.loads((cache / (first.path.name + ".done")).read_text())["key"] == first.stamp["key"]
    # the marker is in the root file system too, where the node reads it (debugfs: no mount needed)
    from pibake.bake.golden import root_partition

    offset, _, _ = root_partition(first.path)
    shown = subprocess.run(["debugfs", "-R", "cat /etc/pibake/baked.json", f"{first.path}?offset={offset}"],
                           capture_output=True, text=True)
    assert json.loads(shown.stdout)["role"] == "worker", shown.stderr
