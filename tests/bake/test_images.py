"""Images: catalog, downloads from a local HTTP server (never the internet), the cache, streamed decompression."""

import gzip
import hashlib
import http.server
import json
import lzma
import os
import subprocess
import sys
import threading

import pytest

from pibake.bake import images
from pibake.bake.images import CatalogImage
from pibake.errors import ImageError
from pibake.model import FAMILIES
from tests.conftest import running_as_root

# An image-like payload: some random bytes and long zero runs, like a mostly empty root filesystem.
PAYLOAD = os.urandom(300_000) + bytes(2_000_000) + os.urandom(700_000)
PAYLOAD_XZ = lzma.compress(PAYLOAD, preset=1)
SHA_XZ = hashlib.sha256(PAYLOAD_XZ).hexdigest()


# ---------------------------------------------------------------- a local HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}  # path -> bytes
    support_range = True
    cut_after = None  # send only this many body bytes, then drop the connection
    log = None  # list of (path, Range header or None, status)

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        body = self.files.get(self.path)
        rng = self.headers.get("Range")
        if body is None:
            self.log.append((self.path, rng, 404))
            self.send_error(404)
            return
        start = 0
        status = 200
        if rng and self.support_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.log.append((self.path, rng, 416))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.log.append((self.path, rng, status))
        part = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(part)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if self.cut_after is not None:
            self.wfile.write(part[: self.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)


class Server:
    """http.server on 127.0.0.1 in a thread; attributes of the handler are switchable between requests."""

    def __init__(self, support_range=True):
        handler = type("Handler", (_Handler,), {"files": {}, "support_range": support_range, "log": []})
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    @property
    def log(self):
        return self.handler.log

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    srv = Server(support_range=True)
    srv.handler.files["/img/test.img.xz"] = PAYLOAD_XZ
    yield srv
    srv.close()


@pytest.fixture
def server_no_range():
    srv = Server(support_range=False)
    srv.handler.files["/img/test.img.xz"] = PAYLOAD_XZ
    yield srv
    srv.close()


def entry(url, sha256=SHA_XZ, size=None, name="test-image"):
    return CatalogImage(name=name, description="test", url=url, sha256=sha256, size=size, format="xz",
                        family="raspios", boot_partition_number=1, boot_partition_label="bootfs",
                        nocloud_files=("user-data", "meta-data", "network-config"),
                        nocloud_mounted_at="/boot/firmware")


def cache_files(cache):
    """Files in the cache other than lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def read_all(image):
    out = bytearray()
    with images.open_image_stream(image) as stream:
        while True:
            block = stream.read(1 << 20)
            if not block:
                return bytes(out)
            out += block


# ---------------------------------------------------------------- catalog


def test_shipped_catalog_is_valid_and_pinned():
    catalog = images.load_catalog()
    assert {"raspios-trixie-lite-arm64", "ubuntu-24.04-server-arm64-raspi"} <= set(catalog)
    for item in catalog.values():
        assert item.family in FAMILIES
        assert item.format == "xz" and item.url.startswith("https://")
        assert item.sha256 is None or len(item.sha256) == 64
        assert item.nocloud_files == ("user-data", "meta-data", "network-config")
        assert item.nocloud_mounted_at == "/boot/firmware"
    assert catalog["raspios-trixie-lite-arm64"].boot_partition_label == "bootfs"
    assert catalog["ubuntu-24.04-server-arm64-raspi"].boot_partition_label == "system-boot"
    assert catalog["raspios-trixie-lite-arm64"].filename == "2025-11-24-raspios-trixie-arm64-lite.img.xz"


def test_catalog_problems_reported_at_once():
    text = """
images:
  a:
    description: x
    url: ftp://example.invalid/a.img.xz
    sha256: nothex
    size: -1
    format: rar
    family: fedora
    boot_partition: {number: 1, label: bootfs}
    nocloud: {files: [user-data]}
  b:
    description: y
"""
    with pytest.raises(ImageError) as info:
        images.parse_catalog(text)
    msg = str(info.value)
    for part in ("images.a.url", "images.a.sha256", "images.a.size", "images.a.format", "images.a.family",
                 "images.b.url: missing"):
        assert part in msg, part


def test_entry_without_confirmed_sha256_needs_one(server, tmp_path):
    catalog = {"test-image": entry(server.url("/img/test.img.xz"), sha256=None)}
    with pytest.raises(ImageError, match="no confirmed sha256.*--sha256"):
        images.resolve_image("test-image", cache_dir=tmp_path, catalog=catalog)
    assert server.log == []  # refused before any download
    image = images.resolve_image("test-image", cache_dir=tmp_path, catalog=catalog, sha256=SHA_XZ)
    assert image.sha256 == SHA_XZ and read_all(image) == PAYLOAD


def test_sha256_option_conflicting_with_the_pinned_one(server, tmp_path):
    catalog = {"test-image": entry(server.url("/img/test.img.xz"))}
    with pytest.raises(ImageError, match="conflicts with the catalog"):
        images.resolve_image("test-image", cache_dir=tmp_path, catalog=catalog, sha256="0" * 64)


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(ImageError, match="unknown image 'nosuch'.*pibake image list"):
        images.resolve_image("nosuch", cache_dir=tmp_path)
    with pytest.raises(ImageError, match=r"image file .*missing\.img\.xz does not exist"):
        images.resolve_image(str(tmp_path / "missing.img.xz"), cache_dir=tmp_path)
    with pytest.raises(ImageError, match="not a regular file"):
        images.resolve_image(str(tmp_path), cache_dir=tmp_path)


# ---------------------------------------------------------------- downloads


def test_download_into_cache_then_cached(server, tmp_path):
    cache = tmp_path / "cache"
    catalog = {"test-image": entry(server.url("/img/test.img.xz"), size=len(PAYLOAD_XZ))}
    seen = []
    image = images.resolve_image("test-image", cache_dir=cache, catalog=catalog,
                                 progress=lambda done, total: seen.append((done, total)))
    assert image.path == cache / "test.img.xz" and image.format == "xz" and image.family == "raspios"
    assert image.path.read_bytes() == PAYLOAD_XZ
    assert seen[-1] == (len(PAYLOAD_XZ), len(PAYLOAD_XZ))
    assert cache_files(cache) == ["test.img.xz", "test.img.xz.verified"]
    # a second resolve trusts the verified, unchanged file: no request at all
    images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert len(server.log) == 1
    # a file changed behind our back is downloaded and verified again
    with open(image.path, "r+b") as fh:
        fh.write(b"\0")
    images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert len(server.log) == 2 and image.path.read_bytes() == PAYLOAD_XZ
    # a good file copied into the cache by hand (no stamp) is hashed once, not downloaded
    (cache / "test.img.xz.verified").unlink()
    images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert len(server.log) == 2 and (cache / "test.img.xz.verified").exists()


def test_resume_after_a_partial_download(server, tmp_path):
    cache = tmp_path / "cache"
    catalog = {"test-image": entry(server.url("/img/test.img.xz"))}
    server.handler.cut_after = 400_000
    with pytest.raises(ImageError, match="interrupted|stopped at"):
        images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    part = cache / "test.img.xz.part"
    assert 0 < part.stat().st_size < len(PAYLOAD_XZ)
    assert cache_files(cache) == ["test.img.xz.part"]  # nothing under the final name
    have = part.stat().st_size
    server.handler.cut_after = None
    image = images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert server.log[-1] == ("/img/test.img.xz", f"bytes={have}-", 206)
    assert image.path.read_bytes() == PAYLOAD_XZ and read_all(image) == PAYLOAD
    assert cache_files(cache) == ["test.img.xz", "test.img.xz.verified"]


def test_server_ignoring_range_restarts_cleanly(server_no_range, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    # a stale .part with wrong bytes: appending to it would corrupt the file
    (cache / "test.img.xz.part").write_bytes(b"garbage" * 1000)
    catalog = {"test-image": entry(server_no_range.url("/img/test.img.xz"))}
    image = images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert server_no_range.log == [("/img/test.img.xz", "bytes=7000-", 200)]
    assert image.path.read_bytes() == PAYLOAD_XZ


def test_complete_part_file_is_finished_on_416(server, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "test.img.xz.part").write_bytes(PAYLOAD_XZ)
    catalog = {"test-image": entry(server.url("/img/test.img.xz"))}
    image = images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert server.log[-1][2] == 416 and image.path.read_bytes() == PAYLOAD_XZ


def test_sha256_mismatch_deletes_the_file(server, tmp_path):
    cache = tmp_path / "cache"
    wrong = "ab" * 32
    catalog = {"test-image": entry(server.url("/img/test.img.xz"), sha256=wrong)}
    with pytest.raises(ImageError) as info:
        images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    msg = str(info.value)
    assert f"expected {wrong}" in msg and f"got {SHA_XZ}" in msg and "deleted" in msg
    assert cache_files(cache) == []


def test_corrupted_download_is_refused(server, tmp_path):
    """The server hands out a corrupted file (one byte flipped): refused, nothing kept."""
    bad = bytearray(PAYLOAD_XZ)
    bad[len(bad) // 2] ^= 0xFF
    server.handler.files["/img/test.img.xz"] = bytes(bad)
    cache = tmp_path / "cache"
    catalog = {"test-image": entry(server.url("/img/test.img.xz"))}
    with pytest.raises(ImageError, match="sha256 mismatch"):
        images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert cache_files(cache) == []


def test_full_cache_disk_is_one_clear_line(server, tmp_path):
    """ENOSPC while writing the .part file: an ImageError saying what to do (the partial file is kept)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "test.img.xz.part").symlink_to("/dev/full")
    server.handler.support_range = False  # a fresh 200 download straight into the full "disk"
    catalog = {"test-image": entry(server.url("/img/test.img.xz"))}
    with pytest.raises(ImageError, match="free some space"):
        images.resolve_image("test-image", cache_dir=cache, catalog=catalog)
    assert not (cache / "test.img.xz").exists()


def test_http_error_is_one_clear_line(server, tmp_path):
    catalog = {"test-image": entry(server.url("/img/gone.img.xz"))}
    with pytest.raises(ImageError, match="HTTP 404"):
        images.resolve_image("test-image", cache_dir=tmp_path, catalog=catalog)
    assert cache_files(tmp_path) == []


def test_connection_refused_is_one_clear_line(tmp_path):
    srv = Server()
    url = srv.url("/img/test.img.xz")
    srv.close()  # nothing listens on that port now
    with pytest.raises(ImageError, match="cannot download"):
        images.resolve_image(url, cache_dir=tmp_path, sha256=SHA_XZ)


def test_url_needs_sha256(server, tmp_path):
    with pytest.raises(ImageError, match="needs --sha256"):
        images.resolve_image(server.url("/img/test.img.xz"), cache_dir=tmp_path)
    image = images.resolve_image(server.url("/img/test.img.xz"), cache_dir=tmp_path, sha256=SHA_XZ.upper())
    assert image.sha256 == SHA_XZ and read_all(image) == PAYLOAD


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert images.default_cache_dir() == tmp_path / "pibake" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    expected = "/var/cache/pibake/images" if running_as_root() else os.path.expanduser("~/.cache/pibake/images")
    assert str(images.default_cache_dir()) == expected


# ---------------------------------------------------------------- local files and streams


@pytest.fixture
def compressed(tmp_path):
    raw = tmp_path / "pi.img"
    raw.write_bytes(PAYLOAD)
    files = {"none": raw}
    (tmp_path / "pi.img.xz").write_bytes(PAYLOAD_XZ)
    files["xz"] = tmp_path / "pi.img.xz"
    (tmp_path / "pi.img.gz").write_bytes(gzip.compress(PAYLOAD, 1))
    files["gz"] = tmp_path / "pi.img.gz"
    zstandard = pytest.importorskip("zstandard")
    # two frames, as `zstd` writes for concatenated input
    half = len(PAYLOAD) // 2
    cz = zstandard.ZstdCompressor()
    (tmp_path / "pi.img.zst").write_bytes(cz.compress(PAYLOAD[:half]) + cz.compress(PAYLOAD[half:]))
    files["zst"] = tmp_path / "pi.img.zst"
    return files


@pytest.mark.parametrize("fmt", ["none", "xz", "gz", "zst"])
def test_streams_decompress(compressed, fmt):
    image = images.resolve_image(str(compressed[fmt]))
    assert image.format == fmt and image.sha256 is None and image.family is None
    assert read_all(image) == PAYLOAD


@pytest.mark.parametrize("fmt", ["none", "xz", "gz", "zst"])
def test_streams_readinto(compressed, fmt):
    """The writer reads into its own aligned buffer: readinto gives the same bytes as read."""
    out = bytearray()
    buf = bytearray(256 << 10)
    view = memoryview(buf)
    with images.open_image_stream(images.resolve_image(str(compressed[fmt]))) as stream:
        while True:
            n = stream.readinto(view[:100_000])
            if not n:
                break
            out += buf[:n]
        assert stream.bytes_read == len(PAYLOAD)
    assert bytes(out) == PAYLOAD


@pytest.mark.parametrize("fmt", ["xz", "gz", "zst"])
def test_truncated_stream_readinto_is_a_clear_error(compressed, tmp_path, fmt):
    data = compressed[fmt].read_bytes()
    cut = tmp_path / f"cut.img.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    buf = bytearray(1 << 20)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        with images.open_image_stream(images.resolve_image(str(cut))) as stream:
            while stream.readinto(buf):
                pass


@pytest.mark.parametrize("fmt", ["xz", "gz", "zst"])
def test_truncated_stream_is_a_clear_error(compressed, tmp_path, fmt):
    data = compressed[fmt].read_bytes()
    cut = tmp_path / f"cut.img.{fmt}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    image = images.resolve_image(str(cut))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_all(image)
    check = images.verify_image(str(cut))
    assert not check.ok and "truncated" in check.message


@pytest.mark.parametrize("fmt", ["xz", "gz"])
def test_corrupt_stream_is_a_clear_error(compressed, tmp_path, fmt):
    data = bytearray(compressed[fmt].read_bytes())
    data[len(data) // 2] ^= 0x55
    bad = tmp_path / f"bad.img.{fmt}"
    bad.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_all(images.resolve_image(str(bad)))


def test_local_file_with_expected_sha256(compressed):
    image = images.resolve_image(str(compressed["xz"]), sha256=SHA_XZ)
    assert image.sha256 == SHA_XZ
    with pytest.raises(ImageError, match="sha256 mismatch"):
        images.resolve_image(str(compressed["xz"]), sha256="0" * 64)
    assert compressed["xz"].exists()  # a local file is the user's: never deleted


def test_zip_is_refused_with_advice(tmp_path):
    z = tmp_path / "image.zip"
    z.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ImageError, match="unzip it first"):
        images.resolve_image(str(z))


def test_uncompressed_size(compressed):
    for fmt in ("none", "xz"):
        assert images.uncompressed_size(images.resolve_image(str(compressed[fmt]))) == len(PAYLOAD), fmt
    for fmt in ("gz", "zst"):  # not knowable without decompressing: None, never a wrong number
        assert images.uncompressed_size(images.resolve_image(str(compressed[fmt]))) is None, fmt


def test_verify_cached_catalog_image(server, tmp_path):
    catalog = {"test-image": entry(server.url("/img/test.img.xz"))}
    with pytest.raises(ImageError, match="not downloaded yet"):
        images.verify_image("test-image", cache_dir=tmp_path, catalog=catalog)
    image = images.resolve_image("test-image", cache_dir=tmp_path, catalog=catalog)
    check = images.verify_image("test-image", cache_dir=tmp_path, catalog=catalog)
    assert check.ok and check.sha256 == SHA_XZ and check.uncompressed_size == len(PAYLOAD)
    with open(image.path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xff")
    check = images.verify_image("test-image", cache_dir=tmp_path, catalog=catalog)
    assert not check.ok and "sha256 mismatch" in check.message


# ---------------------------------------------------------------- CLI


def pibake(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pibake", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_cli_image_list_json():
    out = pibake("image", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["raspios-trixie-lite-arm64"]["family"] == "raspios"


def test_cli_image_get_and_verify(server, tmp_path):
    url = server.url("/img/test.img.xz")
    out = pibake("image", "get", url, "--sha256", SHA_XZ, "--cache-dir", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["sha256"] == SHA_XZ and got["format"] == "xz"
    out = pibake("image", "verify", got["path"], "--sha256", SHA_XZ, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"] is True


def test_cli_errors_are_one_line(tmp_path):
    truncated = tmp_path / "t.img.xz"
    truncated.write_bytes(PAYLOAD_XZ[: len(PAYLOAD_XZ) // 2])
    for args, words in (
        (["image", "verify", str(truncated)], "corrupt or truncated"),
        (["image", "verify", str(tmp_path / "nope.img")], "does not exist"),
        (["image", "get", "nosuch-image", "--cache-dir", str(tmp_path)], "unknown image"),
    ):
        out = pibake(*args)
        assert out.returncode == 1, out
        lines = [line for line in out.stderr.splitlines() if line.startswith("pibake: error:")]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in out.stderr


def test_armhf_entry_and_boards():
    catalog = images.load_catalog()
    armhf = catalog["raspios-trixie-lite-armhf"]
    assert armhf.arch == "armhf" and armhf.family == "raspios" and armhf.boot_partition_label == "bootfs"
    assert armhf.filename == "2025-11-24-raspios-trixie-armhf-lite.img.xz"  # the same release as arm64
    assert armhf.sha256 is None  # not confirmed: `image get`/burn need --sha256 (see catalog.yaml)
    assert catalog["raspios-trixie-lite-arm64"].arch == "arm64"
    pick = images.image_for_board
    assert pick("raspios-trixie-lite-arm64", "zero-w") == "raspios-trixie-lite-armhf"
    assert pick("raspios-trixie-lite-arm64", "zero") == "raspios-trixie-lite-armhf"
    assert pick("raspios-trixie-lite-armhf", "pi4") == "raspios-trixie-lite-arm64"
    for board in ("zero2-w", "pi3", "pi5"):
        assert pick("raspios-trixie-lite-arm64", board) == "raspios-trixie-lite-arm64"
    assert pick("raspios-trixie-lite-arm64", None) == "raspios-trixie-lite-arm64"
    assert pick("/srv/my.img.xz", "zero-w") == "/srv/my.img.xz"  # a local file: the user chose it
    with pytest.raises(ImageError, match="board zero-w needs an armhf image.*no ubuntu image"):
        pick("ubuntu-24.04-server-arm64-raspi", "zero-w")
    with pytest.raises(ImageError, match="unknown board 'pi9'; choose one of zero, zero-w"):
        pick("raspios-trixie-lite-arm64", "pi9")


def test_catalog_arch_is_checked():
    text = """images:
  a:
    description: d
    url: https://example.org/a.img.xz
    sha256: null
    format: xz
    family: raspios
    arch: riscv64
    boot_partition: {number: 1, label: bootfs}
    nocloud: {files: [user-data]}
"""
    with pytest.raises(ImageError, match="images.a.arch: 'riscv64' is not one of arm64, armhf"):
        images.parse_catalog(text)


# ---------------------------------------------------------------- the raw image's sha256, once per file identity


def _bytes_read():
    """Bytes this process has read through read(2) and friends so far (the kernel's count, /proc/self/io)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_raw_sha256_is_read_once_per_file_identity(tmp_path):
    img = tmp_path / "pi.img"
    img.write_bytes(PAYLOAD)
    cache = tmp_path / "cache" / "images"
    before = _bytes_read()
    assert images.raw_sha256(img, cache_dir=cache) == hashlib.sha256(PAYLOAD).hexdigest()
    first = _bytes_read() - before
    assert first >= 1_000_000  # the file's data was read (its zero run may be read or skipped as a hole)

    before = _bytes_read()
    assert images.raw_sha256(img, cache_dir=cache) == hashlib.sha256(PAYLOAD).hexdigest()
    assert _bytes_read() - before < 4096  # only the small cache entry, never the image

    changed = bytearray(PAYLOAD)
    changed[10] ^= 0xFF
    img.write_bytes(bytes(changed))  # same size, new mtime: hashed again, new value
    os.utime(img, ns=(1, 1))  # even with an old mtime the identity (mtime_ns) differs from the cached one
    before = _bytes_read()
    assert images.raw_sha256(img, cache_dir=cache) == hashlib.sha256(bytes(changed)).hexdigest()
    assert _bytes_read() - before >= 1_000_000


def test_raw_sha256_hashes_holes_as_zeros(tmp_path):
    img = tmp_path / "sparse.img"
    with open(img, "wb") as fh:
        fh.write(b"head")
        fh.seek(8 << 20)
        fh.write(b"tail")
        fh.truncate(12 << 20)  # ends in a hole
    assert images.raw_sha256(img, cache_dir=tmp_path / "c") == hashlib.sha256(img.read_bytes()).hexdigest()
