"""The synthetic Raspberry-Pi-like image: real sfdisk, mkfs.vfat, mke2fs, mtools, fsck."""

import json
import os

import pytest

from pibake.bake.synthetic import build_pi_image, parse_size
from pibake.errors import PibakeError
from pibake.run import run
from tests.conftest import needs_program

pytestmark = needs_program("sfdisk", "mkfs.vfat", "mke2fs", "mcopy", "mtype", "fsck.vfat", "e2fsck")


def _fat_copy(layout, dest):
    with open(layout.path, "rb") as src, open(dest, "wb") as out:
        src.seek(layout.boot_offset)
        out.write(src.read(layout.boot_size))
    return dest


def _mtype(layout, name):
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    return run(["mtype", "-i", f"{layout.path}@@{layout.boot_offset}", f"::/{name}"], env=env).stdout


@pytest.mark.parametrize("family,labels", [("raspios", ("bootfs", "rootfs")), ("ubuntu", ("system-boot", "writable"))])
def test_build_pi_image_is_a_real_two_partition_disk(tmp_path, family, labels):
    layout = build_pi_image(tmp_path / "pi.img", size="96M", boot_size="40M", family=family,
                            disk_id="0badcafe", kernel_size=256 * 1024)
    assert layout.path.stat().st_size == 96 * 1024 * 1024
    table = json.loads(run(["sfdisk", "-J", layout.path]).stdout)["partitiontable"]
    assert table["label"] == "dos" and table["id"] == "0x0badcafe"
    boot, root = table["partitions"]
    assert (boot["start"], boot["type"]) == (8192, "c")
    assert (root["start"], root["type"]) == (layout.root_start_sector, "83")
    assert root["start"] >= boot["start"] + boot["size"]

    # Both filesystems check clean with the real checkers.
    run(["fsck.vfat", "-n", _fat_copy(layout, tmp_path / "boot.fat")])
    run(["e2fsck", "-fn", f"{layout.path}?offset={layout.root_offset}"])
    blk = run(["blkid", "-p", "-O", str(layout.boot_offset), "-o", "export", layout.path]).stdout
    assert f"LABEL={labels[0]}" in blk and "TYPE=vfat" in blk
    blk = run(["blkid", "-p", "-O", str(layout.root_offset), "-o", "export", layout.path]).stdout
    assert f"LABEL={labels[1]}" in blk and "TYPE=ext4" in blk

    cmdline = _mtype(layout, "cmdline.txt")
    assert cmdline.count("\n") == 1 and cmdline.endswith("\n")
    assert "rootwait" in cmdline and "console=tty1" in cmdline
    if family == "raspios":
        assert "root=PARTUUID=0badcafe-02" in cmdline
        assert "kernel8.img" in layout.boot_files
    else:
        assert "root=LABEL=writable" in cmdline
        assert "#cloud-config" in _mtype(layout, "user-data")
    assert _mtype(layout, "config.txt").startswith(layout.boot_files["config.txt"].decode()[:20])


def test_custom_rootfs_boot_files_and_stale_token(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "marker").write_text("from the test\n")
    layout = build_pi_image(tmp_path / "pi.img", rootfs_dir=root, size="80M", boot_size="40M",
                            boot_files={"extra/note.txt": "hello\n", "initramfs8": None},
                            cmdline_extra="ds=nocloud;i=stale-1", kernel_size=128 * 1024)
    assert "initramfs8" not in layout.boot_files
    assert _mtype(layout, "extra/note.txt") == "hello\n"
    assert _mtype(layout, "cmdline.txt").rstrip("\n").endswith("ds=nocloud;i=stale-1")
    out = run(["debugfs", "-R", "cat /etc/marker", f"{layout.path}?offset={layout.root_offset}"]).stdout
    assert out == "from the test\n"


@pytest.mark.parametrize("kwargs,message", [
    ({"boot_size": "8M"}, "too small for FAT32"),
    ({"size": "40M", "boot_size": "40M"}, "no room for a root partition"),
    ({"family": "arch"}, "unknown image family"),
    ({"disk_id": "xyz"}, "8 hex digits"),
])
def test_bad_layouts_are_refused(tmp_path, kwargs, message):
    with pytest.raises(PibakeError, match=message):
        build_pi_image(tmp_path / "pi.img", **kwargs)
    assert not (tmp_path / "pi.img").exists()


def test_parse_size():
    assert parse_size("128M") == 128 * 1024 * 1024
    assert parse_size("2G") == 2 * 1024 ** 3
    assert parse_size("512k") == 512 * 1024
    assert parse_size(4096) == 4096
    assert parse_size("1.5G") == int(1.5 * 1024 ** 3)
    with pytest.raises(PibakeError, match="cannot read size"):
        parse_size("lots")
