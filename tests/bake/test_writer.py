"""The writer: hashes, read-back verification, progress, streams, interrupted writes, refusals."""

import errno
import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pibake.bake import allocation, writer
from pibake.bake.synthetic import build_pi_image
from pibake.bake.writer import write_image, written_ranges_sha256
from pibake.errors import VerifyError, WriteError
from pibake.errors import PibakeError
from tests.conftest import needs_program, needs_root, running_as_root

pytestmark = needs_program("mkfs.vfat", "mke2fs", "e2fsck", "fsck.vfat", "mcopy", "sfdisk")

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("writer")
    layout = build_pi_image(tmp / "pi.img", size="96M", boot_size="40M")
    return layout.path, layout


def check_partitions(target, layout, tmp):
    for name, offset, size, argv in (("boot.fat", layout.boot_offset, layout.boot_size, ["fsck.vfat", "-n"]),
                                     ("root.ext4", layout.root_offset, layout.root_size, ["e2fsck", "-fn"])):
        part = tmp / name
        with open(target, "rb") as src, open(part, "wb") as out:
            src.seek(offset)
            out.write(src.read(size))
        proc = subprocess.run(argv + [str(part)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_full_mode_makes_a_byte_identical_file_and_the_hashes_say_so(image, tmp_path):
    path, layout = image
    target = tmp_path / "full.img"
    result = write_image(path, target, sparse=False)
    assert result.mode == "full" and result.verified and result.verify_method == "direct"
    assert result.image_sha256 == sha256_file(path) == sha256_file(target)
    ranges = [tuple(r) for r in result.ranges]
    assert result.written_sha256 == written_ranges_sha256(target, ranges) == written_ranges_sha256(str(path), ranges)
    json.dumps(result.to_json())  # JSON-able as it is


def test_sparse_result_is_consistent(image, tmp_path):
    path, layout = image
    result = write_image(path, tmp_path / "sparse.img")
    assert result.mode == "sparse" and result.target_kind == "file" and result.direct_io
    assert result.image_sha256 == sha256_file(path)
    assert result.bytes_written == sum(n for _, n in result.ranges)
    assert result.bytes_written + result.bytes_skipped == result.bytes_total == layout.size
    assert result.bytes_written < layout.size / 4
    assert all(a % writer.ALIGN == 0 for a, _ in result.ranges)
    assert result.ranges[0][0] == 0  # the partition table is always written
    # the canonical written hash does not depend on how the ranges are cut
    cut = [(a, n) for a0, n0 in result.ranges for a, n in ((a0, n0 // 2), (a0 + n0 // 2, n0 - n0 // 2)) if n]
    assert written_ranges_sha256(str(path), cut) == result.written_sha256
    check_partitions(tmp_path / "sparse.img", layout, tmp_path)


def test_progress_runs_to_the_total_through_write_and_read_back(image, tmp_path):
    path, _ = image
    calls = []
    result = write_image(path, tmp_path / "p.img", progress=lambda done, total: calls.append((done, total)),
                         block_size=256 * 1024)
    assert len(calls) > 4
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert {t for _, t in calls} == {2 * result.bytes_written}
    assert calls[-1][0] == 2 * result.bytes_written
    calls.clear()
    result = write_image(path, tmp_path / "p.img", verify=False, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (result.bytes_written, result.bytes_written) and not result.verified


def test_read_back_catches_a_changed_byte_and_names_its_offset(image, tmp_path):
    path, _ = image
    target = tmp_path / "bad.img"
    plan_result = write_image(path, tmp_path / "probe.img", verify=False)
    last_offset, last_len = plan_result.ranges[-1]
    bad = last_offset + last_len - 1000  # near the end: read back after the corruption happens
    state = {}

    def corrupt_during_verify(done, total):
        if done > total // 2 and not state:
            with open(target, "r+b") as f:
                f.seek(bad)
                old = f.read(1)
                f.seek(bad)
                f.write(bytes([old[0] ^ 0xFF]))
            state["done"] = True

    with pytest.raises(VerifyError, match=rf"differs from the image at byte {bad} "):
        write_image(path, target, progress=corrupt_during_verify, block_size=64 * 1024)
    assert state


INTERRUPTED = textwrap.dedent("""
    import sys, time
    from pibake.bake.writer import write_image

    def progress(done, total):
        if done >= 4 * 1024 * 1024:
            print("midway", flush=True)
            time.sleep(600)

    write_image(sys.argv[1], sys.argv[2], sparse=False, keep_unwritten=True, block_size=1024 * 1024,
                progress=progress)
""")


def test_a_killed_write_leaves_no_partition_table_and_a_rerun_succeeds(image, tmp_path):
    path, layout = image
    target = tmp_path / "card.bin"
    older = build_pi_image(tmp_path / "older.img", size="96M", boot_size="40M", disk_id="0badcafe")
    os.replace(older.path, target)  # the "card" holds another valid image before
    reader = allocation.Reader(os.open(target, os.O_RDONLY), layout.size)
    assert allocation.read_partition_table(reader, layout.size)[0] == "mbr"
    os.close(reader.fd)

    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(path), str(target)], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "midway"
    finally:
        child.kill()
        child.wait()
    reader = allocation.Reader(os.open(target, os.O_RDONLY), layout.size)
    try:
        assert allocation.read_partition_table(reader, layout.size) == (None, [])
    finally:
        os.close(reader.fd)

    result = write_image(path, target, keep_unwritten=True)
    assert result.verified
    check_partitions(target, layout, tmp_path)


@pytest.mark.parametrize("sparse", [True, False])
def test_gzip_stream_source(image, tmp_path, sparse):
    path, layout = image
    packed = tmp_path / "pi.img.gz"
    with open(path, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as out:
        for chunk in iter(lambda: src.read(4 * MIB), b""):
            out.write(chunk)
    target = tmp_path / "out.img"
    calls = []
    with gzip.open(packed, "rb") as stream:
        result = write_image(stream, target, sparse=sparse, size=layout.size, spool_dir=tmp_path,
                             progress=lambda done, total: calls.append((done, total)))
    assert result.verified and result.mode == ("sparse" if sparse else "full")
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == calls[-1][1]
    assert result.image_sha256 == sha256_file(path)
    assert result.bytes_total == layout.size
    if not sparse:
        assert sha256_file(target) == result.image_sha256
    else:
        assert result.bytes_written < layout.size / 4
        assert not list(tmp_path.glob("pibake-spool-*"))  # the spool is gone
    assert result.written_sha256 == written_ranges_sha256(target, [tuple(r) for r in result.ranges])
    check_partitions(target, layout, tmp_path)


def test_stream_from_the_image_module(image, tmp_path):
    """The stream bake.images gives for a local .xz works as a source (decompressed while writing)."""
    from pibake.bake import images

    path, layout = image
    if not images.__dict__.get("open_image_stream"):
        pytest.skip("bake.images.open_image_stream not built")
    packed = tmp_path / "pi.img.xz"
    subprocess.run(["xz", "-0", "-T2", "-k", "-c", str(path)], stdout=open(packed, "wb"), check=True)
    local = images.LocalImage(path=packed, sha256=None, format="xz", family=None, size=packed.stat().st_size,
                              name=packed.name)
    with images.open_image_stream(local) as stream:
        result = write_image(stream, tmp_path / "x.img", spool_path=tmp_path / "cache.raw")
    assert result.image_sha256 == sha256_file(path)
    assert (tmp_path / "cache.raw").exists()  # kept for the next card
    again = write_image(tmp_path / "cache.raw", tmp_path / "y.img")
    assert again.written_sha256 == result.written_sha256


def test_spool_makes_holes_of_zero_blocks(tmp_path):
    import io

    data = os.urandom(100_000) + bytes(4 * MIB) + os.urandom(5)
    size = writer.spool_stream(io.BytesIO(data), tmp_path / "s.raw", block_size=MIB)
    assert size == len(data)
    assert (tmp_path / "s.raw").read_bytes() == data
    assert (tmp_path / "s.raw").stat().st_blocks * 512 < 1 * MIB
    assert not (tmp_path / "s.raw.partial").exists()


def test_buffered_fallback_when_direct_io_is_refused(image, tmp_path, monkeypatch):
    """Some filesystems (and some USB readers) refuse O_DIRECT: the writer says so and still verifies."""
    path, layout = image
    real_open = os.open

    def no_direct_open(p, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a, **kw)

    def refuse(fd, on):
        if on:
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer, "_set_direct", refuse)
    monkeypatch.setattr(writer.os, "open", no_direct_open)
    result = write_image(path, tmp_path / "b.img")
    assert not result.direct_io and result.verified and result.verify_method == "fadvise"
    assert any("direct I/O refused" in n for n in result.notes)
    check_partitions(tmp_path / "b.img", layout, tmp_path)


def test_refusals_are_one_line_and_write_nothing(image, tmp_path):
    path, layout = image
    with pytest.raises(WriteError, match="does not exist"):
        write_image(tmp_path / "nope.img", tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()
    with pytest.raises(WriteError, match="neither a regular file"):
        write_image(path, tmp_path)
    before = sha256_file(path)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(WriteError, match="same file"):
            write_image(path, fd)
    finally:
        os.close(fd)
    assert sha256_file(path) == before
    with pytest.raises(WriteError, match="neither a regular file"):
        write_image(path, "/dev/null")
    if os.path.exists("/dev/loop0"):  # a block device by path: only through the guard's open_target
        with pytest.raises(WriteError, match="open_target"):
            write_image(path, "/dev/loop0")
    bmap = tmp_path / "other.bmap"
    bmap.write_text('<bmap version="2.0"><ImageSize>8192</ImageSize><BlockSize>4096</BlockSize>'
                    '<BlocksCount>2</BlocksCount><BlockMap><Range>0</Range></BlockMap></bmap>')
    existing = tmp_path / "o.img"
    existing.write_bytes(b"an older output, kept when the burn is refused")
    with pytest.raises(PibakeError, match="bmap file that belongs to this image"):
        write_image(path, existing, bmap=bmap)
    assert existing.read_bytes() == b"an older output, kept when the burn is refused"
    for exc in (WriteError, VerifyError):
        assert issubclass(exc, PibakeError)


@needs_root("losetup needs root")
@needs_program("losetup")
def test_a_card_too_small_is_refused_before_writing(image, tmp_path):
    path, layout = image
    backing = tmp_path / "small.bin"
    backing.write_bytes(b"\xa5" * (16 * MIB))
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup does not work here: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        fd = os.open(loop, os.O_RDWR | os.O_EXCL)
        try:
            with pytest.raises(WriteError, match="use a larger card"):
                write_image(path, fd)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert backing.read_bytes() == b"\xa5" * (16 * MIB)


@needs_program("bmaptool", "dd")
def test_bench_burn_runs_end_to_end_on_a_tiny_image(tmp_path):
    """bench/burn itself is not part of the suite (it wants a 2 GiB image); this checks that it works."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/os-release").write_text("ID=debian\n")
    (rootfs / "usr-bin.bin").write_bytes(os.urandom(2 * MIB))
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPO / "bench/burn"), "--size", "96M", "--boot-size", "40M",
                           "--rootfs", str(rootfs), "--reps", "1", "--card-reps", "1", "--workdir", str(tmp_path / "work"),
                           "--report-dir", str(report), "--no-drop-caches"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pibake (sparse + verify)" in proc.stdout and "goal:" in proc.stdout
    data = json.loads((report / "burn.json").read_text())
    assert set(data["median_seconds"]) == {"pibake (sparse + verify)", "dd bs=4M conv=fsync", "bmaptool copy"}
    assert data["pibake"]["bytes_written"] < data["image"]["size"] / 2
    assert data["command"].startswith("bench/burn --size 96M")
    text = (report / "burn.md").read_text()
    assert "| dd bs=4M conv=fsync |" in text and data["date"] in text
    if running_as_root():  # the card-like target: a throttled loop device (root only)
        card = data["card"]
        assert set(card["median_seconds"]) == set(data["median_seconds"])
        assert card["write_bps"] == 20_000_000 and card["pibake"]["verify_method"] == "direct"
        assert "## Card-like target" in text and "20,000,000 B/s" in text
    assert not (tmp_path / "work").exists()  # cleaned up


@needs_root("losetup needs root")
@needs_program("losetup")
@pytest.mark.parametrize("sparse", [True, False])
def test_stream_to_a_loop_device(image, tmp_path, sparse):
    """A decompressing stream onto a card: full (written as it arrives) and sparse (spooled first)."""
    path, layout = image
    packed = tmp_path / "pi.img.gz"
    with open(path, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as out:
        out.write(src.read())
    backing = tmp_path / "card.bin"
    backing.write_bytes(os.urandom(layout.size + MIB))
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup does not work here: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        fd = os.open(loop, os.O_RDWR | os.O_EXCL)
        try:
            with gzip.open(packed, "rb") as stream:
                result = write_image(stream, fd, sparse=sparse, size=layout.size, spool_dir=tmp_path)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert result.verified and result.target_kind == "block" and result.direct_io
    assert result.image_sha256 == sha256_file(path)
    if not sparse:
        assert result.bytes_written == layout.size
        with open(backing, "rb") as f:
            assert hashlib.sha256(f.read(layout.size)).hexdigest() == result.image_sha256
    check_partitions(backing, layout, tmp_path)


def test_a_short_stream_is_an_error_and_leaves_no_partition_table(image, tmp_path):
    import io

    path, layout = image
    data = path.read_bytes()[: layout.size // 2]
    target = tmp_path / "card.bin"
    target.write_bytes(path.read_bytes())
    with pytest.raises(WriteError, match="ended after"):
        write_image(io.BytesIO(data), target, sparse=False, size=layout.size, keep_unwritten=True)
    reader = allocation.Reader(os.open(target, os.O_RDONLY), layout.size)
    try:
        assert allocation.read_partition_table(reader, layout.size) == (None, [])
    finally:
        os.close(reader.fd)


def test_an_image_whose_size_is_not_a_multiple_of_4k(tmp_path):
    """The unaligned tail goes through a buffered write and read; everything else stays direct."""
    img = tmp_path / "odd.img"  # no partition table, no filesystem: every byte is written, in both modes
    img.write_bytes(os.urandom(8 * MIB + 1536))
    for sparse in (True, False):
        target = tmp_path / f"out-{sparse}.img"
        result = write_image(img, target, sparse=sparse)
        assert result.verified and result.direct_io
        assert result.ranges[-1][0] + result.ranges[-1][1] == img.stat().st_size
        assert sha256_file(target) == sha256_file(img)


@needs_root("losetup needs root")
@needs_program("losetup")
def test_a_stale_backup_gpt_at_the_end_of_a_larger_card_is_wiped(image, tmp_path):
    path, layout = image
    backing = tmp_path / "used-card.bin"
    subprocess.run(["truncate", "-s", str(layout.size + 16 * MIB), str(backing)], check=True)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(backing)], check=True, text=True,
                   input="label: gpt\n\nstart=2048, size=20480, type=linux\n")
    with open(backing, "rb") as f:
        f.seek(-512, os.SEEK_END)
        assert f.read(8) == b"EFI PART"
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup does not work here: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        fd = os.open(loop, os.O_RDWR | os.O_EXCL)
        try:
            result = write_image(path, fd)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert any("stale backup GPT" in n for n in result.notes)
    with open(backing, "rb") as f:
        f.seek(-512, os.SEEK_END)
        assert f.read(8) != b"EFI PART"
    signatures = subprocess.run(["wipefs", str(backing)], capture_output=True, text=True, check=True).stdout
    assert " dos " in signatures and "gpt" not in signatures, signatures  # wipefs only lists here
    check_partitions(backing, layout, tmp_path)


def _bytes_read():
    """Bytes this process (all its threads) has read so far, the kernel's count (/proc/self/io rchar)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_a_known_image_sha256_is_reported_and_the_image_is_not_hashed_again(tmp_path):
    """burn passes the cached sha256 (bake.images.raw_sha256): the writer then reads the image once to write it
    and the target once to verify, not the image a second time for its hash."""
    img = tmp_path / "data.img"
    img.write_bytes(os.urandom(8 * MIB))
    before = _bytes_read()
    hashed = write_image(img, tmp_path / "a.img")
    with_hash = _bytes_read() - before
    before = _bytes_read()
    known = write_image(img, tmp_path / "b.img", image_sha256=hashed.image_sha256)
    without_hash = _bytes_read() - before
    assert hashed.image_sha256 == known.image_sha256 == sha256_file(img)
    assert known.verified and known.written_sha256 == hashed.written_sha256
    assert with_hash - without_hash > 7 * MIB  # the one 8 MiB read of the image the hash thread did (less noise)
