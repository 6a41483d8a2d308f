"""Block devices and the wrong-disk guard.

Facts (I/O at the edge): ``gather_facts()`` reads ``lsblk --json``, /proc/swaps, /proc/self/mountinfo and a
few /sys/block files into a ``SystemFacts``. Everything else is pure: ``parse_*`` turn recorded text into
data, ``build_devices(facts)`` gives ``Device`` records, ``refusal_reasons(device, ...)`` says why writing to a
disk would be refused, ``check_target(path, ...)`` decides for one path and raises ``GuardError``.

``open_target(target)`` is the last gate before a write: it opens a block device with O_EXCL (the kernel
refuses if anything has it mounted or exclusively open), then re-gathers the facts and re-runs every check
on the open device (same device number, same size, same serial) and returns the fd.

    from pibake.bake import devices
    target = devices.check_target("/dev/sdb")          # GuardError with a one-line reason if refused
    print(devices.confirmation_prompt(target))         # the CLI asks; --yes skips
    fd = devices.open_target(target)                   # the writer writes to fd
"""

import errno
import fcntl
import json
import logging
import os
import re
import stat
import struct
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pibake.errors import GuardError, PibakeError
from pibake.run import run

LOG = logging.getLogger(__name__)

LSBLK_COLUMNS = "NAME,PATH,SIZE,MODEL,SERIAL,TRAN,RM,HOTPLUG,TYPE,MOUNTPOINTS,FSTYPE,PKNAME,RO,MAJ:MIN"
DEFAULT_MAX_BYTES = 256 * 10**9
# Mount points whose disk is the running system.
SYSTEM_MOUNTS = ("/", "/boot", "/boot/firmware", "/boot/efi", "/usr", "/var", "/home")
SYSFS_FILES = ("removable", "ro", "size", "device/type", "device/name", "device/model", "device/vendor",
               "device/serial")

BLKGETSIZE64 = 0x80081272
BLKROGET = 0x125E


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class SystemFacts:
    """Recorded facts about this machine's block devices; every field is plain text/data so fixtures can
    hold it. ``sysfs`` maps a kernel name (``sdb``) to ``{"removable": "1", "device/type": "SD", ...}``."""

    lsblk_json: str
    swaps: str = ""
    mountinfo: str = ""
    sysfs: dict = field(default_factory=dict)

    @classmethod
    def from_dir(cls, directory):
        """Load recorded facts from a fixture directory (lsblk.json, swaps, mountinfo, sysfs.json)."""
        d = Path(directory)

        def text(name):
            p = d / name
            return p.read_text(encoding="utf-8") if p.exists() else ""

        if not (d / "lsblk.json").is_file():
            raise PibakeError(f"{d} holds no recorded device facts (lsblk.json missing)")
        sysfs = json.loads(text("sysfs.json") or "{}")
        return cls(lsblk_json=text("lsblk.json"), swaps=text("swaps"), mountinfo=text("mountinfo"), sysfs=sysfs)

    def save(self, directory):
        """Write the facts as a fixture directory (what ``from_dir`` reads): for tests and bug reports."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "lsblk.json").write_text(self.lsblk_json, encoding="utf-8")
        (d / "swaps").write_text(self.swaps, encoding="utf-8")
        (d / "mountinfo").write_text(self.mountinfo, encoding="utf-8")
        (d / "sysfs.json").write_text(json.dumps(self.sysfs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return d


@dataclass(frozen=True)
class Partition:
    name: str
    path: str
    size: int
    fstype: str | None
    mountpoints: tuple[str, ...]  # includes "[SWAP]" for active swap, and mounts of nested holders (LVM...)


@dataclass(frozen=True)
class Device:
    """A whole disk (or a loop device) as the guard sees it."""

    name: str
    path: str
    size: int
    model: str | None
    serial: str | None
    transport: str | None  # usb, sata, nvme, mmc, ... or None
    removable: bool  # the guard's view: RM, hotplug, USB, or an SD card in an mmc slot
    rm: bool  # the kernel's removable flag as lsblk/sysfs report it
    hotplug: bool
    type: str  # disk, loop, rom, ...
    read_only: bool
    majmin: str | None
    mountpoints: tuple[str, ...]  # of the disk itself (a filesystem without partition table)
    partitions: tuple[Partition, ...]
    holds: tuple[str, ...]  # what the running system has on it: "/", "/boot", "swap", or other mount points
    sd_card: bool = False  # sysfs device/type says SD (an mmc slot with a card)

    @property
    def mounted(self):
        """Every mount point on this disk or its partitions (swap as "[SWAP]")."""
        points = list(self.mountpoints)
        for part in self.partitions:
            points.extend(part.mountpoints)
        return tuple(dict.fromkeys(points))

    @property
    def label(self):
        """"/dev/sdb (Kingston SD card reader, 31.9 GB)" for messages."""
        model = self.model or ("loop device" if self.type == "loop" else "unknown model")
        return f"{self.path} ({model}, {human_size(self.size)})"

    def to_dict(self):
        data = asdict(self)
        data["mounted"] = list(self.mounted)
        data["size_human"] = human_size(self.size)
        return data


@dataclass(frozen=True)
class Target:
    """A checked write target: a whole block device or a regular output file."""

    path: str  # as resolved (symlinks like /dev/disk/by-id/... followed)
    kind: str  # "block" or "file"
    size: int | None  # bytes of the block device; for a file its current size (None if it does not exist yet)
    exists: bool
    device: Device | None = None
    rdev: int | None = None  # st_rdev of the block device, compared again at open time
    allow_non_removable: bool = False
    max_bytes: int | None = DEFAULT_MAX_BYTES

    @property
    def model(self):
        return self.device.model if self.device else None

    @property
    def serial(self):
        return self.device.serial if self.device else None

    def to_dict(self):
        return {"path": self.path, "kind": self.kind, "size": self.size, "exists": self.exists,
                "model": self.model, "serial": self.serial,
                "transport": self.device.transport if self.device else None,
                "removable": self.device.removable if self.device else None}


def human_size(n):
    if n is None:
        return "unknown size"
    for unit, div in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= div:
            return f"{n / div:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------- parsing (pure)


def _bool(value):
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    return str(value).strip() in ("1", "true", "True")


def _int(value):
    if value is None or value == "":
        return 0
    return int(value)


def _str(value):
    if value is None:
        return None
    value = " ".join(str(value).split())
    return value or None


def _mountpoints(node):
    # util-linux >= 2.37: "mountpoints": [..] (null entries when unmounted); older: "mountpoint": "x"|null
    if "mountpoints" in node:
        points = node.get("mountpoints") or []
    else:
        points = [node.get("mountpoint")]
    return tuple(p for p in points if p)


def parse_lsblk(text):
    """lsblk --json text -> list of top-level nodes, each a dict with normalised keys and ``children``
    flattened into ``descendants`` (every nested holder: partitions, LVM, crypt, md...)."""
    try:
        doc = json.loads(text or "{}")
    except ValueError as exc:
        raise PibakeError(f"cannot parse lsblk output: {exc}") from exc
    return [_node(n) for n in doc.get("blockdevices", [])]


def _node(raw):
    node = {
        "name": raw.get("name"),
        "path": raw.get("path") or f"/dev/{raw.get('name')}",
        "size": _int(raw.get("size")),
        "model": _str(raw.get("model")),
        "serial": _str(raw.get("serial")),
        "tran": _str(raw.get("tran")),
        "rm": _bool(raw.get("rm")),
        "hotplug": _bool(raw.get("hotplug")),
        "type": raw.get("type"),
        "mountpoints": _mountpoints(raw),
        "fstype": _str(raw.get("fstype")),
        "pkname": _str(raw.get("pkname")),
        "ro": _bool(raw.get("ro")),
        "majmin": _str(raw.get("maj:min")),
        "children": [_node(c) for c in raw.get("children", []) or []],
    }
    return node


def _descendants(node):
    for child in node["children"]:
        yield child
        yield from _descendants(child)


def parse_swaps(text):
    """/proc/swaps text -> list of swap device or file paths."""
    out = []
    for line in (text or "").splitlines()[1:]:
        fields = line.split()
        if fields:
            out.append(fields[0].replace("\\040", " "))
    return out


def parse_mountinfo(text):
    """/proc/self/mountinfo text -> list of {"majmin", "mountpoint", "fstype", "source"}."""
    mounts = []
    for line in (text or "").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        mounts.append({
            "majmin": fields[2],
            "mountpoint": _unescape(fields[4]),
            "fstype": rfields[0],
            "source": _unescape(rfields[1]),
        })
    return mounts


def _unescape(value):
    return value.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def build_devices(facts):
    """SystemFacts -> list of ``Device`` (whole disks and loop devices; partitions nested)."""
    nodes = parse_lsblk(facts.lsblk_json)
    swaps = set(parse_swaps(facts.swaps))
    mounts = parse_mountinfo(facts.mountinfo)
    devices = []
    for node in nodes:
        if node["type"] not in ("disk", "loop"):
            continue
        sysfs = facts.sysfs.get(node["name"], {}) or {}
        sd_card = (sysfs.get("device/type") or "").strip() == "SD"
        rm = node["rm"] or _bool(sysfs.get("removable"))
        ro = node["ro"] or _bool(sysfs.get("ro"))
        tran = node["tran"] or ("mmc" if node["name"].startswith("mmcblk") else None)
        removable = rm or node["hotplug"] or tran == "usb" or sd_card
        # what is on it: lsblk mountpoints of the disk and of every descendant, plus mountinfo and swaps
        all_nodes = [node] + list(_descendants(node))
        paths = {n["path"] for n in all_nodes}
        majmins = {n["majmin"] for n in all_nodes if n["majmin"]}
        points = []
        for n in all_nodes:
            points.extend(n["mountpoints"])
        for m in mounts:
            if m["majmin"] in majmins or m["source"] in paths:
                points.append(m["mountpoint"])
        for swap in swaps:
            if swap in paths:
                points.append("[SWAP]")
        holds = []
        for p in dict.fromkeys(points):
            if p == "[SWAP]":
                holds.append("swap")
            else:
                holds.append(p)
        partitions = []
        for child in node["children"]:
            child_points = list(child["mountpoints"])
            for sub in _descendants(child):
                child_points.extend(sub["mountpoints"])
            child_paths = {child["path"]} | {s["path"] for s in _descendants(child)}
            child_mm = {child["majmin"]} | {s["majmin"] for s in _descendants(child)}
            for m in mounts:
                if m["majmin"] in child_mm or m["source"] in child_paths:
                    child_points.append(m["mountpoint"])
            if child_paths & swaps:
                child_points.append("[SWAP]")
            partitions.append(Partition(name=child["name"], path=child["path"], size=child["size"],
                                        fstype=child["fstype"], mountpoints=tuple(dict.fromkeys(child_points))))
        own_points = list(node["mountpoints"])
        for m in mounts:
            if m["majmin"] == node["majmin"] or m["source"] == node["path"]:
                own_points.append(m["mountpoint"])
        if node["path"] in swaps:
            own_points.append("[SWAP]")
        devices.append(Device(
            name=node["name"], path=node["path"], size=node["size"],
            model=node["model"] or _str(sysfs.get("device/model")) or _mmc_model(sysfs),
            serial=node["serial"] or _str(sysfs.get("device/serial")),
            transport=tran, removable=removable, rm=rm, hotplug=node["hotplug"], type=node["type"],
            read_only=ro, majmin=node["majmin"], mountpoints=tuple(dict.fromkeys(own_points)),
            partitions=tuple(partitions), holds=tuple(holds), sd_card=sd_card,
        ))
    return devices


def _mmc_model(sysfs):
    """lsblk reports no model for mmc devices; sysfs has the card's product name (device/name)."""
    name = _str(sysfs.get("device/name"))
    kind = _str(sysfs.get("device/type"))
    if not name:
        return None
    return f"{kind} card {name}" if kind == "SD" else f"{kind or 'MMC'} {name}"


def find_partition_parent(facts, path=None, majmin=None):
    """If ``path``/``majmin`` names a partition (or any non-disk holder), return (node, parent disk node)."""
    for top in parse_lsblk(facts.lsblk_json):
        for sub in _descendants(top):
            if (path and sub["path"] == path) or (majmin and sub["majmin"] == majmin):
                return sub, top
    return None


# ---------------------------------------------------------------- decisions (pure)


def refusal_reasons(device, *, allow_non_removable=False, max_bytes=DEFAULT_MAX_BYTES):
    """Why writing to ``device`` would be refused: a list of short reasons ([] = a candidate card)."""
    reasons = []
    order = SYSTEM_MOUNTS + ("swap",)
    system = sorted((h for h in device.holds if h in order), key=order.index)
    other = [h for h in device.holds if h not in system]
    if system:
        what = ", ".join(system)
        reasons.append(f"it holds {what} of the running system")
    if other and not system:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        reasons.append(f"it has mounted filesystems ({shown}); unmount them first if this is the card")
    if device.size == 0:
        if device.type == "loop":
            reasons.append("it has size 0: no image attached to this loop device")
        else:
            reasons.append("it has size 0: no card in the reader (insert one and run again)")
    if device.read_only:
        hint = " (an SD card's lock switch? slide it to unlock)" if device.removable else ""
        reasons.append(f"it is read-only{hint}")
    if not device.removable and not allow_non_removable:
        reasons.append("it is not a removable disk (pass --allow-non-removable if you really mean it)")
    if max_bytes is not None and device.size > max_bytes:
        reasons.append(f"it is larger than {human_size(max_bytes)} (too big for an SD card; pass --max-size "
                       "to raise the cap if this really is the card)")
    return reasons


def _refuse(device, reasons):
    serial = f", serial {device.serial}" if device.serial else ""
    model = device.model or ("loop device" if device.type == "loop" else "unknown model")
    return GuardError(f"refusing to write {device.path} ({model}{serial}, "
                      f"{human_size(device.size)}): {reasons[0]}"
                      + (f" (and {len(reasons) - 1} more: see `pibake devices`)" if len(reasons) > 1 else ""))


@dataclass(frozen=True)
class DeviceReport:
    """A device and why it would be refused (``reasons`` empty: a candidate)."""

    device: Device
    reasons: tuple[str, ...]

    @property
    def candidate(self):
        return not self.reasons

    def to_dict(self):
        data = self.device.to_dict()
        data["candidate"] = self.candidate
        data["reasons"] = list(self.reasons)
        return data


def describe_devices(facts=None, *, allow_non_removable=False, max_bytes=DEFAULT_MAX_BYTES, include_empty_loops=False):
    """Every disk with its refusal reasons, candidates first. Unattached loop devices are left out."""
    facts = gather_facts() if facts is None else facts
    reports = []
    for dev in build_devices(facts):
        if dev.type == "loop" and dev.size == 0 and not include_empty_loops:
            continue
        reports.append(DeviceReport(dev, tuple(refusal_reasons(
            dev, allow_non_removable=allow_non_removable, max_bytes=max_bytes))))
    reports.sort(key=lambda r: (not r.candidate, r.device.name))
    return reports


def list_devices(facts=None):
    """Every whole disk and attached loop device on this machine, as ``Device`` records."""
    facts = gather_facts() if facts is None else facts
    return [d for d in build_devices(facts) if not (d.type == "loop" and d.size == 0)]


def check_target(path, *, allow_non_removable=False, max_bytes=DEFAULT_MAX_BYTES, facts=None, stat_result=None):
    """Decide whether ``path`` may be written; return a ``Target`` or raise ``GuardError`` (one line).

    Allowed: a regular file (existing, or new in an existing directory: the ``--output x.img`` case), or a
    whole block device that is removable (or ``allow_non_removable``), not larger than ``max_bytes``
    (None: no cap), not empty, not read-only, and holding nothing mounted, no swap, not / or /boot.
    ``facts``/``stat_result`` let tests decide on recorded data; by default they are read from this machine.
    """
    raw = str(path)
    if not raw:
        raise GuardError("no target given: pass --device /dev/sdX or --output FILE.img")
    resolved = os.path.realpath(raw)
    if stat_result is None:
        try:
            st = os.stat(resolved)
        except FileNotFoundError:
            parent = os.path.dirname(resolved) or "."
            if os.path.isdir(parent):
                if resolved.startswith("/dev/"):
                    raise GuardError(f"{raw} does not exist: no such device (is the reader plugged in? "
                                     "see `pibake devices`)") from None
                return Target(path=resolved, kind="file", size=None, exists=False, max_bytes=max_bytes,
                              allow_non_removable=allow_non_removable)
            raise GuardError(f"cannot write {raw}: the directory {parent} does not exist; create it first") from None
        except OSError as exc:
            raise GuardError(f"cannot check {raw}: {exc.strerror}") from None
    else:
        st = stat_result
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return Target(path=resolved, kind="file", size=st.st_size, exists=True, max_bytes=max_bytes,
                      allow_non_removable=allow_non_removable)
    if stat.S_ISDIR(mode):
        raise GuardError(f"refusing {raw}: it is a directory; give a file name (--output DIR/NAME.img) or a device")
    if stat.S_ISCHR(mode):
        raise GuardError(f"refusing {raw}: it is a character device, not a disk; give a whole block device "
                         "such as /dev/sdb (see `pibake devices`)")
    if not stat.S_ISBLK(mode):
        raise GuardError(f"refusing {raw}: it is neither a block device nor a regular file")
    facts = gather_facts() if facts is None else facts
    majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    devices = build_devices(facts)
    device = next((d for d in devices if d.path == resolved or (d.majmin and d.majmin == majmin)), None)
    if device is None:
        found = find_partition_parent(facts, path=resolved, majmin=majmin)
        if found:
            node, parent = found
            kind = "a partition" if node["type"] == "part" else f"a {node['type']} volume"
            raise GuardError(f"refusing {raw}: it is {kind} of {parent['path']} "
                             f"({parent['model'] or 'unknown model'}); give the whole disk {parent['path']}")
        hint = " (an unattached loop device)" if os.major(st.st_rdev) == 7 else ""
        raise GuardError(f"refusing {raw}: lsblk does not list it as a disk{hint}; give a whole disk "
                         "(see `pibake devices`)")
    reasons = refusal_reasons(device, allow_non_removable=allow_non_removable, max_bytes=max_bytes)
    if reasons:
        raise _refuse(device, reasons)
    return Target(path=device.path, kind="block", size=device.size, exists=True, device=device, rdev=st.st_rdev,
                  allow_non_removable=allow_non_removable, max_bytes=max_bytes)


def confirmation_prompt(target):
    """The question the CLI asks before writing (``--yes`` skips it): names model, size, serial."""
    if target.kind == "file":
        what = "overwrite the file" if target.exists else "create the image file"
        return f"About to {what} {target.path}. Continue?"
    d = target.device
    serial = d.serial or "no serial reported"
    tran = f", {d.transport.upper()}" if d.transport else ""
    parts = f"; it has {len(d.partitions)} partition(s)" if d.partitions else ""
    return (f"About to ERASE {d.path}: {d.model or 'unknown model'}, {human_size(d.size)}{tran}, "
            f"serial {serial}{parts}. Everything on it will be lost. Continue?")


# ---------------------------------------------------------------- I/O edge


def read_sysfs(names, root="/sys/block"):
    """{kernel name: {file: text}} for SYSFS_FILES that exist (missing files are left out)."""
    out = {}
    for name in names:
        facts = {}
        for rel in SYSFS_FILES:
            try:
                facts[rel] = Path(root, name, rel).read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                continue
        out[name] = facts
    return out


def gather_facts():
    """Read this machine's facts: lsblk JSON, /proc/swaps, /proc/self/mountinfo, /sys/block/*."""
    out = run(["lsblk", "--json", "--bytes", "-o", LSBLK_COLUMNS], timeout=30).stdout
    names = [n.get("name") for n in json.loads(out).get("blockdevices", [])]

    def text(path):
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    return SystemFacts(lsblk_json=out, swaps=text("/proc/swaps"), mountinfo=text("/proc/self/mountinfo"),
                       sysfs=read_sysfs(names))


def _ioctl_u64(fd, request):
    buf = fcntl.ioctl(fd, request, b"\0" * 8)
    return struct.unpack("Q", buf)[0]


def _ioctl_int(fd, request):
    buf = fcntl.ioctl(fd, request, b"\0" * 4)
    return struct.unpack("i", buf)[0]


def open_target(target, *, direct=False, facts_provider=None):
    """Open a checked target for writing and return the fd (read-write, so the writer can read back).

    Block device: ``O_EXCL`` (EBUSY if mounted or held), then the checks run again on the open device:
    same device number, size from the kernel (BLKGETSIZE64) equal to the checked size, not read-only
    (BLKROGET), and ``refusal_reasons`` on freshly gathered facts, serial unchanged. Regular file: created
    if missing (0644), never truncated here. ``direct`` adds O_DIRECT (the caller then needs aligned buffers).
    ``facts_provider`` replaces ``gather_facts`` (tests).
    """
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    if target.kind == "file":
        parent = os.path.dirname(target.path) or "."
        if not os.path.isdir(parent):
            raise GuardError(f"cannot write {target.path}: the directory {parent} does not exist")
        fd = os.open(target.path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise GuardError(f"refusing {target.path}: it is no longer a regular file")
        return fd
    if target.kind != "block":
        raise GuardError(f"refusing {target.path}: unknown target kind {target.kind!r}")
    try:
        fd = os.open(target.path, flags | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise GuardError(f"refusing to write {target.device.label if target.device else target.path}: it is "
                             "in use (mounted or opened by another program); unmount it and run again") from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise GuardError(f"cannot open {target.path} for writing: {exc.strerror} (read-only card, or "
                             "run as root / a member of the disk group)") from None
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENOMEDIUM):
            raise GuardError(f"{target.path} is gone or has no card: {exc.strerror}; insert the card and run "
                             "again") from None
        raise GuardError(f"cannot open {target.path}: {exc.strerror}") from None
    try:
        _recheck_open(fd, target, facts_provider or gather_facts)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _recheck_open(fd, target, facts_provider):
    st = os.fstat(fd)
    label = target.device.label if target.device else target.path
    if not stat.S_ISBLK(st.st_mode) or (target.rdev is not None and st.st_rdev != target.rdev):
        raise GuardError(f"refusing {target.path}: it is no longer the device that was checked; run again")
    size = _ioctl_u64(fd, BLKGETSIZE64)
    if size != target.size:
        raise GuardError(f"refusing {label}: its size changed to {human_size(size)} since it was checked "
                         "(card swapped?); run again")
    if size == 0:
        raise GuardError(f"refusing {label}: no card in the reader")
    if _ioctl_int(fd, BLKROGET):
        raise GuardError(f"refusing {label}: it is read-only (an SD card's lock switch? slide it to unlock)")
    fresh = check_target(target.path, allow_non_removable=target.allow_non_removable, max_bytes=target.max_bytes,
                         facts=facts_provider())
    if target.device and fresh.device and (fresh.device.serial != target.device.serial):
        raise GuardError(f"refusing {label}: its serial changed from {target.device.serial} to "
                         f"{fresh.device.serial} since it was checked (card swapped?); run again")
    LOG.info("opened %s exclusively and re-checked it", label)
    return replace(target, device=fresh.device)


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text):
    """'256G', '300 GB', '2T', '64GiB', '1000000' -> bytes (decimal units as disks are sold; KiB/MiB/GiB/TiB
    binary). 'none' (or 'off') -> None: no cap. Raises GuardError on anything else."""
    value = str(text).strip().lower()
    if value in ("none", "off", "no"):
        return None

    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in _SIZE_UNITS:
        raise GuardError(f"cannot read the size {text!r}: use e.g. 256G, 512GB, 2T, 64GiB or none")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


# ---------------------------------------------------------------- which card is in the reader


def parse_disk_id(head):
    """The partition table's disk identifier from a disk's first sectors (at least 1024 bytes for GPT):
    the GPT disk GUID, or the MBR disk signature as 8 hex digits (what ``blkid`` calls PTUUID), or None for a
    disk without a partition table (a blank card)."""
    if len(head) >= 1024 and head[512:520] == b"EFI PART":
        return str(uuid.UUID(bytes_le=bytes(head[512 + 56:512 + 72])))
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return f"{int.from_bytes(head[440:444], 'little'):08x}"
    return None


@dataclass(frozen=True)
class CardIdentity:
    """What tells one card from another in the same reader.

    A USB reader reports its own serial, the same for every card put in it; a card in a built-in mmc slot
    reports the card's serial (``serial_identifies_card``). The partition table's disk id and the size tell
    cards apart in a USB reader (two cards burned from the same image and never booted can share a disk id)."""

    path: str
    model: str | None
    serial: str | None
    size: int | None
    disk_id: str | None
    serial_identifies_card: bool

    def to_dict(self):
        return asdict(self)


def card_identity(target):
    """Read the identity of the card a checked ``Target`` points at (opens it read-only, 4 KiB)."""
    with open(target.path, "rb") as fh:
        head = fh.read(4096)
    dev = target.device
    return CardIdentity(
        path=target.path,
        model=dev.model if dev else None,
        serial=dev.serial if dev else None,
        size=target.size,
        disk_id=parse_disk_id(head),
        serial_identifies_card=bool(dev and dev.sd_card and dev.serial),
    )


def same_card(before, after):
    """True/False when two ``CardIdentity`` surely are / are not the same card; None when it cannot be told
    (a USB reader, both cards blank, same size)."""
    if before.serial_identifies_card and after.serial_identifies_card:
        return before.serial == after.serial
    if before.size != after.size or before.disk_id != after.disk_id:
        return False
    if before.disk_id is None:
        return None
    return True
