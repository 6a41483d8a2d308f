"""OS images: the pinned catalog, the download cache, verification and streamed decompression.

    from pibake.bake import images
    img = images.resolve_image("raspios-trixie-lite-arm64")     # downloads (resumable) + sha256 check
    img = images.resolve_image("/data/my.img.xz")               # a local file works too
    with images.open_image_stream(img) as stream:               # decompressed bytes, read as you write
        block = stream.read(4 << 20)

Downloads go to ``<cache>/<file>.part`` first. A ``.part`` file is resumed with an HTTP Range request; if the
server ignores Range (200 instead of 206) the download restarts cleanly from byte 0. Only a file whose sha256
matched is renamed to its final name, so the cache never holds a half-written or unverified image under its
real name. A mismatch deletes the ``.part`` file and raises ``ImageError`` naming expected and actual sha256.
"""

import errno
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import stat
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import yaml

from pibake.errors import ImageError, PibakeError
from pibake.files import atomic_write
from pibake.model import ARCHES, BOARDS, FAMILIES
from pibake.run import run, which

LOG = logging.getLogger(__name__)

FORMATS = ("none", "xz", "zst", "gz")
CHUNK = 1 << 20  # 1 MiB: hashing and decompression block
DOWNLOAD_CHUNK = 64 << 10  # small, so an interrupted download keeps all but the last 64 KiB
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAGIC = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zst"),
    (b"\x1f\x8b", "gz"),
)


@dataclass(frozen=True)
class CatalogImage:
    """One pinned entry of bake/catalog.yaml."""

    name: str
    description: str
    url: str
    sha256: str | None  # of the file at url; None when not confirmed (then `get` needs --sha256)
    size: int | None  # bytes of the file at url, None when not confirmed
    format: str  # one of FORMATS
    family: str  # one of pibake.model.FAMILIES
    boot_partition_number: int
    boot_partition_label: str
    nocloud_files: tuple[str, ...]
    nocloud_mounted_at: str
    arch: str = "arm64"  # one of ARCHES

    @property
    def filename(self):
        return os.path.basename(urlparse(self.url).path)

    def to_dict(self):
        data = asdict(self)
        data["filename"] = self.filename
        data["nocloud_files"] = list(self.nocloud_files)
        return data


@dataclass(frozen=True)
class LocalImage:
    """An image file on this machine, ready to be streamed.

    ``sha256`` is of the file as stored (compressed): known for catalog downloads and for a local file given
    with an expected sha256 (then verified); ``None`` for a local file given without one (the writer hashes
    what it writes anyway). ``family`` is ``None`` for a local file: the cluster's configured family applies.
    """

    path: Path
    sha256: str | None
    format: str  # compression: none | xz | zst | gz
    family: str | None
    size: int  # bytes of the file as stored
    name: str  # catalog name, or the file name for a local file
    boot_partition_number: int | None = None
    boot_partition_label: str | None = None

    def to_dict(self):
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# ---------------------------------------------------------------- catalog (pure)


def parse_catalog(text):
    """Parse catalog YAML text into ``{name: CatalogImage}``; every problem is reported at once."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ImageError(f"image catalog is not valid YAML: {exc}") from exc
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ImageError("image catalog has no 'images' mapping")
    problems, catalog = [], {}
    for name, entry in entries.items():
        where = f"images.{name}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        for key in ("description", "url", "format", "family", "boot_partition", "nocloud"):
            if key not in entry:
                problems.append(f"{where}.{key}: missing")
        if any(p.startswith(where + ".") and p.endswith("missing") for p in problems):
            continue
        sha = entry.get("sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA256_RE.match(sha)):
            problems.append(f"{where}.sha256: must be 64 lower-case hex digits or null")
        size = entry.get("size")
        if size is not None and not (isinstance(size, int) and size > 0):
            problems.append(f"{where}.size: must be a positive integer or null")
        if entry["format"] not in FORMATS:
            problems.append(f"{where}.format: {entry['format']!r} is not one of {', '.join(FORMATS)}")
        if entry["family"] not in FAMILIES:
            problems.append(f"{where}.family: {entry['family']!r} is not one of {', '.join(FAMILIES)}")
        if urlparse(str(entry["url"])).scheme not in ("https", "http"):
            problems.append(f"{where}.url: must be an http(s) URL")
        boot = entry["boot_partition"] or {}
        nocloud = entry["nocloud"] or {}
        if not isinstance(boot.get("number"), int) or not boot.get("label"):
            problems.append(f"{where}.boot_partition: needs number and label")
        if entry.get("arch", "arm64") not in ARCHES:
            problems.append(f"{where}.arch: {entry.get('arch')!r} is not one of {', '.join(ARCHES)}")
        catalog[name] = CatalogImage(
            name=name,
            description=str(entry["description"]),
            url=str(entry["url"]),
            sha256=sha,
            size=size,
            format=entry["format"],
            family=entry["family"],
            boot_partition_number=boot.get("number"),
            boot_partition_label=boot.get("label"),
            nocloud_files=tuple(nocloud.get("files") or ()),
            nocloud_mounted_at=str(nocloud.get("mounted_at", "/boot/firmware")),
            arch=entry.get("arch", "arm64"),
        )
    if problems:
        raise ImageError("image catalog is invalid: " + "; ".join(problems))
    return catalog


def load_catalog():
    """The catalog shipped in the package (bake/catalog.yaml): ``{name: CatalogImage}``."""
    text = resources.files("pibake.bake").joinpath("catalog.yaml").read_text(encoding="utf-8")
    return parse_catalog(text)


def image_for_board(image, board, catalog=None):
    """The catalog image to burn for ``board``: ``image`` itself when it fits, else the catalog entry of the same
    family built for the board's architecture (``raspios-trixie-lite-arm64`` -> ``...-armhf`` for a Pi Zero W).

    A local image file is taken as it is (pibake cannot tell its architecture). ImageError when the board is
    unknown or the family has no image for it (Ubuntu does not run on the 32-bit Zero).
    """
    if board is None:
        return image
    if board not in BOARDS:
        raise ImageError(f"unknown board {board!r}; choose one of {', '.join(BOARDS)}")
    catalog = load_catalog() if catalog is None else catalog
    entry = catalog.get(str(image))
    if entry is None:
        return image
    wanted = BOARDS[board]
    if entry.arch == wanted:
        return image
    fits = sorted(name for name, item in catalog.items() if item.family == entry.family and item.arch == wanted)
    if not fits:
        raise ImageError(f"board {board} needs an {wanted} image and the catalog has no {entry.family} image for "
                         f"{wanted} ({image} is {entry.arch}); choose another --image")
    LOG.info("board %s: burning %s (%s) instead of %s", board, fits[0], wanted, image)
    return fits[0]


def catalog_entry(name, catalog=None):
    catalog = load_catalog() if catalog is None else catalog
    try:
        return catalog[name]
    except KeyError:
        raise ImageError(
            f"unknown image {name!r}: not in the catalog ({', '.join(sorted(catalog))}) and no such file; "
            "see `pibake image list`, or give a path to an image file"
        ) from None


# ---------------------------------------------------------------- cache


def default_cache_dir():
    """``$XDG_CACHE_HOME/pibake/images`` (``~/.cache/...``), or /var/cache/pibake/images as root."""
    if os.geteuid() == 0 and not os.environ.get("XDG_CACHE_HOME"):
        return Path("/var/cache/pibake/images")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pibake" / "images"


def _stamp_path(path):
    return path.with_name(path.name + ".verified")


def _write_stamp(path, sha256):
    st = path.stat()
    stamp = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    atomic_write(_stamp_path(path), json.dumps(stamp))


def _stamp_matches(path, sha256):
    """True when ``path`` was verified against ``sha256`` and has not changed since (size, mtime, inode)."""
    try:
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (stamp.get("sha256") == sha256 and stamp.get("size") == st.st_size
            and stamp.get("mtime_ns") == st.st_mtime_ns and stamp.get("ino") == st.st_ino)


class _CacheLock:
    """An flock on ``<file>.lock`` so two pibake processes never download the same file at once."""

    def __init__(self, path):
        self.path = path.with_name(path.name + ".lock")
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# ---------------------------------------------------------------- hashing, format


def sha256_file(path, *, progress=None):
    """sha256 (hex) of a file, reading 1 MiB blocks; ``progress(done, total)`` after each block."""
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(CHUNK)
            if not block:
                break
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def raw_sha256(path, *, cache_dir=None):
    """sha256 (hex) of a raw image file, holes as zeros (what the writer's ``image_sha256`` is), computed once
    per file identity: real path, size, mtime_ns, inode and device, kept in ``<cache>/../sha256/`` (one small
    JSON file per path). A file that differs in any of them is hashed again; an unchanged one is not read, so
    a batch of cards burned from one image hashes it once instead of once per card."""
    path = Path(path).resolve()
    ident = _identity(path)
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()).parent / "sha256"
    entry = folder / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        stored = json.loads(entry.read_text(encoding="utf-8"))
        if {k: stored.get(k) for k in ident} == ident and _SHA256_RE.match(str(stored.get("sha256"))):
            return stored["sha256"]
    except (OSError, ValueError):
        pass
    digest = _sha256_holes_as_zeros(path)
    if _identity(path) == ident:  # not changed while it was read: worth remembering
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(entry, json.dumps(dict(ident, sha256=digest)))
        except OSError as exc:  # a read-only cache costs a re-hash next time, nothing else
            LOG.warning("cannot keep the sha256 of %s in %s: %s", path, folder, exc.strerror)
    return digest


def _identity(path):
    st = os.stat(path)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def _sha256_holes_as_zeros(path):
    """sha256 of a file; holes (SEEK_HOLE) are hashed as zeros without reading them (raw images are sparse)."""
    digest = hashlib.sha256()
    zeros = bytes(CHUNK)
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fh.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:  # ENXIO: only a hole is left; anything else: no SEEK_DATA here, read it all
                data = size if exc.errno == errno.ENXIO else pos
            while pos < data:
                n = min(CHUNK, data - pos)
                digest.update(zeros[:n])
                pos += n
            if pos >= size:
                break
            try:
                hole = min(size, os.lseek(fh.fileno(), pos, os.SEEK_HOLE))
            except OSError:
                hole = size
            fh.seek(pos)
            while pos < hole:
                block = fh.read(min(CHUNK, hole - pos))
                if not block:
                    raise ImageError(f"{path} shrank while it was hashed: check what writes to it")
                digest.update(block)
                pos += len(block)
    return digest.hexdigest()


def detect_format(path):
    """Compression of a file from its magic bytes: xz, zst, gz or none (a raw image)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head.startswith(b"PK\x03\x04"):
        raise ImageError(f"{path} is a zip archive: unzip it first and give the .img inside")
    return "none"


def _normalise_sha(sha256, what="--sha256"):
    if sha256 is None:
        return None
    value = str(sha256).strip().lower()
    if value.startswith("sha256:"):
        value = value[7:]
    if not _SHA256_RE.match(value):
        raise ImageError(f"{what} must be 64 hex digits, got {sha256!r}")
    return value


# ---------------------------------------------------------------- download


def _check_sha(path, expected, *, progress=None):
    got = sha256_file(path, progress=progress)
    if got != expected:
        path.unlink(missing_ok=True)
        raise ImageError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {got}; the file was deleted, "
            "run the command again to download it afresh (or check the --sha256 you gave)"
        )
    return got


def download(url, dest, *, sha256, size=None, progress=None, session=None, timeout=30):
    """Download ``url`` to ``dest`` (a final path) through ``dest.part``, resuming a previous ``.part``.

    ``sha256`` is enforced: on a mismatch the ``.part`` file is deleted and ``ImageError`` is raised.
    ``progress(done_bytes, total_bytes_or_None)`` is called as bytes arrive. Returns ``dest``.
    """
    import requests  # imported here: the catalog and streams work without it

    dest = Path(dest)
    expected = _normalise_sha(sha256, "sha256")
    if expected is None:
        raise ImageError(f"no sha256 known for {url}: pass --sha256 with the publisher's checksum")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    with _CacheLock(dest):
        if dest.exists():
            if _stamp_matches(dest, expected):
                return dest
            # present under its final name but not (or no longer) known to match: check it once
            if sha256_file(dest, progress=progress) == expected:
                _write_stamp(dest, expected)
                return dest
            LOG.warning("%s does not match its sha256 any more: downloading it again", dest)
            dest.unlink()
            _stamp_path(dest).unlink(missing_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            LOG.info("discarding %s: larger than the expected %d bytes", part, size)
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        LOG.info("downloading %s (resume from %d)", url, have)
        try:
            resp = session.get(url, headers=headers, stream=True, timeout=timeout)
        except requests.RequestException as exc:
            raise ImageError(f"cannot download {url}: {exc.__class__.__name__}: {exc}; check the network "
                             "and run again (a partial download is kept and resumed)") from exc
        with resp:
            if have and resp.status_code == 416:
                # Range not satisfiable: the .part may already be complete.
                LOG.info("server says %s is complete at %d bytes", part, have)
                total = have
                mode = None
            elif resp.status_code == 206 and have:
                start = _content_range_start(resp.headers.get("Content-Range", ""))
                if start != have:
                    raise ImageError(f"{url}: server resumed at byte {start}, not {have}; "
                                     f"delete {part} and run again")
                mode, total = "ab", have + int(resp.headers.get("Content-Length", 0) or 0) or size
            elif resp.status_code == 200:
                if have:
                    LOG.info("server ignored the Range request: restarting %s from byte 0", part)
                have = 0
                length = resp.headers.get("Content-Length")
                mode, total = "wb", int(length) if length and length.isdigit() else size
            else:
                raise ImageError(f"cannot download {url}: HTTP {resp.status_code} {resp.reason}; "
                                 "check the URL (pibake image list) and run again")
            if mode:
                digest_done = have
                try:
                    with open(part, mode) as out:
                        for block in resp.iter_content(DOWNLOAD_CHUNK):
                            if not block:
                                continue
                            out.write(block)
                            digest_done += len(block)
                            if progress:
                                progress(digest_done, total)
                        out.flush()
                        os.fsync(out.fileno())
                except requests.RequestException as exc:
                    raise ImageError(f"download of {url} was interrupted at {digest_done} bytes "
                                     f"({exc.__class__.__name__}); run again to resume") from exc
                except OSError as exc:
                    raise ImageError(f"cannot write {part}: {exc.strerror}; free some space or choose another "
                                     "--cache-dir, then run again to resume") from exc
        if total is not None and part.stat().st_size < total:
            raise ImageError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; "
                             "run again to resume")
        _check_sha(part, expected)
        os.replace(part, dest)  # not atomic_write: the image was streamed to disk (resumable); just rename it
        _write_stamp(dest, expected)
        LOG.info("downloaded and verified %s", dest)
        return dest


def _content_range_start(value):
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- resolve, verify


def _looks_like_path(value):
    return os.sep in value or value.startswith(".") or bool(re.search(r"\.(img|xz|zst|gz|raw)$", value))


def resolve_image(name_or_path, *, cache_dir=None, sha256=None, progress=None, catalog=None, session=None):
    """Turn a catalog name, an http(s) URL or a local path into a ``LocalImage``.

    Catalog name: download into the cache (resumable, sha256 enforced) unless already there and verified.
    URL: the same, with ``sha256`` required. Local path: must exist and be a regular file; verified when
    ``sha256`` is given. ``progress(done, total)`` reports download bytes.
    """
    value = str(name_or_path)
    expected = _normalise_sha(sha256)
    catalog = load_catalog() if catalog is None else catalog
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if value in catalog:
        entry = catalog[value]
        if entry.sha256 and expected and entry.sha256 != expected:
            raise ImageError(f"--sha256 {expected} conflicts with the catalog's pinned sha256 for {value} "
                             f"({entry.sha256}); drop --sha256 or give a local file")
        want = entry.sha256 or expected
        if want is None:
            raise ImageError(f"the catalog has no confirmed sha256 for {value}: pass --sha256 with the "
                             f"checksum published next to {entry.url}")
        dest = cache / entry.filename
        download(entry.url, dest, sha256=want, size=entry.size, progress=progress, session=session)
        return LocalImage(path=dest, sha256=want, format=entry.format, family=entry.family,
                          size=dest.stat().st_size, name=entry.name,
                          boot_partition_number=entry.boot_partition_number,
                          boot_partition_label=entry.boot_partition_label)
    if urlparse(value).scheme in ("http", "https"):
        if expected is None:
            raise ImageError(f"downloading {value} needs --sha256 (the publisher's checksum of that file)")
        filename = os.path.basename(urlparse(value).path) or "image"
        dest = cache / filename
        download(value, dest, sha256=expected, progress=progress, session=session)
        return _local(dest, expected, name=filename)
    path = Path(value).expanduser()
    if not path.exists():
        if _looks_like_path(value):
            raise ImageError(f"image file {value} does not exist: check the path")
        catalog_entry(value, catalog)  # raises "unknown image ..."
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"image {value} is not a regular file: give an image file (.img, .img.xz, ...)")
    if expected:
        got = sha256_file(path, progress=progress)
        if got != expected:
            # A local file is the user's: report, never delete it.
            raise ImageError(f"sha256 mismatch for {path}: expected {expected}, got {got}; "
                             "the file is corrupt or not the image you meant")
    return _local(path, expected, name=path.name)


def _local(path, sha256, *, name):
    fmt = detect_format(path)
    return LocalImage(path=Path(path).resolve(), sha256=sha256, format=fmt, family=None,
                      size=os.path.getsize(path), name=name)


def cached_image(name, *, cache_dir=None, catalog=None):
    """Path of a catalog image in the cache if downloaded (verified or not), else None. No network."""
    catalog = load_catalog() if catalog is None else catalog
    entry = catalog_entry(name, catalog)
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / entry.filename
    return path if path.exists() else None


@dataclass(frozen=True)
class ImageCheck:
    """Result of ``verify_image``."""

    name: str
    path: str
    ok: bool
    expected_sha256: str | None
    sha256: str
    format: str
    size: int
    uncompressed_size: int | None
    message: str

    def to_dict(self):
        return asdict(self)


def verify_image(name_or_path, *, cache_dir=None, sha256=None, progress=None, catalog=None, decompress=True):
    """Re-hash an image (catalog name: the cached file, never downloaded here; or a path) and, with
    ``decompress``, read the whole compressed stream to prove it is complete. Returns ``ImageCheck``;
    ``ok`` is False on a sha256 mismatch or a corrupt stream (nothing is deleted here).
    """
    value = str(name_or_path)
    catalog = load_catalog() if catalog is None else catalog
    expected = _normalise_sha(sha256)
    if value in catalog:
        entry = catalog[value]
        path = cached_image(value, cache_dir=cache_dir, catalog=catalog)
        if path is None:
            raise ImageError(f"{value} is not downloaded yet: run `pibake image get {value}` first")
        expected = expected or entry.sha256
        name = value
    else:
        path = Path(value).expanduser()
        if not path.exists():
            if _looks_like_path(value):
                raise ImageError(f"image file {value} does not exist: check the path")
            catalog_entry(value, catalog)
        if not path.is_file():
            raise ImageError(f"image {value} is not a regular file")
        name = path.name
    got = sha256_file(path, progress=progress)
    fmt = detect_format(path)
    problems = []
    if expected and got != expected:
        problems.append(f"sha256 mismatch: expected {expected}, got {got}")
    usize = None
    if decompress and not problems:
        image = LocalImage(path=path, sha256=got, format=fmt, family=None, size=path.stat().st_size, name=name)
        try:
            usize = 0
            with open_image_stream(image) as stream:
                while True:
                    block = stream.read(4 * CHUNK)
                    if not block:
                        break
                    usize += len(block)
                    if progress:
                        progress(stream.compressed_position() or 0, image.size)
        except ImageError as exc:
            problems.append(str(exc))
            usize = None
    ok = not problems
    if ok:
        message = "sha256 matches" if expected else "no expected sha256 given: computed only"
        if decompress:
            message += f"; {fmt} stream complete" if fmt != "none" else "; raw image"
    else:
        message = "; ".join(problems)
    return ImageCheck(name=name, path=str(path), ok=ok, expected_sha256=expected, sha256=got, format=fmt,
                      size=path.stat().st_size, uncompressed_size=usize, message=message)


# ---------------------------------------------------------------- streams


class ImageStream:
    """A readable binary stream of the decompressed image.

    ``read(n)`` returns up to n bytes (b"" at the end). Corrupt or truncated compressed input raises
    ``ImageError`` naming the file, never a raw lzma/gzip/zstd exception. ``compressed_position()`` is how far
    into the stored file we are (for a progress bar over the compressed size). Use as a context manager.
    """

    def __init__(self, image):
        self.image = image
        self.path = Path(image.path)
        self._raw = open(self.path, "rb")
        fmt = image.format
        if fmt == "xz":
            self._stream = lzma.LZMAFile(self._raw, "rb")
        elif fmt == "gz":
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="rb")
        elif fmt == "zst":
            try:
                import zstandard  # optional: only .zst images need it (setup.cfg extra)
            except ImportError as exc:
                self._raw.close()
                raise ImageError("reading .zst images needs the Python package zstandard "
                                 "(pip install zstandard), or decompress the file with `zstd -d` first") from exc
            self._stream = _ZstdFrames(self._raw, zstandard)
        elif fmt == "none":
            self._stream = self._raw
        else:
            self._raw.close()
            raise ImageError(f"unknown image format {fmt!r} for {self.path}")
        self.bytes_read = 0

    def _fail(self, exc):
        return ImageError(
            f"image {self.path.name} is corrupt or truncated (after {self.bytes_read} decompressed bytes; "
            f"{self.image.format}: {exc}); download it again (pibake image get) or check the file"
        )

    def read(self, size=-1):
        try:
            data = self._stream.read(size)
        except (lzma.LZMAError, EOFError, gzip.BadGzipFile, OSError, ValueError) as exc:
            raise self._fail(exc) from exc
        except Exception as exc:  # zstandard.ZstdError has no common base we can name without the import
            if exc.__class__.__name__ == "ZstdError":
                raise self._fail(exc) from exc
            raise
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer):
        if not hasattr(self._stream, "readinto"):
            data = self.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        try:
            n = self._stream.readinto(buffer)
        except (lzma.LZMAError, EOFError, gzip.BadGzipFile, OSError, ValueError) as exc:
            raise self._fail(exc) from exc
        self.bytes_read += n
        return n

    @property
    def name(self):
        return str(self.path)

    def compressed_position(self):
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return None

    def readable(self):
        return True

    def close(self):
        try:
            if self._stream is not self._raw:
                self._stream.close()
        finally:
            self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ZstdFrames:
    """Decode consecutive zstd frames from a file object; a frame cut short at the end of the input is an
    error (zstandard's own stream_reader would silently return b"" there)."""

    def __init__(self, raw, zstandard):
        self._raw = raw
        self._zstd = zstandard
        self._dobj = None
        self._pending = bytearray()  # decoded bytes not yet returned
        self._eof = False

    def read(self, size=-1):
        want = size if size is not None and size >= 0 else 1 << 62
        while len(self._pending) < want and not self._eof:
            chunk = self._raw.read(CHUNK)
            if not chunk:
                if self._dobj is not None and not self._dobj.eof:
                    raise self._zstd.ZstdError("input ends in the middle of a frame")
                self._eof = True
                break
            self._feed(chunk)
        out = bytes(self._pending[:want])
        del self._pending[:want]
        return out

    def _feed(self, chunk):
        while chunk:
            if self._dobj is None or self._dobj.eof:
                self._dobj = self._zstd.ZstdDecompressor().decompressobj()
            self._pending += self._dobj.decompress(chunk)
            chunk = self._dobj.unused_data if self._dobj.eof else b""

    def close(self):
        pass


def open_image_stream(local_image):
    """A binary stream (``ImageStream``) of the decompressed image: .xz via lzma, .gz via gzip, .zst via
    the zstandard package, raw as is. Truncated/corrupt input raises ``ImageError`` from ``read``."""
    path = Path(local_image.path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist (any more): run the command again")
    return ImageStream(local_image)


def uncompressed_size(local_image):
    """Size in bytes of the decompressed image when it can be known without decompressing, else None.

    raw: the file size; xz: from the stream index (``xz --robot --list``); zst and gz: None (a zst frame header
    only gives its own frame's size and a file may hold several; gz keeps the size modulo 4 GiB).
    """
    path = Path(local_image.path)
    if local_image.format == "none":
        return path.stat().st_size
    if local_image.format == "xz":
        if not which("xz"):
            return None
        try:
            out = run(["xz", "--robot", "--list", str(path)], timeout=60).stdout
        except PibakeError:
            return None
        for line in out.splitlines():
            fields = line.split("\t")
            if fields[0] == "totals" and len(fields) > 4 and fields[4].isdigit():
                return int(fields[4])
        return None
    return None
