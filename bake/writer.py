"""Write a disk image to a card or an image file: sparse, direct, hashed while writing, read back.

    result = write_image("raspios.img", "out/red01.img")           # a file target
    result = write_image("raspios.img", fd_from_open_target)        # a card (fd from bake.devices.open_target)

``sparse`` writes only what the image uses (free blocks only where a filesystem's allocation map proves them
free); ``full`` makes the target byte-identical. The partition table is zeroed first and written last, so an
interrupted write never leaves a card that looks valid. ``image_sha256`` and ``written_sha256`` (a canonical
hash of the written ranges) come with the result; the read-back raises VerifyError on a mismatch. The modes,
hashes and streams in detail: docs/internals.md#writing-an-image-pibakebakewriter.
"""

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import queue
import stat
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pibake.bake import allocation

from pibake.errors import PibakeError, VerifyError, WriteError

LOG = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_BLOCK_SIZE = 4 * MIB
ALIGN = 4096  # O_DIRECT alignment that suits 512e and 4Kn cards and files on ext4/xfs/btrfs
HEAD = 64 * 1024  # zeroed first, written last: MBR + GPT header + GPT entries
MERGE_GAP = 64 * 1024  # ranges closer than this are written as one
SPOOL_GRAIN = 64 * 1024
NBUF = 4


@dataclass
class WriteResult:
    source: str
    target: str
    target_kind: str  # "file" or "block"
    mode: str  # "sparse" or "full"
    bytes_total: int  # size of the image
    bytes_written: int
    bytes_skipped: int
    ranges: list  # [[offset, length], ...] written, ascending
    image_sha256: str
    written_sha256: str
    verified: bool
    verify_method: str  # "direct", "fadvise" or "none"
    direct_io: bool
    seconds: float
    write_seconds: float
    verify_seconds: float
    filesystems: list = field(default_factory=list)  # allocation map per partition (sparse mode)
    notes: list = field(default_factory=list)

    def to_json(self):
        return asdict(self)


# ---------------------------------------------------------------- helpers


def _aligned_buffer(size):
    return mmap.mmap(-1, max(size, ALIGN))  # anonymous maps are page-aligned, as O_DIRECT wants


def _pread_full(fd, view, offset):
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)  # past the end of the source: zeros
            break
        done += n
    return view


def _pwrite_full(fd, view, offset):
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def _ranges_trailer(ranges):
    """The range list that ends the canonical written hash; ``ranges`` as [(offset, length)]."""
    merged = allocation.normalise((a, a + n) for a, n in ranges)
    return b"".join(struct.pack(">QQ", a, b - a) for a, b in merged)


def _fd_name(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _set_direct(fd, on):
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    new = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if new != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, new)


def written_ranges_sha256(target, ranges, *, block_size=DEFAULT_BLOCK_SIZE):
    """The canonical ``written_sha256`` of ``ranges`` ([(offset, length)]) as read from ``target``
    (a path or an fd), e.g. to check a card against a burn manifest later. Buffered reads."""
    own = not isinstance(target, int)
    fd = os.open(target, os.O_RDONLY) if own else target
    try:
        digest = hashlib.sha256()
        for offset, length in sorted(ranges):
            pos = offset
            while pos < offset + length:
                n = min(block_size, offset + length - pos)
                data = os.pread(fd, n, pos)
                if len(data) < n:
                    data += bytes(n - len(data))
                digest.update(data)
                pos += n
        digest.update(_ranges_trailer(ranges))
        return digest.hexdigest()
    finally:
        if own:
            os.close(fd)


def spool_stream(stream, path, *, block_size=DEFAULT_BLOCK_SIZE, progress=None):
    """Decompress ``stream`` into a sparse raw file at ``path`` (all-zero 64 KiB blocks become holes).

    Written to ``path.partial`` and renamed at the end, so ``path`` is either complete or absent.
    Returns the image size.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    zero = bytes(SPOOL_GRAIN)
    size = 0
    with open(partial, "wb") as out:
        while True:
            chunk = stream.read(block_size)
            if not chunk:
                break
            view = memoryview(chunk)
            for i in range(0, len(chunk), SPOOL_GRAIN):
                part = view[i:i + SPOOL_GRAIN]
                if part != zero[: len(part)]:
                    out.seek(size + i)
                    out.write(part)
            size += len(chunk)
            if progress:
                progress(size, None)
        out.truncate(size)
    os.replace(partial, path)  # not atomic_write: streamed (sparse) data, too big to hold in memory
    return size


# ---------------------------------------------------------------- planning


@dataclass
class WritePlan:
    size: int
    ranges: list  # (start, end) byte ranges to write, aligned, ascending
    holes: list  # source holes (start, end)
    filesystems: list
    notes: list


def plan_write(source_fd, size, *, target_kind, sparse=True, bmap=None, merge_gap=MERGE_GAP):
    """Decide which byte ranges of the image to write (see the module docstring for the rules)."""
    notes = []
    data = allocation.data_ranges(source_fd, size)
    holes = allocation.invert(data, 0, size)
    skip, filesystems = [], []
    if sparse:
        amap = allocation.allocation_map(allocation.Reader(source_fd, size), size)
        filesystems = [m.to_json() for m in amap.filesystems]
        notes.extend(amap.notes)
        skip.extend(amap.free)
        if bmap is not None:
            if bmap.image_size != size:
                raise PibakeError(f"the bmap file describes a {bmap.image_size}-byte image but the image has "
                                  f"{size} bytes: use the bmap file that belongs to this image")
            known = [(m.partition.start, m.partition.end) for m in amap.filesystems if m.fstype]
            unmapped = allocation.invert(bmap.mapped, 0, size)
            skip.extend(allocation.subtract(unmapped, known))
    if target_kind == "file":
        skip.extend(holes)  # a truncated file reads zeros there, exactly like the image
    write = allocation.invert(skip, 0, size)
    write = allocation.align_outward(write, ALIGN, size)
    write = allocation.merge_gaps(write, merge_gap)
    return WritePlan(size, write, holes, filesystems, notes)


# ---------------------------------------------------------------- the writer


class _Hasher:
    """Hashes run in one worker thread, in submission order (hashlib releases the GIL)."""

    def __init__(self):
        self.image = hashlib.sha256()
        self.written = hashlib.sha256()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pibake-sha")

    def submit(self, view, *, written=False):
        def work():
            self.image.update(view)
            if written:
                self.written.update(view)
        return self.pool.submit(work)

    def close(self):
        self.pool.shutdown(wait=True)


def _split(ranges, block_size):
    """(offset, length) pieces of at most block_size covering ``ranges`` ((start, end) pairs) in order."""
    for a, b in ranges:
        pos = a
        while pos < b:
            n = min(block_size, b - pos)
            yield pos, n
            pos += n


class _ReadAhead:
    """A reader thread fills aligned buffers ahead of the consumer (reads and writes overlap).

    ``fill(view, offset)`` runs in the reader thread, in order (so it may also feed a hash).
    Iterate to get (offset, view); a view is valid until the next item is taken.
    """

    def __init__(self, pieces, fill, block_size, depth=4):
        self._free = queue.Queue()
        self._ready = queue.Queue()
        self._stop = False
        for _ in range(depth):
            self._free.put(_aligned_buffer(block_size + ALIGN))
        self._thread = threading.Thread(target=self._run, args=(pieces, fill), name="pibake-read", daemon=True)
        self._thread.start()

    def _run(self, pieces, fill):
        try:
            for offset, n in pieces:
                buf = self._free.get()
                if self._stop:
                    return
                view = memoryview(buf)[:n]
                fill(view, offset)
                self._ready.put((offset, view, buf))
            self._ready.put(None)
        except BaseException as exc:  # handed to the consumer
            self._ready.put(exc)

    def __iter__(self):
        held = None
        try:
            while True:
                if held is not None:
                    self._free.put(held)
                    held = None
                item = self._ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                offset, view, held = item
                yield offset, view
        finally:
            self._stop = True
            self._free.put(held or _aligned_buffer(ALIGN))  # unblock a waiting reader
            self._thread.join()


class _ImageHasher(threading.Thread):
    """SHA-256 of the whole logical image (holes as zeros), in its own thread, reading the source itself
    (its data pages are usually still cached from the writer's reads), so it never holds up the writes."""

    def __init__(self, src, size, holes, block_size):
        super().__init__(name="pibake-image-sha", daemon=True)
        self.src, self.size, self.holes, self.block_size = src, size, holes, block_size
        self.digest = hashlib.sha256()
        self.error = None
        self.stop = False

    def run(self):
        try:
            zero = memoryview(bytes(self.block_size))
            buf = _aligned_buffer(self.block_size)
            segments = [(a, b, True) for a, b in self.holes]
            segments += [(a, b, False) for a, b in allocation.invert(self.holes, 0, self.size)]
            for a, b, hole in sorted(segments):
                for offset, n in _split([(a, b)], self.block_size):
                    if self.stop:
                        return
                    if hole:
                        self.digest.update(zero[:n])
                    else:
                        view = memoryview(buf)[:n]
                        _pread_full(self.src, view, offset)
                        self.digest.update(view)
                        view.release()
        except BaseException as exc:
            self.error = exc

    def hexdigest(self):
        self.join()
        if self.error:
            raise self.error
        return self.digest.hexdigest()


def _wipe_stale_backup_gpt(fd, image_size, notes):
    """A card larger than the image may still end in the backup GPT of what it held before; with the new
    image's partition table in front, tools then see two disagreeing tables. Zero it (it lies past the
    image, in space the image does not use)."""
    capacity = os.lseek(fd, 0, os.SEEK_END)
    start = max(-(-image_size // ALIGN) * ALIGN, capacity - HEAD)
    for sector in (512, 4096):
        at = capacity - sector
        if at >= start and os.pread(fd, 8, at) == b"EFI PART":
            _set_direct(fd, False)
            _pwrite_full(fd, bytes(capacity - start), start)
            os.fsync(fd)
            notes.append(f"zeroed a stale backup GPT at the end of the card (bytes {start}-{capacity})")
            return True
    return False


def _target_kind(target):
    """"block" or "file", without opening anything (``_open_target`` refuses what is neither)."""
    try:
        st = os.fstat(target) if isinstance(target, int) else os.stat(target)
    except FileNotFoundError:
        return "file"
    return "block" if stat.S_ISBLK(st.st_mode) else "file"


def _open_target(target, size, keep_unwritten, source_stat=None):
    """(fd, own, kind, name). Checks happen before anything is truncated or written."""
    if isinstance(target, int):
        st = os.fstat(target)
        name = _fd_name(target)
        own, fd = False, target
    else:
        name = str(target)
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            raise WriteError(f"{name} is a block device: open it with pibake.bake.devices.open_target "
                             "(which runs the wrong-disk guard) and pass the file descriptor")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise WriteError(f"{name} is neither a regular file nor a block device: choose an image file path")
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise WriteError(f"cannot open {name} for writing: {exc.strerror}") from exc
        st, own = os.fstat(fd), True
    if source_stat is not None and (source_stat.st_dev, source_stat.st_ino) == (st.st_dev, st.st_ino):
        if own:
            os.close(fd)
        raise WriteError(f"the image and the target are the same file ({name}): choose another output")
    if stat.S_ISBLK(st.st_mode):
        capacity = os.lseek(fd, 0, os.SEEK_END)
        if size is not None and capacity < size:
            if own:
                os.close(fd)
            raise WriteError(f"{name} holds {capacity} bytes but the image needs {size}: use a larger card")
        return fd, own, "block", name
    if not stat.S_ISREG(st.st_mode):
        if own:
            os.close(fd)
        raise WriteError(f"{name} is neither a regular file nor a block device")
    try:
        if not keep_unwritten:
            os.ftruncate(fd, 0)  # no byte of an older file survives in a skipped range
        if size is not None and (not keep_unwritten or os.fstat(fd).st_size < size):
            os.ftruncate(fd, size)
    except OSError as exc:
        if own:
            os.close(fd)
        raise WriteError(f"cannot size {name} to {size} bytes: {exc.strerror}") from exc
    return fd, own, "file", name


def write_image(source, target, *, sparse=True, verify=True, progress=None, block_size=DEFAULT_BLOCK_SIZE,
                bmap=None, keep_unwritten=False, merge_gap=MERGE_GAP, size=None, spool_dir=None, spool_path=None,
                image_sha256=None):
    """Write the image ``source`` to ``target`` and return a ``WriteResult``.

    ``source``: path of a raw image (file or block device), or a binary stream with ``read``.
    ``target``: a path (regular file: created, truncated, sized) or an open fd (a card from
    ``bake.devices.open_target``, or a regular file). ``bmap``: path of a bmaptool bmap file (or a
    parsed ``allocation.Bmap``). ``progress(done, total)``: called as bytes are written and then read
    back; ``total`` counts both passes (``2 x bytes to write`` with verify). ``keep_unwritten``: a
    regular-file target is not truncated, skipped ranges keep their old bytes exactly as on a card
    (tests use it to prove equivalence without root). ``size``: expected image size of a stream.
    ``image_sha256``: the image file's sha256 when already known (``bake.images.raw_sha256``, cached per
    file identity): it is reported as is and the image is not hashed again (a file source only).
    """
    if block_size % ALIGN or block_size < ALIGN:
        raise ValueError(f"block_size must be a multiple of {ALIGN}")
    started = time.monotonic()
    notes = []
    if hasattr(source, "read"):
        if not sparse:
            return _write_stream(source, target, verify=verify, progress=progress, block_size=block_size,
                                 keep_unwritten=keep_unwritten, size=size, started=started)
        spool = Path(spool_path) if spool_path else Path(tempfile.mkdtemp(prefix="pibake-spool-", dir=spool_dir)) / "image.raw"
        LOG.info("decompressing the image into the sparse spool file %s", spool)
        spool_stream(source, spool, block_size=block_size)
        notes.append(f"stream decompressed into the sparse file {spool} before the sparse write")
        try:
            result = write_image(spool, target, sparse=True, verify=verify, progress=progress,
                                 block_size=block_size, bmap=bmap, keep_unwritten=keep_unwritten,
                                 merge_gap=merge_gap)
        finally:
            if not spool_path:
                spool.unlink(missing_ok=True)
                spool.parent.rmdir()
        result.source = getattr(source, "name", None) or str(getattr(source, "path", "stream"))
        result.notes[:0] = notes
        result.seconds = round(time.monotonic() - started, 3)
        return result

    source_name = str(source)
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise WriteError(f"image {source_name} does not exist: check the path") from exc
    except OSError as exc:
        raise WriteError(f"cannot read image {source_name}: {exc.strerror}") from exc
    try:
        image_size = os.lseek(src, 0, os.SEEK_END)
        if image_size == 0:
            raise WriteError(f"image {source_name} is empty")
        if isinstance(bmap, (str, os.PathLike)):
            try:
                bmap = allocation.parse_bmap(Path(bmap).read_text())
            except (OSError, ValueError) as exc:
                raise WriteError(f"cannot use bmap file {bmap}: {exc}") from exc
        # plan first: a refusal (e.g. a bmap of another image) must not have truncated an existing output file
        plan = plan_write(src, image_size, target_kind="block" if keep_unwritten else _target_kind(target),
                          sparse=sparse, bmap=bmap, merge_gap=merge_gap)
        notes.extend(plan.notes)
        fd, own, kind, target_name = _open_target(target, image_size, keep_unwritten, os.fstat(src))
        try:
            if kind == "block":
                _wipe_stale_backup_gpt(fd, image_size, notes)
            result = _write_planned(src, fd, plan, verify=verify, progress=progress, block_size=block_size,
                                    target_name=target_name, notes=notes, image_sha256=image_sha256)
        finally:
            if own:
                os.close(fd)
    finally:
        os.close(src)
    written = allocation.total(plan.ranges)
    result.update(source=source_name, target=target_name, target_kind=kind, mode="sparse" if sparse else "full",
                  bytes_total=image_size, bytes_written=written, bytes_skipped=image_size - written,
                  ranges=[[a, b - a] for a, b in plan.ranges], filesystems=plan.filesystems, notes=notes,
                  seconds=round(time.monotonic() - started, 3))
    LOG.info("wrote %d of %d bytes to %s (%s, direct I/O %s) in %.2f s", written, image_size, target_name,
             result["mode"], result["direct_io"], result["seconds"])
    return WriteResult(**result)


def _write_planned(src, fd, plan, *, verify, progress, block_size, target_name, notes, image_sha256=None):
    size, ranges = plan.size, plan.ranges
    to_write = allocation.total(ranges)
    progress_total = to_write * (2 if verify else 1)
    image_hasher = None if image_sha256 else _ImageHasher(src, size, plan.holes, block_size)
    if image_hasher:
        image_hasher.start()
    written = hashlib.sha256()
    direct = True
    try:
        _set_direct(fd, True)
    except OSError as exc:
        direct = False
        notes.append(f"direct I/O refused by the target ({exc.strerror}): buffered writes")
    head_ranges = allocation.intersect(ranges, [(0, HEAD)])
    head_data = []  # (offset, bytes) written last
    done = 0
    offset = 0
    write_started = time.monotonic()

    def put(view, at):
        nonlocal direct
        aligned = len(view) % ALIGN == 0 and at % ALIGN == 0
        if direct and not aligned:
            _set_direct(fd, False)
            try:
                _pwrite_full(fd, view, at)
            finally:
                _set_direct(fd, True)
            return
        try:
            _pwrite_full(fd, view, at)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                direct = False
                _set_direct(fd, False)
                notes.append("direct I/O refused by the target on the first write: buffered writes")
                _pwrite_full(fd, view, at)
            else:
                raise

    def fill(view, at):  # reader thread, in order
        _pread_full(src, view, at)
        written.update(view)

    try:
        try:
            zero = _aligned_buffer(HEAD)
            for a, b in head_ranges:  # a killed write leaves no partition table behind
                put(memoryview(zero)[: b - a], a)
            if head_ranges:
                os.fdatasync(fd)
            for offset, view in _ReadAhead(_split(ranges, block_size), fill, block_size):
                if offset < HEAD:
                    head_data.append((offset, bytes(view)))
                    continue
                put(view, offset)
                done += len(view)
                if progress:
                    progress(done, progress_total)
            offset = 0
            os.fsync(fd)
            for at, data in head_data:
                view = memoryview(_aligned_buffer(len(data)))[: len(data)]
                view[:] = data
                put(view, at)
                done += len(data)
            os.fsync(fd)
            if progress and head_data:
                progress(done, progress_total)
        except OSError as exc:
            raise WriteError(f"writing to {target_name} failed near byte {offset}: {exc.strerror}; the target is "
                             "incomplete (no partition table): check the card and burn again") from exc
        finally:
            try:
                _set_direct(fd, False)
            except OSError:
                pass
        write_seconds = time.monotonic() - write_started
        written.update(_ranges_trailer([(a, b - a) for a, b in ranges]))
        written_sha = written.hexdigest()
        verified, method, verify_seconds = False, "none", 0.0
        if verify:
            t0 = time.monotonic()
            method = _verify(src, fd, ranges, written_sha, block_size=block_size, progress=progress,
                             done=done, progress_total=progress_total, target_name=target_name, notes=notes)
            verified, verify_seconds = True, time.monotonic() - t0
        image_sha = image_hasher.hexdigest() if image_hasher else image_sha256
    finally:
        if image_hasher:
            image_hasher.stop = True
            image_hasher.join()
    return dict(image_sha256=image_sha, written_sha256=written_sha, verified=verified,
                verify_method=method, direct_io=direct, write_seconds=round(write_seconds, 3),
                verify_seconds=round(verify_seconds, 3))


def _open_readback(fd, target_name, notes):
    """An fd reading the target around the page cache: (fd, method)."""
    path = f"/proc/self/fd/{fd}"
    try:
        rfd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        return rfd, "direct"
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return _open_fadvise(fd, target_name, notes), "fadvise"


def _open_fadvise(fd, target_name, notes):
    rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
    notes.append(f"{target_name} refused O_DIRECT reads: page cache dropped with posix_fadvise before reading back")
    return rfd


def _read_into(rfd, view, at, direct):
    """Read len(view) bytes at ``at``; O_DIRECT wants aligned lengths, so read a rounded-up length into the
    buffer behind ``view`` (which always starts at the buffer's start and has ALIGN bytes to spare)."""
    n = len(view)
    want = -(-n // ALIGN) * ALIGN if direct else n
    full = memoryview(view.obj)[:want] if direct else view
    done = 0
    while done < n:
        got = os.preadv(rfd, [full[done:want]], at + done)
        if got == 0:
            view[done:n] = bytes(n - done)
            break
        done += got


def _verify(src, fd, ranges, expected, *, block_size, progress, done, progress_total, target_name, notes):
    os.fsync(fd)
    rfd, method = _open_readback(fd, target_name, notes)
    state = {"rfd": rfd, "direct": method == "direct"}

    def fill(view, at):  # reader thread
        try:
            _read_into(state["rfd"], view, at, state["direct"])
        except OSError as exc:
            if state["direct"] and exc.errno == errno.EINVAL:  # O_DIRECT accepted at open, refused on read
                os.close(state["rfd"])
                state["rfd"], state["direct"] = _open_fadvise(fd, target_name, notes), False
                _read_into(state["rfd"], view, at, False)
            else:
                raise VerifyError(f"reading back {target_name} failed at byte {at}: {exc.strerror}") from exc

    digest = hashlib.sha256()
    try:
        for _offset, view in _ReadAhead(_split(ranges, block_size), fill, block_size):
            digest.update(view)
            done += len(view)
            if progress:
                progress(done, progress_total)
        digest.update(_ranges_trailer([(a, b - a) for a, b in ranges]))
        if digest.hexdigest() != expected:
            if src is None:
                raise VerifyError(f"verification failed: what {target_name} holds differs from the image stream; "
                                  "the card may be faulty or fake: try another card")
            bad = _first_difference(src, state["rfd"], ranges, state["direct"], block_size)
            raise VerifyError(f"verification failed: {target_name} differs from the image at byte {bad} "
                              f"(0x{bad:x}); the card may be faulty or fake: try another card")
    finally:
        os.close(state["rfd"])
    return "direct" if state["direct"] else "fadvise"


def _first_difference(src, rfd, ranges, direct, block_size):
    buf = _aligned_buffer(block_size + ALIGN)
    for pos, n in _split(ranges, block_size):
        view = memoryview(buf)[:n]
        _read_into(rfd, view, pos, direct)
        want = os.pread(src, n, pos)
        want += bytes(n - len(want))
        got = bytes(view)
        view.release()
        if got != want:
            return pos + next(i for i in range(n) if got[i] != want[i])
    return ranges[0][0] if ranges else 0


def _write_stream(stream, target, *, verify, progress, block_size, keep_unwritten, size, started):
    """Full write of a decompressing stream as it arrives (no spool, nothing skipped on a card)."""
    notes = ["stream written as it was decompressed (full mode)"]
    fd, own, kind, target_name = _open_target(target, size, keep_unwritten)
    if kind == "file" and size is None and not keep_unwritten:
        os.ftruncate(fd, 0)
    hasher = _Hasher()
    buffers = [_aligned_buffer(block_size) for _ in range(NBUF)]
    pending = [None] * NBUF
    zero = bytes(block_size)
    direct = True
    try:
        _set_direct(fd, True)
    except OSError:
        direct = False
    head = []  # (offset, bytes): the chunks that hold the first HEAD bytes are written last
    ranges, pos, slot = [], 0, 0
    skip_zero = kind == "file" and not keep_unwritten
    write_started = time.monotonic()
    try:
        try:
            if kind == "block" or keep_unwritten:  # a killed write leaves no partition table behind
                _pwrite_full(fd, memoryview(_aligned_buffer(HEAD))[:HEAD], 0)
                os.fdatasync(fd)
            while True:
                if pending[slot] is not None:
                    pending[slot].result()
                view = memoryview(buffers[slot])
                n = 0
                while n < block_size:
                    got = stream.readinto(view[n:block_size]) if hasattr(stream, "readinto") else None
                    if got is None:
                        data = stream.read(block_size - n)
                        got = len(data)
                        view[n:n + got] = data
                    if not got:
                        break
                    n += got
                if n == 0:
                    break
                view = view[:n]
                is_zero = skip_zero and view == zero[:n]
                pending[slot] = hasher.submit(view, written=not is_zero)
                slot = (slot + 1) % NBUF
                if not is_zero:
                    ranges.append((pos, pos + n))
                    if pos < HEAD:
                        head.append((pos, bytes(view)))
                    else:
                        if direct and n % ALIGN:  # the unaligned tail of the image
                            _set_direct(fd, False)
                            _pwrite_full(fd, view, pos)
                            _set_direct(fd, True)
                        else:
                            try:
                                _pwrite_full(fd, view, pos)
                            except OSError as exc:
                                if direct and exc.errno == errno.EINVAL:
                                    _set_direct(fd, False)
                                    direct = False
                                    notes.append("direct I/O refused by the target: buffered writes")
                                    _pwrite_full(fd, view, pos)
                                else:
                                    raise
                pos += n
                if progress:
                    progress(pos, (size or pos) * (2 if verify else 1))
            if size is not None and pos != size:
                raise WriteError(f"the image stream ended after {pos} bytes but {size} were announced; "
                                 "the target is incomplete (no partition table): check the image file")
            if kind == "file" and not keep_unwritten:
                os.ftruncate(fd, pos)
            os.fsync(fd)
            _set_direct(fd, False)
            for at, data in head:
                _pwrite_full(fd, data, at)
            os.fsync(fd)
        except OSError as exc:
            raise WriteError(f"writing to {target_name} failed near byte {pos}: {exc.strerror}; the target is "
                             "incomplete (no partition table): check the card and burn again") from exc
        finally:
            hasher.close()
            try:
                _set_direct(fd, False)
            except OSError:
                pass
        ranges = allocation.normalise(ranges)
        write_seconds = time.monotonic() - write_started
        hasher.written.update(_ranges_trailer([(a, b - a) for a, b in ranges]))
        written_sha = hasher.written.hexdigest()
        method, verify_seconds = "none", 0.0
        if verify:
            t0 = time.monotonic()
            # the bar goes on from the bytes streamed to those plus the bytes read back
            method = _verify(None, fd, ranges, written_sha, block_size=block_size, progress=progress, done=pos,
                             progress_total=pos + allocation.total(ranges), target_name=target_name, notes=notes)
            verify_seconds = time.monotonic() - t0
    finally:
        if own:
            os.close(fd)
    written = allocation.total(ranges)
    return WriteResult(
        source=getattr(stream, "name", None) or str(getattr(stream, "path", "stream")), target=target_name,
        target_kind=kind, mode="full", bytes_total=pos, bytes_written=written, bytes_skipped=pos - written,
        ranges=[[a, b - a] for a, b in ranges], image_sha256=hasher.image.hexdigest(), written_sha256=written_sha,
        verified=verify, verify_method=method, direct_io=direct, seconds=round(time.monotonic() - started, 3),
        write_seconds=round(write_seconds, 3), verify_seconds=round(verify_seconds, 3), notes=notes)
