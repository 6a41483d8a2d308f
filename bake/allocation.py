"""Which bytes of a disk image matter: partition tables and the filesystems' own allocation maps.

A sparse burn may skip a byte range only when something *proves* it unused. This module gives
those proofs, read straight from the image (no mounting, no root, no external program):

* the partition table: MBR (with the extended/logical chain) and GPT;
* ext2/3/4: superblock, group descriptors (32- and 64-byte), block bitmaps. A group whose
  bitmap is not initialised (``BLOCK_UNINIT``) holds nothing but metadata, which we compute;
  metadata (superblock and descriptor copies, reserved GDT blocks, bitmaps, inode tables) is
  always "used", wherever ``flex_bg`` put it, even when it is all zeros;
* FAT12/16/32: everything before the data region (boot sector, FSInfo, backup boot sector,
  every FAT copy, the FAT12/16 root directory) plus every cluster whose FAT entry is non-zero.

Everything else is "used": the MBR, the gap before the first partition, EBRs, GPT headers and
entries (primary and backup), and whole partitions whose filesystem is unknown or unsupported
(bigalloc, external journals, impossible values; the map's notes say which). The one place outside
a filesystem's own map that counts as free is the slack between a filesystem's end and its
partition's end: no filesystem owns it. If partitions overlap, nothing is skipped at all.
``allocation_map`` returns the *free* ranges: the only ranges a writer may leave untouched on a card.

Ranges are half-open ``(start, end)`` byte pairs, sorted and non-overlapping.
"""

import array
import logging
import os
import re
import struct
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

LOG = logging.getLogger(__name__)

SECTOR = 512

# ---------------------------------------------------------------- range arithmetic


def normalise(ranges):
    """Sort and merge (start, end) pairs; drop empty ones."""
    out = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def invert(ranges, start, end):
    """The parts of [start, end) not covered by ``ranges`` (normalised)."""
    out, pos = [], start
    for a, b in normalise(ranges):
        a, b = max(a, start), min(b, end)
        if a >= b:
            continue
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < end:
        out.append((pos, end))
    return out


def intersect(a_ranges, b_ranges):
    a_ranges, b_ranges = normalise(a_ranges), normalise(b_ranges)
    out, i, j = [], 0, 0
    while i < len(a_ranges) and j < len(b_ranges):
        a0, a1 = a_ranges[i]
        b0, b1 = b_ranges[j]
        lo, hi = max(a0, b0), min(a1, b1)
        if lo < hi:
            out.append((lo, hi))
        if a1 < b1:
            i += 1
        else:
            j += 1
    return out


def subtract(a_ranges, b_ranges):
    """``a`` minus ``b``."""
    out = []
    b_ranges = normalise(b_ranges)
    for a0, a1 in normalise(a_ranges):
        out.extend(invert(b_ranges, a0, a1))
    return out


def align_outward(ranges, alignment, limit):
    """Grow every range to ``alignment`` boundaries (never past ``limit``) and merge."""
    return normalise((r[0] - r[0] % alignment, min(limit, -(-r[1] // alignment) * alignment)) for r in ranges)


def merge_gaps(ranges, gap):
    """Merge ranges separated by less than ``gap`` bytes (writing a little more, in fewer requests)."""
    out = []
    for start, end in normalise(ranges):
        if out and start - out[-1][1] < gap:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def total(ranges):
    return sum(b - a for a, b in ranges)


# ---------------------------------------------------------------- reading


class Reader:
    """``read(offset, length)`` on a path or an fd (short reads past the end are padded with zeros)."""

    def __init__(self, fd, size):
        self.fd, self.size = fd, size

    def read(self, offset, length):
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        data = os.pread(self.fd, length, offset) if offset < self.size else b""
        if len(data) < length:
            data += bytes(length - len(data))
        return data


# ---------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    number: int  # 1-4 primary, 5+ logical (MBR) or the GPT entry number
    start: int  # bytes
    size: int  # bytes
    type: str  # "0x0c", "0x83" or a GPT type GUID
    scheme: str  # "mbr" or "gpt" or "none" (filesystem on the whole image)

    @property
    def end(self):
        return self.start + self.size

    def to_json(self):
        return {"number": self.number, "start": self.start, "size": self.size, "type": self.type,
                "scheme": self.scheme}


EXTENDED_TYPES = {0x05, 0x0F, 0x85}


def _guid(raw):
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def _gpt(reader, size):
    for sector in (512, 4096):
        header = reader.read(sector, 92)
        if header[:8] != b"EFI PART":
            continue
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 0x48)
        if not (128 <= entry_size <= 4096) or count > 4096:
            return None
        table = reader.read(entries_lba * sector, count * entry_size)
        parts = []
        for i in range(count):
            entry = table[i * entry_size:(i + 1) * entry_size]
            if entry[:16] == bytes(16):
                continue
            first, last = struct.unpack_from("<QQ", entry, 32)
            if last < first:
                continue
            parts.append(Partition(i + 1, first * sector, (last - first + 1) * sector, _guid(entry[:16]), "gpt"))
        return parts
    return None


def _mbr_entries(sector0):
    entries = []
    for i in range(4):
        e = sector0[446 + 16 * i: 446 + 16 * (i + 1)]
        ptype = e[4]
        start, count = struct.unpack_from("<II", e, 8)
        if ptype and count:
            entries.append((i + 1, ptype, start, count, e[0]))
    return entries


def read_partition_table(reader, size):
    """(scheme, [Partition]) where scheme is "gpt", "mbr" or None (no partition table).

    An MBR whose entries are impossible (status byte not 0/0x80, or a start past the end of the
    image) is treated as no partition table: a FAT "superfloppy" boot sector also ends in 55 AA.
    """
    sector0 = reader.read(0, SECTOR)
    if sector0[510:512] != b"\x55\xaa":
        return None, []
    entries = _mbr_entries(sector0)
    if any(e[1] == 0xEE for e in entries):
        parts = _gpt(reader, size)
        if parts is not None:
            return "gpt", parts
    if not entries or any(status not in (0, 0x80) or start * SECTOR >= size for _, _, start, _, status in entries):
        return None, []
    parts = []
    for number, ptype, start, count, _ in entries:
        if ptype in EXTENDED_TYPES:
            parts.extend(_logical(reader, start, size))
        else:
            parts.append(Partition(number, start * SECTOR, count * SECTOR, f"0x{ptype:02x}", "mbr"))
    return "mbr", parts


def _logical(reader, ext_start, size):
    parts, ebr, number, seen = [], ext_start, 5, set()
    while ebr not in seen and len(seen) < 128 and ebr * SECTOR < size:
        seen.add(ebr)
        sector = reader.read(ebr * SECTOR, SECTOR)
        if sector[510:512] != b"\x55\xaa":
            break
        entries = _mbr_entries(sector)
        nxt = None
        for slot, ptype, start, count, _ in entries:
            if slot == 1 and ptype not in EXTENDED_TYPES:
                parts.append(Partition(number, (ebr + start) * SECTOR, count * SECTOR, f"0x{ptype:02x}", "mbr"))
                number += 1
            elif slot == 2 and ptype in EXTENDED_TYPES:
                nxt = ext_start + start
        if nxt is None:
            break
        ebr = nxt
    return parts


# ---------------------------------------------------------------- filesystems


class Unsupported(Exception):
    """The filesystem is recognised but we cannot prove its free space (the partition is written whole)."""


@dataclass
class FilesystemMap:
    partition: Partition
    fstype: str | None  # "ext4", "ext3", "ext2", "vfat" or None (unknown)
    used: list = field(default_factory=list)  # absolute byte ranges that must be written
    note: str = ""

    @property
    def free(self):
        return invert(self.used, self.partition.start, self.partition.end)

    def to_json(self):
        return {**self.partition.to_json(), "fstype": self.fstype, "used_bytes": total(self.used),
                "free_bytes": total(self.free), "note": self.note}


def _bits_to_ranges(bitmap, nbits):
    """Runs of set bits in a little-endian-bit bitmap, as (first, end) bit indices, for bits < nbits."""
    out = []
    for m in re.finditer(rb"[^\x00]+", bitmap[: (nbits + 7) // 8]):
        a, b = m.start(), m.end()
        # whole 0xff bytes are fast; edges are checked bit by bit
        run_start = None
        for byte_index in range(a, b):
            byte = bitmap[byte_index]
            if byte == 0xFF and run_start is not None:
                continue
            for bit in range(8):
                n = byte_index * 8 + bit
                if n >= nbits:
                    break
                if byte >> bit & 1:
                    if run_start is None:
                        run_start = n
                elif run_start is not None:
                    out.append((run_start, n))
                    run_start = None
        if run_start is not None:
            out.append((run_start, min(b * 8, nbits)))
    return out


def _is_power_of(n, base):
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


EXT_COMPAT_SPARSE_SUPER2 = 0x200
EXT_INCOMPAT_JOURNAL_DEV = 0x8
EXT_INCOMPAT_META_BG = 0x10
EXT_INCOMPAT_EXTENTS = 0x40
EXT_INCOMPAT_64BIT = 0x80
EXT_RO_COMPAT_SPARSE_SUPER = 0x1
EXT_RO_COMPAT_GDT_CSUM = 0x10
EXT_RO_COMPAT_BIGALLOC = 0x200
EXT_RO_COMPAT_METADATA_CSUM = 0x400
EXT_COMPAT_HAS_JOURNAL = 0x4
BG_BLOCK_UNINIT = 0x2


def ext_used_ranges(reader, offset, length):
    """(fstype, used byte ranges relative to the image) of the ext2/3/4 filesystem at ``offset``.

    Raises ``Unsupported`` for what we cannot prove (bigalloc, journal devices, impossible values).
    """
    sb = reader.read(offset + 1024, 1024)
    if struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise ValueError("not ext")
    (inodes_count, blocks_lo, _r, _f, _fi, first_data_block, log_block, _lc, blocks_per_group, _cpg,
     inodes_per_group) = struct.unpack_from("<IIIIIIIIIII", sb, 0)
    rev = struct.unpack_from("<I", sb, 0x4C)[0]
    inode_size = struct.unpack_from("<H", sb, 0x58)[0] if rev >= 1 else 128
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    reserved_gdt = struct.unpack_from("<H", sb, 0xCE)[0]
    desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if incompat & EXT_INCOMPAT_64BIT else 32
    first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0]
    blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & EXT_INCOMPAT_64BIT else 0
    backup_bgs = struct.unpack_from("<II", sb, 0x24C)
    fstype = "ext4" if incompat & (EXT_INCOMPAT_EXTENTS | EXT_INCOMPAT_64BIT) or ro_compat & (
        EXT_RO_COMPAT_METADATA_CSUM | EXT_RO_COMPAT_GDT_CSUM) else ("ext3" if compat & EXT_COMPAT_HAS_JOURNAL else "ext2")
    if ro_compat & EXT_RO_COMPAT_BIGALLOC:
        raise Unsupported("ext4 bigalloc is not supported")
    if incompat & EXT_INCOMPAT_JOURNAL_DEV:
        raise Unsupported("an external ext journal device")
    if log_block > 6 or blocks_per_group == 0 or inodes_per_group == 0 or inode_size < 128:
        raise Unsupported("impossible ext superblock values")
    if desc_size < 32 or desc_size > 1024 or desc_size & (desc_size - 1):
        raise Unsupported(f"impossible ext group descriptor size {desc_size}")
    block = 1024 << log_block
    blocks = blocks_lo | blocks_hi << 32
    if blocks * block > length:
        raise Unsupported(f"the ext filesystem ({blocks * block} bytes) is larger than its partition ({length} bytes)")
    if blocks_per_group > block * 8:
        raise Unsupported("more blocks per group than a bitmap block holds")
    groups = -(-(blocks - first_data_block) // blocks_per_group)
    descs_per_block = block // desc_size
    gdt_blocks = -(-groups // descs_per_block)
    csum = bool(ro_compat & (EXT_RO_COMPAT_GDT_CSUM | EXT_RO_COMPAT_METADATA_CSUM))
    meta_bg = bool(incompat & EXT_INCOMPAT_META_BG)
    itable_blocks = -(-(inodes_per_group * inode_size) // block)

    def has_super(g):
        if g == 0:
            return True
        if compat & EXT_COMPAT_SPARSE_SUPER2:
            return g in backup_bgs
        if ro_compat & EXT_RO_COMPAT_SPARSE_SUPER:
            return g == 1 or _is_power_of(g, 3) or _is_power_of(g, 5) or _is_power_of(g, 7)
        return True

    def group_start(g):
        return first_data_block + g * blocks_per_group

    # where each descriptor block lives
    old_gdt = min(gdt_blocks, first_meta_bg) if meta_bg else gdt_blocks
    desc_locations = []
    for i in range(gdt_blocks):
        if i < old_gdt:
            desc_locations.append(first_data_block + 1 + i)
        else:
            g = i * descs_per_block
            desc_locations.append(group_start(g) + (1 if has_super(g) else 0))

    used_blocks = [(0, first_data_block + 1)]  # boot block(s) and the superblock's block
    for g in range(groups):
        start = group_start(g)
        if has_super(g):
            n = 1
            if not meta_bg:
                n += gdt_blocks + reserved_gdt
            else:
                n += old_gdt + (reserved_gdt if old_gdt else 0)
            used_blocks.append((start, start + n))
        if meta_bg:
            metagroup_index = g % descs_per_block
            if g // descs_per_block >= first_meta_bg and metagroup_index in (0, 1, descs_per_block - 1):
                b = start + (1 if has_super(g) else 0)
                used_blocks.append((b, b + 1))
    for b in desc_locations:
        used_blocks.append((b, b + 1))

    gdt = b"".join(reader.read(offset + b * block, block) for b in desc_locations)
    for g in range(groups):
        d = gdt[g * desc_size:(g + 1) * desc_size]
        bbm, ibm, itab = struct.unpack_from("<III", d, 0)
        flags = struct.unpack_from("<H", d, 0x12)[0]
        if desc_size >= 64:
            hb, hi, ht = struct.unpack_from("<III", d, 0x20)
            bbm, ibm, itab = bbm | hb << 32, ibm | hi << 32, itab | ht << 32
        for b, n in ((bbm, 1), (ibm, 1), (itab, itable_blocks)):
            if not (0 < b and b + n <= blocks):
                raise Unsupported(f"group {g} metadata at block {b} lies outside the filesystem")
            used_blocks.append((b, b + n))
        start = group_start(g)
        nbits = min(blocks_per_group, blocks - start)
        if csum and flags & BG_BLOCK_UNINIT:
            continue  # nothing but metadata lives here, and that is counted above
        bitmap = reader.read(offset + bbm * block, block)
        used_blocks.extend((start + a, start + b) for a, b in _bits_to_ranges(bitmap, nbits))
    used = [(offset + a * block, offset + min(b, blocks) * block) for a, b in normalise(used_blocks)]
    return fstype, normalise(used)


def _fat_params(boot):
    if boot[510:512] != b"\x55\xaa":
        raise ValueError("not FAT")
    bps, spc, reserved, nfats, root_entries, total16, _media, fat16 = struct.unpack_from("<HBHBHHBH", boot, 11)
    total32, fat32 = struct.unpack_from("<II", boot, 32)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or nfats == 0 or reserved == 0:
        raise ValueError("not FAT")
    if not (boot[54:59] in (b"FAT12", b"FAT16", b"FAT  ") or boot[82:87] == b"FAT32" or fat16 == 0):
        raise ValueError("not FAT")
    fat_sectors = fat16 or fat32
    sectors = total16 or total32
    if fat_sectors == 0 or sectors == 0:
        raise ValueError("not FAT")
    root_sectors = -(-(root_entries * 32) // bps)
    data_start = reserved + nfats * fat_sectors + root_sectors
    if data_start >= sectors:
        raise ValueError("not FAT")
    clusters = (sectors - data_start) // spc
    kind = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    return bps, spc, reserved, fat_sectors, data_start, sectors, clusters, kind


def fat_used_ranges(reader, offset, length):
    """Used byte ranges (relative to the image) of the FAT filesystem at ``offset``."""
    bps, spc, reserved, fat_sectors, data_start, sectors, clusters, kind = _fat_params(reader.read(offset, 512))
    if sectors * bps > length:
        raise Unsupported(f"the FAT filesystem ({sectors * bps} bytes) is larger than its partition ({length} bytes)")
    fat = reader.read(offset + reserved * bps, fat_sectors * bps)
    cluster_bytes = spc * bps
    data = offset + data_start * bps
    last = clusters + 2  # cluster numbers 2 .. clusters+1 exist
    if len(fat) * 8 < last * kind:
        raise Unsupported(f"FAT{kind} table shorter than the cluster count")
    cluster_runs = _fat32_runs(fat, last) if kind == 32 else _fat12_16_runs(fat, last, kind)
    ranges = [(offset, data)]  # boot sector, FSInfo, backup boot sector, every FAT, FAT12/16 root directory
    ranges += [(data + (a - 2) * cluster_bytes, data + (b - 2) * cluster_bytes) for a, b in cluster_runs]
    return "vfat", normalise(ranges)


def _runs(entries, last):
    """Runs (first, end) of the cluster numbers that ``entries`` ((n, used) in increasing n) marks used;
    a run still open at the end closes at ``last``."""
    runs, run_start = [], None
    for n, used in entries:
        if used:
            if run_start is None:
                run_start = n
        elif run_start is not None:
            runs.append((run_start, n))
            run_start = None
    if run_start is not None:
        runs.append((run_start, last))
    return runs


def _fat32_runs(fat, last):
    """Runs (first, end) of cluster numbers >= 2 whose FAT32 entry (low 28 bits) is non-zero."""
    words = array.array("I")
    words.frombytes(fat[: last * 4])
    if sys.byteorder != "little":
        words.byteswap()
    page = 4096
    zero_page = bytes(page)

    def entries():
        for base in range(0, last * 4, page):
            chunk = fat[base: min(base + page, last * 4)]
            first_n = base // 4
            if chunk == zero_page[: len(chunk)]:  # 1024 free clusters at once
                yield first_n, False
                continue
            for n in range(max(first_n, 2), first_n + len(chunk) // 4):
                yield n, words[n] & 0x0FFFFFFF

    return _runs(entries(), last)


def _fat12_16_runs(fat, last, kind):
    def entries():
        for n in range(2, last):
            if kind == 16:
                entry = fat[2 * n] | fat[2 * n + 1] << 8
            else:
                pair = fat[n * 3 // 2] | fat[n * 3 // 2 + 1] << 8
                entry = pair >> 4 if n & 1 else pair & 0xFFF
            yield n, entry

    return _runs(entries(), last)


def filesystem_map(reader, partition):
    """Read the filesystem of ``partition`` and say which of its bytes are used."""
    part = partition
    for probe in (ext_used_ranges, fat_used_ranges):
        try:
            fstype, used = probe(reader, part.start, part.size)
        except ValueError:
            continue
        except Unsupported as exc:
            return FilesystemMap(part, None, [(part.start, part.end)], f"written whole: {exc}")
        return FilesystemMap(part, fstype, used, "")
    return FilesystemMap(part, None, [(part.start, part.end)], "written whole: unknown filesystem")


@dataclass
class AllocationMap:
    size: int
    scheme: str | None
    filesystems: list  # [FilesystemMap]
    free: list  # byte ranges provably unused by anything on the image
    notes: list = field(default_factory=list)

    def to_json(self):
        return {"size": self.size, "scheme": self.scheme, "free_bytes": total(self.free),
                "filesystems": [f.to_json() for f in self.filesystems], "notes": list(self.notes)}


def allocation_map(reader, size):
    """The ``AllocationMap`` of an image read through ``reader`` (``Reader``)."""
    scheme, parts = read_partition_table(reader, size)
    notes = []
    if scheme is None:
        parts = [Partition(0, 0, size, "", "none")]
    inside = []
    for p in parts:
        if p.start >= size:
            notes.append(f"partition {p.number} starts past the end of the image: ignored")
            continue
        if p.end > size:
            notes.append(f"partition {p.number} ends past the end of the image: clipped")
            p = Partition(p.number, p.start, size - p.start, p.type, p.scheme)
        inside.append(p)
    ordered = sorted(inside, key=lambda p: p.start)
    overlap = any(a.end > b.start for a, b in zip(ordered, ordered[1:]))
    maps = [filesystem_map(reader, p) for p in ordered]
    if scheme is None and maps[0].fstype is None and maps[0].note.endswith("unknown filesystem"):
        maps = []  # no partition table, no filesystem: nothing is known, everything is written
        notes.append("no partition table and no known filesystem: the whole image is written")
    if overlap:
        notes.append("partitions overlap: no filesystem map is trusted, the whole image is written")
        free = []
    else:
        free = normalise(r for m in maps for r in m.free)
    for m in maps:
        if m.note:
            notes.append(f"partition {m.partition.number}: {m.note}")
    return AllocationMap(size, scheme, maps, free, notes)


def image_allocation_map(path):
    """``allocation_map`` of an image file or block device given by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return allocation_map(Reader(fd, size), size)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- holes and bmap files


def data_ranges(fd, size):
    """Ranges of ``fd`` that hold data (SEEK_DATA/SEEK_HOLE); everything when holes cannot be asked for."""
    out, pos = [], 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == 6:  # ENXIO: no data after pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)]
    return out


@dataclass
class Bmap:
    image_size: int
    block_size: int
    mapped: list  # byte ranges
    checksum_type: str | None


def parse_bmap(text):
    """Parse a bmaptool XML bmap (format 1.x or 2.x). Raises ValueError on anything malformed."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("bmap files have no DOCTYPE or entities")
    root = ET.fromstring(text)
    if root.tag != "bmap":
        raise ValueError("not a bmap file (root element is not <bmap>)")
    version = root.get("version", "")
    if not version or version.split(".")[0] not in ("1", "2"):
        raise ValueError(f"unsupported bmap version {version!r}")

    def number(tag):
        el = root.find(tag)
        if el is None or not (el.text or "").strip().isdigit():
            raise ValueError(f"bmap: <{tag}> is missing or not a number")
        return int(el.text.strip())

    image_size, block_size, blocks = number("ImageSize"), number("BlockSize"), number("BlocksCount")
    if block_size <= 0 or blocks != -(-image_size // block_size):
        raise ValueError("bmap: BlocksCount does not match ImageSize/BlockSize")
    ctype = root.find("ChecksumType")
    mapped = []
    block_map = root.find("BlockMap")
    if block_map is None:
        raise ValueError("bmap: <BlockMap> is missing")
    for rng in block_map.findall("Range"):
        text = (rng.text or "").strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        if not m:
            raise ValueError(f"bmap: bad range {text!r}")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        if last < first or last >= blocks:
            raise ValueError(f"bmap: range {text!r} outside the image")
        mapped.append((first * block_size, min((last + 1) * block_size, image_size)))
    return Bmap(image_size, block_size, normalise(mapped),
                (ctype.text or "").strip() if ctype is not None else None)
