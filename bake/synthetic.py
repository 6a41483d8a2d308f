"""Build Raspberry-Pi-like disk images without mounting anything (for tests, the lab and benchmarks).

The layout copies Raspberry Pi OS (and Ubuntu for Pi): a DOS partition table, a FAT32
boot partition (type ``c``) starting at sector 8192 and an ext4 root partition (type
``83``) right after it. The boot partition carries what a real one does: a one-line
``cmdline.txt`` naming the root partition by PARTUUID, a ``config.txt``, kernels,
device trees and firmware blobs (filled with pseudo-random bytes so a writer cannot
cheat by skipping zeros). Ubuntu images also ship default ``user-data``/``meta-data``/
``network-config`` on ``system-boot``, as the real ones do.

Recipe (see shared/LAB.md): ``truncate``, ``sfdisk``, ``mkfs.vfat -F 32 -s 1 --offset``,
``mke2fs -t ext4 -E offset= -d DIR``, mtools ``mcopy -i IMG@@OFFSET``. No root needed.

    layout = build_pi_image("pi.img", size="128M")
    layout.boot_offset  # byte offset of the FAT partition
"""

import logging
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pibake.errors import PibakeError
from pibake.model import FAMILIES
from pibake.run import run

LOG = logging.getLogger(__name__)

SECTOR = 512
BOOT_START = 8192  # sectors: 4 MiB, what Raspberry Pi OS and Ubuntu use
MIB = 1024 * 1024
# FAT32 needs at least 65525 clusters; with 512-byte clusters (-s 1) that is ~32 MiB + FATs.
MIN_BOOT_SIZE = 36 * MIB
MIN_ROOT_SIZE = 8 * MIB

LABELS = {"raspios": ("bootfs", "rootfs"), "ubuntu": ("system-boot", "writable")}
MOUNT_POINT = {"raspios": "/boot/firmware", "ubuntu": "/boot/firmware"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value):
    """``"128M"``, ``"2G"``, ``"512k"``, ``4096`` -> bytes (binary units: M = MiB)."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise PibakeError(f"cannot read size {value!r}: use a number of bytes or e.g. 128M, 2G")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


@dataclass(frozen=True)
class ImageLayout:
    """Where things are in a built image. Offsets and sizes in bytes unless named *_sector."""

    path: Path
    size: int
    family: str
    disk_id: str  # 8 hex digits, the MBR disk identifier
    boot_start_sector: int
    boot_sectors: int
    root_start_sector: int
    root_sectors: int
    boot_label: str
    root_label: str
    cmdline: str  # cmdline.txt as written (one line, with newline)
    boot_files: dict = field(default_factory=dict, compare=False)  # name -> bytes written

    @property
    def boot_offset(self):
        return self.boot_start_sector * SECTOR

    @property
    def boot_size(self):
        return self.boot_sectors * SECTOR

    @property
    def root_offset(self):
        return self.root_start_sector * SECTOR

    @property
    def root_size(self):
        return self.root_sectors * SECTOR

    @property
    def boot_partuuid(self):
        return f"{self.disk_id}-01"

    @property
    def root_partuuid(self):
        return f"{self.disk_id}-02"


def cmdline_for(family, root_partuuid, extra=""):
    """The one line of cmdline.txt a fresh image of ``family`` carries."""
    if family == "ubuntu":
        line = ("console=serial0,115200 multipath=off dwc_otg.lpm_enable=0 console=tty1 "
                "root=LABEL=writable rootfstype=ext4 rootwait fixrtc")
    else:
        line = (f"console=serial0,115200 console=tty1 root=PARTUUID={root_partuuid} rootfstype=ext4 "
                "fsck.repair=yes rootwait cfg80211.ieee80211_regdom=GB")
    if extra:
        line = f"{line} {extra.strip()}"
    return line + "\n"


CONFIG_TXT = """\
# For more options and information see
# http://rptl.io/configtxt
# Some settings may impact device functionality. See link above for details

# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=i2s=on
#dtparam=spi=on

# Enable audio (loads snd_bcm2835)
dtparam=audio=on

# Automatically load overlays for detected cameras
camera_auto_detect=1

# Automatically load overlays for detected DSI displays
display_auto_detect=1

# Automatically load initramfs files, if found
auto_initramfs=1

# Enable DRM VC4 V3D driver
dtoverlay=vc4-kms-v3d
max_framebuffers=2

# Don't have the firmware create an initial video= setting in cmdline.txt.
# Use the kernel's default instead.
disable_fw_kms_setup=1

# Run in 64-bit mode
arm_64bit=1

# Disable compensation for displays with overscan
disable_overscan=1

# Run as fast as firmware / board allows
arm_boost=1

[cm4]
# Enable host mode on the 2711 built-in XHCI USB controller.
# This line should be removed if the legacy DWC2 controller is required
# (e.g. for USB device mode) or if USB OTG is not required.
otg_mode=1

[cm5]
dtoverlay=dwc2,dr_mode=host

[all]
"""

UBUNTU_CONFIG_TXT = """\
[all]
kernel=vmlinuz
cmdline=cmdline.txt
initramfs initrd.img followkernel

[pi4]
max_framebuffers=2
arm_boost=1

[all]
dtparam=audio=on
dtparam=i2c_arm=on
dtparam=spi=on
disable_overscan=1
dtoverlay=vc4-kms-v3d
camera_auto_detect=1
display_auto_detect=1
arm_64bit=1
"""

# What Ubuntu for Pi ships on system-boot before anyone edits it (shortened).
UBUNTU_USER_DATA = """\
#cloud-config

# This is the user-data configuration file for cloud-init. By default this sets
# up an initial user called "ubuntu" with password "ubuntu", which must be
# changed at first login.
chpasswd:
  expire: true
  users:
  - name: ubuntu
    password: ubuntu
    type: text

ssh_pwauth: true
"""
UBUNTU_META_DATA = """\
# This is the meta-data configuration file for cloud-init. Please refer to the
# cloud-init documentation for more information:
#
# https://cloudinit.readthedocs.io/
"""
UBUNTU_NETWORK_CONFIG = """\
network:
  version: 2
  ethernets:
    eth0:
      dhcp4: true
      optional: true
"""


def _blob(name, size):
    """Deterministic pseudo-random bytes for a fake firmware/kernel file."""
    return random.Random(f"pibake-synthetic:{name}").randbytes(size)


def default_boot_files(family, cmdline, kernel_size=2 * MIB):
    """{path on the FAT partition: bytes} for a fresh image of ``family``."""
    small = max(kernel_size // 64, 4096)
    if family == "ubuntu":
        files = {
            "cmdline.txt": cmdline.encode(),
            "config.txt": UBUNTU_CONFIG_TXT.encode(),
            "vmlinuz": _blob("vmlinuz", kernel_size),
            "initrd.img": _blob("initrd.img", kernel_size),
            "bcm2711-rpi-4-b.dtb": _blob("bcm2711-rpi-4-b.dtb", small),
            "bcm2712-rpi-5-b.dtb": _blob("bcm2712-rpi-5-b.dtb", small),
            "start4.elf": _blob("start4.elf", small * 4),
            "fixup4.dat": _blob("fixup4.dat", small // 2),
            "overlays/README": b"Overlays for the Raspberry Pi kernel (synthetic image)\n",
            "user-data": UBUNTU_USER_DATA.encode(),
            "meta-data": UBUNTU_META_DATA.encode(),
            "network-config": UBUNTU_NETWORK_CONFIG.encode(),
        }
    else:
        files = {
            "cmdline.txt": cmdline.encode(),
            "config.txt": CONFIG_TXT.encode(),
            "kernel8.img": _blob("kernel8.img", kernel_size),
            "kernel_2712.img": _blob("kernel_2712.img", kernel_size),
            "initramfs8": _blob("initramfs8", kernel_size // 2),
            "bcm2711-rpi-4-b.dtb": _blob("bcm2711-rpi-4-b.dtb", small),
            "bcm2712-rpi-5-b.dtb": _blob("bcm2712-rpi-5-b.dtb", small),
            "start4.elf": _blob("start4.elf", small * 4),
            "fixup4.dat": _blob("fixup4.dat", small // 2),
            "overlays/README": b"Overlays for the Raspberry Pi kernel (synthetic image)\n",
            "issue.txt": b"Raspberry Pi reference 2025-10-01 (synthetic image built by pibake tests)\n",
        }
    return files


def _default_rootfs(root_dir, family, layout_facts):
    """A small but recognisable root tree: os-release, fstab by PARTUUID/LABEL, the firmware mount point."""
    root = Path(root_dir)
    boot_label, root_label, disk_id = layout_facts
    for sub in ("etc", "boot/firmware", "usr/bin", "var/lib/cloud", "home", "root", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if family == "ubuntu":
        os_release = 'PRETTY_NAME="Ubuntu 24.04 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\n'
        fstab = (f"LABEL={root_label}\t/\text4\tdiscard,errors=remount-ro\t0 1\n"
                 f"LABEL={boot_label}\t/boot/firmware\tvfat\tdefaults\t0 1\n")
    else:
        os_release = ('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\n'
                      'VERSION_ID="13"\nVERSION_CODENAME=trixie\nID=debian\n')
        fstab = (f"proc            /proc           proc    defaults          0       0\n"
                 f"PARTUUID={disk_id}-01  /boot/firmware  vfat    defaults          0       2\n"
                 f"PARTUUID={disk_id}-02  /               ext4    defaults,noatime  0       1\n")
    (root / "etc/os-release").write_text(os_release)
    (root / "etc/fstab").write_text(fstab)
    (root / "etc/hostname").write_text("raspberrypi\n")
    (root / "usr/bin/synthetic-tool").write_bytes(_blob("synthetic-tool", 256 * 1024))
    (root / "tmp").chmod(0o1777)


def _mtools_env():
    env = dict(os.environ)
    env["MTOOLS_SKIP_CHECK"] = "1"  # images are not floppies: no geometry complaints
    env.setdefault("MTOOLS_NO_VFAT", "0")
    return env


def fat_put(image, offset, files):
    """Copy {name: bytes} into the FAT filesystem at byte ``offset`` of ``image`` (creating folders)."""
    env = _mtools_env()
    target = f"{image}@@{offset}"
    with tempfile.TemporaryDirectory(prefix="pibake-fat-") as tmp:
        dirs = sorted({str(Path(n).parent) for n in files if str(Path(n).parent) != "."},
                      key=lambda d: d.count("/"))
        for d in dirs:
            run(["mmd", "-D", "s", "-i", target, f"::/{d}"], env=env, check=False)
        for name, data in files.items():
            src = Path(tmp) / name.replace("/", "__")
            src.write_bytes(data)
            run(["mcopy", "-o", "-i", target, src, f"::/{name}"], env=env)


def build_pi_image(path, *, rootfs_dir=None, size="128M", boot_size="48M", boot_files=None,
                   family="raspios", disk_id=None, cmdline_extra="", kernel_size=2 * MIB):
    """Build a Raspberry-Pi-like disk image at ``path``; return its ``ImageLayout``.

    ``rootfs_dir``: tree copied into the ext4 root (default: a small synthetic tree).
    ``boot_files``: {name: bytes|str} added to (or replacing) the default boot files;
    a value ``None`` removes a default file. ``cmdline_extra`` is appended to cmdline.txt
    (e.g. a stale ``ds=nocloud;i=old`` token, to test that burning removes it).
    ``disk_id``: 8 hex digits for the MBR disk identifier (default: random).
    """
    if family not in FAMILIES:
        raise PibakeError(f"unknown image family {family!r}: use one of {', '.join(FAMILIES)}")
    path = Path(path)
    size, boot_bytes = parse_size(size), parse_size(boot_size)
    if boot_bytes < MIN_BOOT_SIZE:
        raise PibakeError(f"boot_size {boot_bytes} is too small for FAT32: use at least {MIN_BOOT_SIZE // MIB}M")
    boot_sectors = boot_bytes // SECTOR
    root_start = BOOT_START + boot_sectors
    root_start = -(-root_start // 2048) * 2048  # MiB-aligned like real images
    total_sectors = size // SECTOR
    root_sectors = total_sectors - root_start
    if root_sectors * SECTOR < MIN_ROOT_SIZE:
        raise PibakeError(f"size {size} leaves no room for a root partition after a {boot_bytes}-byte boot partition")
    disk_id = (disk_id or os.urandom(4).hex()).lower()
    if not re.fullmatch(r"[0-9a-f]{8}", disk_id):
        raise PibakeError(f"disk_id {disk_id!r} must be 8 hex digits")
    boot_label, root_label = LABELS[family]
    cmdline = cmdline_for(family, f"{disk_id}-02", cmdline_extra)

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    run(["truncate", "-s", str(total_sectors * SECTOR), path])
    table = (f"label: dos\nlabel-id: 0x{disk_id}\nunit: sectors\n\n"
             f"start={BOOT_START}, size={boot_sectors}, type=c\n"
             f"start={root_start}, size={root_sectors}, type=83\n")
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", path], input=table)
    run(["mkfs.vfat", "-F", "32", "-s", "1", "-n", boot_label, "--offset", str(BOOT_START),
         path, str(boot_sectors // 2)])

    with tempfile.TemporaryDirectory(prefix="pibake-rootfs-") as tmp:
        if rootfs_dir is None:
            _default_rootfs(tmp, family, (boot_label, root_label, disk_id))
            rootfs_dir = tmp
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", root_label, "-E", f"offset={root_start * SECTOR}",
             "-d", rootfs_dir, path, f"{root_sectors * SECTOR // 1024}k"], timeout=600)

    files = default_boot_files(family, cmdline, kernel_size)
    for name, data in (boot_files or {}).items():
        if data is None:
            files.pop(name, None)
        else:
            files[name] = data.encode() if isinstance(data, str) else bytes(data)
    fat_put(path, BOOT_START * SECTOR, files)
    layout = ImageLayout(
        path=path, size=total_sectors * SECTOR, family=family, disk_id=disk_id,
        boot_start_sector=BOOT_START, boot_sectors=boot_sectors,
        root_start_sector=root_start, root_sectors=root_sectors,
        boot_label=boot_label, root_label=root_label,
        cmdline=files.get("cmdline.txt", b"").decode(), boot_files=files,
    )
    LOG.info("built synthetic %s image %s (%d bytes, boot at %d)", family, path, layout.size, layout.boot_offset)
    return layout
