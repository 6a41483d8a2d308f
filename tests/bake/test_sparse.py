"""Sparse writes are equivalent to full writes.

The proof, on real filesystems made by the real tools: burn a Pi-like image (FAT32 boot + ext4
root with real files, some deleted again so free blocks hold stale data) over a target full of
random bytes, skipping everything the allocation maps call free. Then both partitions must pass
``fsck.vfat -n`` and ``e2fsck -fn`` and every file must read back identical (debugfs ``rdump`` for
ext4, ``mcopy -s`` for FAT), while far fewer bytes than the image were written. The maps themselves
are checked against ``dumpe2fs`` and ``fsck.vfat -v`` on several mke2fs/mkfs.vfat variants.
"""

import filecmp
import os
import random
import re
import shutil
import subprocess

import pytest

from pibake.bake import allocation
from pibake.bake.synthetic import build_pi_image, fat_put
from pibake.bake.writer import write_image
from tests.conftest import needs_program, needs_root

pytestmark = needs_program("mkfs.vfat", "mke2fs", "e2fsck", "fsck.vfat", "debugfs", "mcopy", "sfdisk", "dumpe2fs")

MIB = 1 << 20


def sh(*argv, ok=(0,), **kw):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    assert proc.returncode in ok, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def mtools_env():
    return dict(os.environ, MTOOLS_SKIP_CHECK="1")


def make_rootfs(root):
    """A tree with the shapes a root filesystem has: many small files, a few big ones, a file with a hole,
    symlinks, empty files, nested directories."""
    rnd = random.Random(1234)
    for d in range(6):
        sub = root / f"usr/lib/pkg{d}"
        sub.mkdir(parents=True)
        for f in range(40):
            (sub / f"f{f}.so").write_bytes(rnd.randbytes(rnd.randint(0, 20000)))
    (root / "usr/share/big.bin").parent.mkdir(parents=True)
    (root / "usr/share/big.bin").write_bytes(rnd.randbytes(3 * MIB + 123))
    with open(root / "var-sparse.bin", "wb") as f:  # zeros inside a file: a hole, then data
        f.write(rnd.randbytes(5000))
        f.seek(2 * MIB)
        f.write(rnd.randbytes(7000))
    (root / "etc").mkdir()
    (root / "etc/zeros.conf").write_bytes(bytes(50000))  # data that is all zeros is still data
    (root / "etc/empty").write_bytes(b"")
    os.symlink("usr/share/big.bin", root / "link-to-big")
    os.symlink("x" * 200, root / "long-symlink")
    (root / "doomed").mkdir()
    for i in range(20):
        (root / f"doomed/old{i}.bin").write_bytes(rnd.randbytes(60000))


@pytest.fixture(scope="module")
def pi_image(tmp_path_factory):
    """A Pi-like image whose free blocks are NOT zero: files were written, then deleted."""
    tmp = tmp_path_factory.mktemp("sparse")
    root = tmp / "rootfs"
    root.mkdir()
    make_rootfs(root)
    img = tmp / "pi.img"
    layout = build_pi_image(img, rootfs_dir=root, size="160M", boot_size="40M")
    rnd = random.Random(99)
    fat_put(img, layout.boot_offset, {f"firmware/blob{i}.bin": rnd.randbytes(rnd.randint(1, 90000)) for i in range(30)})
    fat_put(img, layout.boot_offset, {f"trash/t{i}.bin": rnd.randbytes(70000) for i in range(10)})
    # delete files again: their blocks/clusters keep their bytes in the image but are free
    for i in range(10):
        sh("mdel", "-i", f"{img}@@{layout.boot_offset}", f"::/trash/t{i}.bin", env=mtools_env())
    root_part = tmp / "root.ext4"
    _extract(img, layout.root_offset, layout.root_size, root_part)
    for i in range(20):
        sh("debugfs", "-w", "-R", f"rm /doomed/old{i}.bin", root_part)
    with open(img, "r+b") as f:
        f.seek(layout.root_offset)
        f.write(root_part.read_bytes())
    sh("e2fsck", "-fn", root_part)
    return img, layout


def _extract(img, offset, size, dest):
    with open(img, "rb") as src, open(dest, "wb") as out:
        src.seek(offset)
        out.write(src.read(size))
    return dest


def random_file(path, size, seed=7):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(rnd.randbytes(n))
            left -= n


def assert_equivalent(image, target, layout, tmp):
    """fsck clean on both partitions of ``target`` and every file identical to ``image``'s."""
    for name, path in (("image", image), ("target", target)):
        boot = _extract(path, layout.boot_offset, layout.boot_size, tmp / f"{name}-boot.fat")
        root = _extract(path, layout.root_offset, layout.root_size, tmp / f"{name}-root.ext4")
        sh("fsck.vfat", "-n", boot)
        sh("e2fsck", "-fn", root)
        out = tmp / f"{name}-files"
        (out / "boot").mkdir(parents=True)
        (out / "root").mkdir()
        sh("mcopy", "-s", "-n", "-i", boot, "::/", out / "boot", env=mtools_env())
        sh("debugfs", "-R", f"rdump / {out / 'root'}", root)
    assert_same_tree(tmp / "image-files", tmp / "target-files")


def assert_same_tree(a, b):
    names_a = sorted(p.relative_to(a) for p in a.rglob("*"))
    names_b = sorted(p.relative_to(b) for p in b.rglob("*"))
    assert names_a == names_b
    files = 0
    for rel in names_a:
        pa, pb = a / rel, b / rel
        if pa.is_symlink():
            assert os.readlink(pa) == os.readlink(pb), rel
        elif pa.is_file():
            assert filecmp.cmp(pa, pb, shallow=False), rel
            files += 1
    assert files > 100  # the trees really hold the files


def test_sparse_burn_over_random_bytes_is_equivalent(pi_image, tmp_path):
    image, layout = pi_image
    target = tmp_path / "card.bin"
    random_file(target, layout.size)
    result = write_image(image, target, keep_unwritten=True)  # skipped ranges keep their random bytes, as on a card
    assert result.mode == "sparse" and result.verified
    assert result.bytes_written < layout.size / 4, result.bytes_written
    assert result.bytes_written + result.bytes_skipped == layout.size
    assert {f["fstype"] for f in result.filesystems} == {"vfat", "ext4"}
    assert_equivalent(image, target, layout, tmp_path)
    # the target is not byte-identical (free blocks hold random bytes) but every written range is
    src, dst = open(image, "rb"), open(target, "rb")
    for offset, length in result.ranges[:50]:
        src.seek(offset), dst.seek(offset)
        assert src.read(length) == dst.read(length)
    src.close(), dst.close()


def test_stale_data_in_free_blocks_is_skipped_not_copied(pi_image, tmp_path):
    """Deleted files' bytes sit in free blocks of the image; a sparse burn does not carry them over."""
    image, layout = pi_image
    amap = allocation.image_allocation_map(image)
    data = allocation.data_ranges(os.open(image, os.O_RDONLY), layout.size)
    stale = allocation.intersect(data, amap.free)
    assert allocation.total(stale) > 500_000  # the fixture really has non-zero free space
    target = tmp_path / "out.img"
    result = write_image(image, target)
    written = allocation.normalise((a, a + n) for a, n in result.ranges)
    assert allocation.total(allocation.intersect(written, stale)) < allocation.total(stale) / 10


def test_file_target_leaves_no_old_bytes(pi_image, tmp_path):
    """An existing output file is replaced: skipped ranges become holes, not what the old file held."""
    image, layout = pi_image
    target = tmp_path / "red01.img"
    random_file(target, layout.size * 2, seed=3)
    result = write_image(image, target)
    assert target.stat().st_size == layout.size
    assert target.stat().st_blocks * 512 < layout.size / 3  # holes, not written zeros
    fd = os.open(target, os.O_RDONLY)
    try:
        data = allocation.data_ranges(fd, layout.size)
    finally:
        os.close(fd)
    written = allocation.normalise((a, a + n) for a, n in result.ranges)
    assert allocation.subtract(data, written) == []  # nothing outside the written ranges holds data
    assert_equivalent(image, target, layout, tmp_path)


@needs_root("losetup needs root")
@needs_program("losetup")
def test_sparse_burn_to_a_loop_device(pi_image, tmp_path):
    image, layout = pi_image
    backing = tmp_path / "loop-backing.bin"
    random_file(backing, layout.size + 8 * MIB, seed=11)
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup does not work here: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        fd = os.open(loop, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        try:
            result = write_image(image, fd)
        finally:
            os.close(fd)
        assert result.target_kind == "block" and result.verified
        assert result.direct_io and result.verify_method == "direct"
        assert result.bytes_written < layout.size / 4
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert_equivalent(image, backing, layout, tmp_path)


# ---------------------------------------------------------------- the maps against the real tools


def dumpe2fs_used(fs_image):
    out = sh("dumpe2fs", fs_image).stdout
    bs = int(re.search(r"Block size:\s+(\d+)", out).group(1))
    count = int(re.search(r"Block count:\s+(\d+)", out).group(1))
    free = []
    for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            a, _, b = part.partition("-")
            free.append((int(a) * bs, (int(b or a) + 1) * bs))
    return allocation.invert(free, 0, count * bs)


EXT_VARIANTS = {
    "ext4-default": ["-t", "ext4"],
    "ext4-1k-blocks-many-groups": ["-t", "ext4", "-b", "1024"],
    "ext4-64bit-no-flex_bg": ["-t", "ext4", "-O", "64bit,^flex_bg"],
    "ext4-no-csum-no-uninit": ["-t", "ext4", "-O", "^metadata_csum,^uninit_bg,^flex_bg"],
    "ext4-meta_bg": ["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"],
    "ext4-sparse_super2": ["-t", "ext4", "-O", "sparse_super2"],
    "ext3": ["-t", "ext3"],
    "ext2-no-sparse-super": ["-t", "ext2", "-O", "^sparse_super,^resize_inode"],
}


@pytest.mark.parametrize("variant", sorted(EXT_VARIANTS))
def test_ext_map_matches_dumpe2fs_and_survives_random_target(variant, tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    rnd = random.Random(variant)
    for i in range(30):
        (root / f"f{i}").write_bytes(rnd.randbytes(rnd.randint(0, 300_000)))
    fs = tmp_path / "fs.img"
    sh("truncate", "-s", "96M", fs)
    sh("mke2fs", "-q", "-F", *EXT_VARIANTS[variant], "-d", root, fs)
    fd = os.open(fs, os.O_RDONLY)
    try:
        fstype, used = allocation.ext_used_ranges(allocation.Reader(fd, fs.stat().st_size), 0, fs.stat().st_size)
    finally:
        os.close(fd)
    assert fstype == variant.split("-")[0]
    assert used == dumpe2fs_used(fs)
    # no partition table: the filesystem covers the whole image ("superfloppy")
    target = tmp_path / "target.bin"
    random_file(target, fs.stat().st_size, seed=5)
    result = write_image(fs, target, keep_unwritten=True)
    assert result.bytes_written < fs.stat().st_size / 2
    sh("e2fsck", "-fn", target)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    out_a.mkdir(), out_b.mkdir()
    sh("debugfs", "-R", f"rdump / {out_a}", fs)
    sh("debugfs", "-R", f"rdump / {out_b}", target)
    for i in range(30):
        assert filecmp.cmp(out_a / f"f{i}", out_b / f"f{i}", shallow=False)


@pytest.mark.parametrize("fat", ["12", "16", "32"])
def test_fat_map_matches_fsck_cluster_count(fat, tmp_path):
    fs = tmp_path / "fat.img"
    size_kib = {"12": 4096, "16": 32768, "32": 40960}[fat]
    sh("mkfs.vfat", "-C", "-F", fat, "-s", "4" if fat == "12" else "1", fs, size_kib)
    rnd = random.Random(fat)
    env = mtools_env()
    sh("mmd", "-i", fs, "::/d", env=env)
    for i in range(12):
        blob = tmp_path / f"b{i}"
        blob.write_bytes(rnd.randbytes(rnd.randint(1, 200_000 if fat != "12" else 100_000)))
        sh("mcopy", "-i", fs, blob, f"::/d/b{i}", env=env)
    sh("mdel", "-i", fs, "::/d/b3", env=env)
    reader = allocation.Reader(os.open(fs, os.O_RDONLY), fs.stat().st_size)
    try:
        fstype, used = allocation.fat_used_ranges(reader, 0, fs.stat().st_size)
        bps, spc, _r, _f, data_start, _s, _c, kind = allocation._fat_params(reader.read(0, 512))
    finally:
        os.close(reader.fd)
    assert kind == int(fat)
    out = sh("fsck.vfat", "-n", "-v", fs).stdout
    used_clusters = int(re.search(r"(\d+)/\d+ clusters", out).group(1))
    assert (allocation.total(used) - data_start * bps) // (spc * bps) == used_clusters
    target = tmp_path / "target.bin"
    random_file(target, fs.stat().st_size, seed=int(fat))
    write_image(fs, target, keep_unwritten=True)
    sh("fsck.vfat", "-n", target)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sh("mcopy", "-s", "-n", "-i", fs, "::/", a, env=env)
    sh("mcopy", "-s", "-n", "-i", target, "::/", b, env=env)
    for p in sorted(a.rglob("*")):
        if p.is_file():
            assert filecmp.cmp(p, b / p.relative_to(a), shallow=False)


def test_unknown_filesystem_is_written_whole(tmp_path):
    img = tmp_path / "odd.img"
    sh("truncate", "-s", "24M", img)
    sh("sfdisk", "--no-reread", "--no-tell-kernel", "-q", img,
       input="label: dos\nunit: sectors\n\nstart=2048, size=20480, type=82\nstart=22528, type=83\n")
    with open(img, "r+b") as f:  # swap-ish bytes in partition 1, nothing recognisable in 2
        f.seek(2048 * 512)
        f.write(random.Random(1).randbytes(1 * MIB))
    amap = allocation.image_allocation_map(img)
    assert [m.fstype for m in amap.filesystems] == [None, None]
    assert amap.free == []
    assert any("unknown filesystem" in n for n in amap.notes)
    target = tmp_path / "t.bin"
    random_file(target, img.stat().st_size)
    result = write_image(img, target, keep_unwritten=True)
    assert result.bytes_written == img.stat().st_size  # a card gets every byte, zeros included
    assert target.read_bytes() == img.read_bytes()


def test_gpt_partitions_are_read(tmp_path):
    img = tmp_path / "gpt.img"
    sh("truncate", "-s", "64M", img)
    sh("sfdisk", "--no-reread", "--no-tell-kernel", "-q", img,
       input="label: gpt\nunit: sectors\n\nstart=2048, size=81920, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
             "start=83968, size=40960, type=0FC63DAF-8483-4772-8E79-3D69C47D8E4F\n")
    sh("mkfs.vfat", "-F", "32", "-s", "1", "--offset", "2048", img, str(81920 // 2))
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={83968 * 512}", img, "20M")
    amap = allocation.image_allocation_map(img)
    assert amap.scheme == "gpt"
    assert [m.fstype for m in amap.filesystems] == ["vfat", "ext4"]
    target = tmp_path / "t.bin"
    random_file(target, img.stat().st_size)
    result = write_image(img, target, keep_unwritten=True)
    assert result.bytes_written < img.stat().st_size / 3
    sh("sfdisk", "--verify", target)  # primary and backup GPT (outside partitions) are written
    sh("fsck.vfat", "-n", _extract(target, 2048 * 512, 81920 * 512, tmp_path / "b.fat"))
    sh("e2fsck", "-fn", _extract(target, 83968 * 512, 20 * MIB, tmp_path / "r.ext4"))


def test_logical_partitions_in_an_extended_partition(tmp_path):
    img = tmp_path / "ext.img"
    sh("truncate", "-s", "48M", img)
    sh("sfdisk", "--no-reread", "--no-tell-kernel", "-q", img,
       input="label: dos\nunit: sectors\n\nstart=2048, size=20480, type=83\nstart=22528, type=5\n"
             "start=24576, size=20480, type=83\nstart=47104, type=83\n")
    scheme, parts = allocation.read_partition_table(
        allocation.Reader(os.open(img, os.O_RDONLY), img.stat().st_size), img.stat().st_size)
    assert scheme == "mbr"
    assert [(p.number, p.start // 512, p.size // 512) for p in parts] == [
        (1, 2048, 20480), (5, 24576, 20480), (6, 47104, 98304 - 47104)]


def test_bmap_parsing_matches_bmaptool(pi_image, tmp_path):
    if not shutil.which("bmaptool"):
        pytest.skip("not installed: bmaptool (Debian bmap-tools)")
    image, layout = pi_image
    bmap_file = tmp_path / "pi.bmap"
    sh("bmaptool", "create", "-o", bmap_file, image)
    bmap = allocation.parse_bmap(bmap_file.read_text())
    assert bmap.image_size == layout.size
    fd = os.open(image, os.O_RDONLY)
    try:
        holes_map = allocation.align_outward(allocation.data_ranges(fd, layout.size), bmap.block_size, layout.size)
    finally:
        os.close(fd)
    assert bmap.mapped == holes_map
    result = write_image(image, tmp_path / "out.img", bmap=bmap_file)
    assert result.verified


@pytest.mark.parametrize("text, message", [
    ("<notbmap/>", "not a bmap"),
    ('<bmap version="9.0"><ImageSize>1</ImageSize></bmap>', "unsupported bmap version"),
    ('<bmap version="2.0"><ImageSize>8192</ImageSize><BlockSize>4096</BlockSize><BlocksCount>2</BlocksCount>'
     '<BlockMap><Range>1-5</Range></BlockMap></bmap>', "outside the image"),
    ('<bmap version="2.0"><ImageSize>8192</ImageSize><BlockSize>4096</BlockSize><BlocksCount>7</BlocksCount>'
     '<BlockMap></BlockMap></bmap>', "BlocksCount"),
    ('<!DOCTYPE x [<!ENTITY a "b">]><bmap version="2.0"/>', "DOCTYPE"),
])
def test_bad_bmap_files_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        allocation.parse_bmap(text)


def test_range_arithmetic():
    assert allocation.normalise([(5, 9), (0, 2), (2, 3), (8, 12), (20, 20)]) == [(0, 3), (5, 12)]
    assert allocation.invert([(2, 4), (6, 8)], 0, 10) == [(0, 2), (4, 6), (8, 10)]
    assert allocation.subtract([(0, 10)], [(2, 3), (5, 20)]) == [(0, 2), (3, 5)]
    assert allocation.intersect([(0, 5), (8, 12)], [(3, 9)]) == [(3, 5), (8, 9)]
    assert allocation.align_outward([(5000, 5001), (9000, 10000)], 4096, 9500) == [(4096, 9500)]
    assert allocation.merge_gaps([(0, 10), (15, 20), (100, 110)], 6) == [(0, 20), (100, 110)]
    assert allocation._bits_to_ranges(bytes([0b00000110, 0xFF, 0x01, 0x00, 0x80]), 40) == [(1, 3), (8, 17), (39, 40)]
    assert allocation._bits_to_ranges(bytes([0xFF, 0xFF]), 12) == [(0, 12)]


def test_on_a_card_a_bmap_cannot_overrule_the_filesystem_maps(pi_image, tmp_path):
    """A bmap is the image producer's claim; inside a known filesystem only its own map proves a block free.
    Outside filesystems (the gap before the first partition) an unmapped range may be skipped."""
    image, layout = pi_image
    blocks = layout.size // 4096
    lying = tmp_path / "lying.bmap"
    lying.write_text(f'<bmap version="2.0"><ImageSize>{layout.size}</ImageSize><BlockSize>4096</BlockSize>'
                     f'<BlocksCount>{blocks}</BlocksCount><BlockMap><Range>0</Range></BlockMap></bmap>')
    amap = allocation.image_allocation_map(image)
    used_by_fs = [r for m in amap.filesystems for r in m.used]
    target = tmp_path / "card.bin"
    random_file(target, layout.size)
    result = write_image(image, target, keep_unwritten=True, bmap=lying)
    written = allocation.normalise((a, a + n) for a, n in result.ranges)
    assert allocation.subtract(used_by_fs, written) == []  # every used filesystem block was written
    assert allocation.intersect(written, [(64 * 1024, layout.boot_offset)]) == []  # the unmapped gap was not
    assert_equivalent(image, target, layout, tmp_path)


def test_bigalloc_is_not_trusted_and_written_whole(tmp_path):
    fs = tmp_path / "big.img"
    sh("truncate", "-s", "64M", fs)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-O", "bigalloc", "-C", "65536", fs)
    amap = allocation.image_allocation_map(fs)
    assert amap.free == []
    assert any("bigalloc" in n for n in amap.notes)
    target = tmp_path / "t.bin"
    random_file(target, fs.stat().st_size)
    result = write_image(fs, target, keep_unwritten=True)
    assert result.bytes_written == fs.stat().st_size
    assert any("bigalloc" in n for n in result.notes)


def _as_set(ranges):
    return {i for a, b in ranges for i in range(a, b)}


try:
    from hypothesis import given, strategies as st
except ImportError:  # hypothesis is a test extra
    given = None

if given is not None:
    span = st.tuples(st.integers(0, 200), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1]))
    spans = st.lists(span, max_size=12)

    @given(spans, spans, st.integers(1, 64), st.integers(0, 40))
    def test_range_arithmetic_matches_sets(a, b, alignment, gap):
        sa, sb = _as_set(a), _as_set(b)
        norm = allocation.normalise(a)
        assert _as_set(norm) == sa
        assert all(x[1] < y[0] for x, y in zip(norm, norm[1:]))  # sorted, disjoint, not touching
        assert _as_set(allocation.invert(a, 0, 300)) == set(range(300)) - sa
        assert _as_set(allocation.subtract(a, b)) == sa - sb
        assert _as_set(allocation.intersect(a, b)) == sa & sb
        grown = allocation.align_outward(a, alignment, 10_000)
        assert _as_set(grown) >= sa
        assert all(x % alignment == 0 and (y % alignment == 0 or y == 10_000) for x, y in grown)
        assert _as_set(allocation.merge_gaps(a, gap)) >= sa
