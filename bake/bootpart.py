"""The seed on the card: find the FAT boot partition and write the NoCloud files to its root.

No mounting: the partition table (MBR or GPT) is parsed here in Python and the FAT
filesystem is written with mtools at a byte offset (``mcopy -i TARGET@@OFFSET``), so
this works on image files without root and on whole block devices (cards, loop
devices) alike, even before the kernel has re-read a freshly written partition table.

After writing, every file is read back and compared byte for byte; for a block device
the device's buffer cache is flushed first so the comparison reads the card, not memory.
``cmdline.txt`` loses any stale ``ds=nocloud...`` token (it would pin an old instance-id
and a re-seeded card would never run cloud-init again) and stays exactly one line.
``config.txt`` gets the role's firmware settings (``config_lines``, e.g. ``dtparam=i2c_arm=on`` for a sensor
node), appended under ``[all]`` unless already in effect for every board; nothing else in it changes.

    part = find_boot_partition("/dev/sdb")
    result = write_seed("/dev/sdb", seed)      # {"partition": ..., "files": {...}, ...}
    seed = read_seed("red01.img")              # Seed or None
"""

import fcntl
import hashlib
import logging
import os
import re
import stat
import struct
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pibake.errors import BootPartitionError
from pibake.model import Seed
from pibake.run import run

LOG = logging.getLogger(__name__)

SEED_FILES = ("user-data", "meta-data", "network-config")
CMDLINE = "cmdline.txt"
CONFIG_TXT = "config.txt"

# MBR partition types that hold FAT: FAT12, FAT16 <32M, FAT16, FAT32 CHS, FAT32 LBA, FAT16 LBA, EFI.
MBR_FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E, 0xEF}
MBR_EXTENDED_TYPES = {0x05, 0x0F, 0x85}
GPT_FAT_TYPES = {
    uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),  # EFI system partition
    uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),  # Microsoft basic data
}
BLKSSZGET = 0x1268  # logical sector size of a block device
BLKFLSBUF = 0x1261  # flush a block device's buffer cache

# A stale NoCloud selector on the kernel command line: ds=nocloud;i=..., ds=nocloud-net;s=..., quoted forms.
_DS_TOKEN = re.compile(r"""ds=["']?nocloud(?:-net)?(?:[;"'].*)?""")


@dataclass(frozen=True)
class BootPartition:
    """The FAT partition that carries the seed. Offsets in bytes."""

    target: str
    number: int  # 1-based partition number
    offset: int
    size: int
    scheme: str  # "dos" or "gpt"
    type: str  # "0x0c" or a GPT type GUID
    fat: str  # "FAT32", "FAT16", "FAT12"
    disk_id: str  # MBR disk identifier (8 hex digits) or GPT disk GUID
    partuuid: str  # what root=PARTUUID= / fstab would name it
    is_block_device: bool = False

    def as_dict(self):
        return asdict(self)


# --------------------------------------------------------------------------- partition table


def _is_block_device(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        raise BootPartitionError(f"{path} does not exist") from None


def _sector_size(fd, is_block):
    if not is_block:
        return 512
    buf = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
    return struct.unpack("i", buf)[0] or 512


def _read_at(fd, offset, length):
    return os.pread(fd, length, offset)


def _fat_kind(boot_sector):
    """'FAT32'/'FAT16'/'FAT12' if ``boot_sector`` is a FAT boot sector, else None."""
    if len(boot_sector) < 512 or boot_sector[510:512] != b"\x55\xaa":
        return None
    bytes_per_sector = struct.unpack_from("<H", boot_sector, 11)[0]
    if bytes_per_sector not in (512, 1024, 2048, 4096) or boot_sector[13] == 0:
        return None
    if boot_sector[82:87] == b"FAT32":
        return "FAT32"
    if boot_sector[54:59] in (b"FAT16", b"FAT12"):
        return boot_sector[54:59].decode()
    return None


def _mbr_entries(mbr):
    for i in range(4):
        entry = mbr[446 + 16 * i: 446 + 16 * (i + 1)]
        ptype = entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if ptype and count:
            yield i + 1, ptype, start, count


def partitions(target):
    """Every partition of ``target`` (image file or block device) as a list of dicts, from its own table."""
    target = str(target)
    is_block = _is_block_device(target)
    try:
        fd = os.open(target, os.O_RDONLY)
    except OSError as exc:
        raise BootPartitionError(f"cannot read {target}: {exc.strerror}") from None
    try:
        sector = _sector_size(fd, is_block)
        mbr = _read_at(fd, 0, 512)
        if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
            raise BootPartitionError(f"{target} has no partition table (no MBR signature): is it a disk image?")
        entries = list(_mbr_entries(mbr))
        if any(ptype == 0xEE for _, ptype, _, _ in entries):
            return _gpt_partitions(fd, target, sector, is_block)
        disk_id = f"{struct.unpack_from('<I', mbr, 440)[0]:08x}"
        result = []
        for number, ptype, start, count in entries:
            if ptype in MBR_EXTENDED_TYPES:
                continue  # a Pi's boot partition is always primary
            result.append({
                "number": number, "offset": start * sector, "size": count * sector, "scheme": "dos",
                "type": f"0x{ptype:02x}", "fat_type": ptype in MBR_FAT_TYPES, "disk_id": disk_id,
                "partuuid": f"{disk_id}-{number:02d}",
            })
        return _with_fat_kind(fd, result, target, is_block)
    finally:
        os.close(fd)


def _gpt_partitions(fd, target, sector, is_block):
    header = None
    for size in dict.fromkeys((sector, 512, 4096)):
        candidate = _read_at(fd, size, 92)
        if candidate[:8] == b"EFI PART":
            header, sector = candidate, size
            break
    if header is None:
        raise BootPartitionError(f"{target} has a protective MBR but no GPT header")
    disk_guid = uuid.UUID(bytes_le=header[56:72])
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    table = _read_at(fd, entries_lba * sector, count * entry_size)
    result = []
    for i in range(count):
        entry = table[i * entry_size: (i + 1) * entry_size]
        if len(entry) < 56 or entry[:16] == b"\0" * 16:
            continue
        type_guid = uuid.UUID(bytes_le=entry[:16])
        part_guid = uuid.UUID(bytes_le=entry[16:32])
        first, last = struct.unpack_from("<QQ", entry, 32)
        result.append({
            "number": i + 1, "offset": first * sector, "size": (last - first + 1) * sector, "scheme": "gpt",
            "type": str(type_guid), "fat_type": type_guid in GPT_FAT_TYPES, "disk_id": str(disk_guid),
            "partuuid": str(part_guid),
        })
    return _with_fat_kind(fd, result, target, is_block)


def _with_fat_kind(fd, parts, target, is_block):
    out = []
    for part in parts:
        part.pop("fd", None)
        part["fat"] = _fat_kind(_read_at(fd, part["offset"], 512))
        part["target"] = target
        part["is_block_device"] = is_block
        out.append(part)
    return out


def find_boot_partition(target):
    """The FAT boot partition of ``target``: the first partition typed FAT that holds a FAT filesystem."""
    parts = partitions(target)
    candidates = [p for p in parts if p["fat"] and p["fat_type"]] or [p for p in parts if p["fat"]]
    if not candidates:
        kinds = ", ".join(f"{p['number']}:{p['type']}" for p in parts) or "none"
        raise BootPartitionError(
            f"{target} has no FAT boot partition (partitions: {kinds}): is this a Raspberry Pi image?")
    p = candidates[0]
    return BootPartition(target=p["target"], number=p["number"], offset=p["offset"], size=p["size"],
                         scheme=p["scheme"], type=p["type"], fat=p["fat"], disk_id=p["disk_id"],
                         partuuid=p["partuuid"], is_block_device=p["is_block_device"])


# --------------------------------------------------------------------------- FAT files via mtools


def _mtools_env():
    env = dict(os.environ)
    env["MTOOLS_SKIP_CHECK"] = "1"
    return env


def _drive(part):
    return f"{part.target}@@{part.offset}"


def flush_block_device(path):
    """Flush a block device's buffer cache so the next read comes from the medium."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


def list_files(part, folder=""):
    """Names in a folder (default: the root) of the boot partition (folders without a trailing slash)."""
    prefix = f"::/{folder.strip('/')}/" if folder.strip("/") else "::/"
    out = run(["mdir", "-b", "-i", _drive(part), prefix], env=_mtools_env(), check=False)
    names = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith(prefix):
            names.append(line[len(prefix):].rstrip("/"))
    return names


def remove_files(part, names):
    """Delete files (paths relative to the root) from the boot partition; missing ones are ignored."""
    for name in names:
        run(["mdel", "-i", _drive(part), f"::/{name}"], env=_mtools_env(), check=False)


def read_files(part, names):
    """{name: bytes or None (absent)} read from the root of the boot partition (binary, no conversion)."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="pibake-readback-") as tmp:
        for name in names:
            dest = Path(tmp) / name.replace("/", "__")
            proc = run(["mcopy", "-n", "-i", _drive(part), f"::/{name}", dest], env=_mtools_env(), check=False)
            result[name] = dest.read_bytes() if proc.returncode == 0 and dest.exists() else None
    return result


def put_files(part, files, *, verify=True):
    """Write {name: bytes} to the boot partition (overwriting), then read back and compare.

    Returns {name: sha256 hex}. A read-back mismatch raises ``BootPartitionError``.
    """
    env = _mtools_env()
    drive = _drive(part)
    with tempfile.TemporaryDirectory(prefix="pibake-seed-") as tmp:
        folders = sorted({str(Path(n).parent) for n in files if str(Path(n).parent) != "."})
        for folder in folders:
            run(["mmd", "-D", "s", "-i", drive, f"::/{folder}"], env=env, check=False)
        for name, data in files.items():
            src = Path(tmp) / name.replace("/", "__")
            src.write_bytes(data)
            run(["mcopy", "-o", "-i", drive, src, f"::/{name}"], env=env, timeout=300)
    if part.is_block_device:
        flush_block_device(part.target)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    if verify:
        back = read_files(part, list(files))
        bad = [name for name, data in files.items() if back.get(name) != data]
        if bad:
            raise BootPartitionError(
                f"read-back of {', '.join(bad)} on {part.target} differs from what was written: "
                "the card may be failing; try another card")
    return digests


# --------------------------------------------------------------------------- cmdline.txt


def clean_cmdline(text):
    """Return (new text, removed tokens): no ``ds=nocloud...`` tokens, exactly one line ending in a newline.

    Everything else (order, spacing inside the line) is kept. Several lines are joined with one space:
    the firmware only reads the first line, so anything after it was already ignored.
    """
    lines = [ln.strip("\r") for ln in text.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    line = " ".join(ln.strip() for ln in lines) if len(lines) > 1 else (lines[0].rstrip() if lines else "")
    parts = re.split(r"(\s+)", line)  # tokens at even indexes, the whitespace between them at odd ones
    removed, kept = [], []
    for i in range(0, len(parts), 2):
        token = parts[i]
        if token and _DS_TOKEN.fullmatch(token):
            removed.append(token)
            continue
        if kept and i > 0:
            kept.append(parts[i - 1])  # the separator before a kept token, as it was
        if token or kept:
            kept.append(token)
    return "".join(kept).strip() + "\n", removed


# --------------------------------------------------------------------------- config.txt


def _section_applies_to_all(header):
    return header is None or header.strip().lower() == "[all]"


def ensure_config_lines(text, lines):
    """Return (new text, lines added): each of ``lines`` in effect on every board.

    The firmware reads config.txt top to bottom; lines under a conditional section (``[pi4]``, ``[cm5]``, ...)
    apply to some boards only, so a line counts as present only before the first section or under ``[all]``.
    Missing lines are appended under an ``[all]`` header (added when the file does not end in ``[all]``).
    Idempotent: a second call adds nothing.
    """
    section, present = None, set()
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif line and not line.startswith("#") and _section_applies_to_all(section):
            present.add(line)
    missing = [ln for ln in lines if ln not in present]
    if not missing:
        return text, []
    out = text if not text or text.endswith("\n") else text + "\n"
    if not _section_applies_to_all(section):
        out += "[all]\n"
    out += "# added by pibake burn (node role settings)\n" + "".join(ln + "\n" for ln in missing)
    return out, missing


# --------------------------------------------------------------------------- seed


def _as_bytes(text):
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def write_seed(target, seed, *, extra_files=None, verify=True, config_lines=()):
    """Write ``seed`` (a ``pibake.model.Seed``) to the boot partition of ``target`` and fix cmdline.txt.

    ``extra_files``: more {path: bytes} for the boot partition (e.g. the pibake wheel for a manager).
    ``config_lines``: config.txt lines the node's role needs (``pibake.bake.seed.ROLE_BOOT_CONFIG``).
    Returns a JSON-able dict: partition, files (sha256 each), cmdline (removed tokens), config_txt (lines
    added), verified.
    """
    part = find_boot_partition(target)
    files = {name: _as_bytes(text) for name, text in seed.files().items()}
    cmdline_info = {"present": False, "removed": [], "changed": False}
    current = read_files(part, [CMDLINE])[CMDLINE]
    if current is not None:
        new, removed = clean_cmdline(current.decode("utf-8", errors="surrogateescape"))
        new_bytes = new.encode("utf-8", errors="surrogateescape")
        cmdline_info = {"present": True, "removed": removed, "changed": new_bytes != current}
        if new_bytes != current:
            files[CMDLINE] = new_bytes
    else:
        LOG.warning("%s: boot partition has no cmdline.txt; writing the seed only", target)
    config_info = {"present": False, "added": []}
    if config_lines:
        current = read_files(part, [CONFIG_TXT])[CONFIG_TXT]
        text = "" if current is None else current.decode("utf-8", errors="surrogateescape")
        new, added = ensure_config_lines(text, config_lines)
        config_info = {"present": current is not None, "added": added}
        if added:
            files[CONFIG_TXT] = new.encode("utf-8", errors="surrogateescape")
    for name, data in (extra_files or {}).items():
        files[name] = _as_bytes(data)
    removed_files = []
    for name in extra_files or {}:
        # A new wheel replaces older ones: the manager installs whichever pibake-*.whl its glob finds last.
        folder, _, base = name.rpartition("/")
        if re.fullmatch(r"pibake-.+-py3-none-any\.whl", base):
            stale = [f"{folder}/{n}" if folder else n for n in list_files(part, folder)
                     if n != base and re.fullmatch(r"pibake-.+\.whl", n)]
            remove_files(part, stale)
            removed_files += stale
    # The manager's deps/ folder (python-kasa's wheels, bake/manager_wheels.py) is replaced whole.
    for folder in sorted({n.rpartition("/")[0] for n in extra_files or {} if n.rpartition("/")[0].endswith("/deps")}):
        stale = [f"{folder}/{n}" for n in list_files(part, folder) if f"{folder}/{n}" not in extra_files]
        remove_files(part, stale)
        removed_files += stale
    digests = put_files(part, files, verify=verify)
    LOG.info("seed %s written to %s partition %d", seed.instance_id, target, part.number)
    return {
        "target": str(target),
        "partition": part.as_dict(),
        "instance_id": seed.instance_id,
        "files": digests,
        "cmdline": cmdline_info,
        "config_txt": config_info,
        "removed_files": removed_files,
        "verified": bool(verify),
    }


def _instance_id(meta_data):
    try:
        data = yaml.safe_load(meta_data) or {}
    except yaml.YAMLError:
        return None
    if isinstance(data, dict):
        value = data.get("instance-id") or data.get("instance_id")
        return str(value) if value is not None else None
    return None


def read_seed(target):
    """The NoCloud seed on ``target``'s boot partition, or None when there is none.

    A missing file reads as empty text; ``instance_id`` comes from meta-data (None if absent).
    """
    part = find_boot_partition(target)
    files = read_files(part, list(SEED_FILES))
    if all(data is None for data in files.values()):
        return None
    text = {name: (data or b"").decode("utf-8", errors="replace") for name, data in files.items()}
    return Seed(user_data=text["user-data"], meta_data=text["meta-data"],
                network_config=text["network-config"], instance_id=_instance_id(text["meta-data"]))


def read_cmdline(target):
    """cmdline.txt of ``target``'s boot partition as text, or None."""
    part = find_boot_partition(target)
    data = read_files(part, [CMDLINE])[CMDLINE]
    return None if data is None else data.decode("utf-8", errors="replace")
