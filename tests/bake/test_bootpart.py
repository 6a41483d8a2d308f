"""Seed on the boot partition: partition tables parsed in Python, FAT written with mtools, read back."""

import hashlib
import uuid

import pytest

from pibake.bake import bootpart
from pibake.bake.bootpart import clean_cmdline
from pibake.errors import BootPartitionError
from pibake.bake.synthetic import build_pi_image
from pibake.model import Seed
from pibake.run import run
from tests.conftest import needs_program, needs_root

pytestmark = needs_program("sfdisk", "mkfs.vfat", "mke2fs", "mcopy", "mtype", "fsck.vfat", "e2fsck")

SEED = Seed(
    user_data="#cloud-config\nhostname: red01\nruncmd:\n- [echo, ünïcode]\n",
    meta_data="instance-id: red01-0001\nlocal-hostname: red01\n",
    network_config="network:\n  version: 2\n  ethernets:\n    eth0:\n      addresses: [10.1.1.11/24]\n",
    instance_id="red01-0001",
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pi.img"
    return build_pi_image(path, size="80M", boot_size="40M", cmdline_extra="ds=nocloud;i=stale-7",
                          disk_id="12345678", kernel_size=64 * 1024)


@pytest.fixture
def image(pristine, tmp_path):
    copy = tmp_path / "pi.img"
    copy.write_bytes(pristine.path.read_bytes())
    return copy


def _root_digest(path, layout):
    with open(path, "rb") as fh:
        fh.seek(layout.root_offset)
        return hashlib.sha256(fh.read(layout.root_size)).hexdigest()


def _fsck_boot(path, layout, tmp_path):
    fat = tmp_path / "boot.fat"
    with open(path, "rb") as src:
        src.seek(layout.boot_offset)
        fat.write_bytes(src.read(layout.boot_size))
    run(["fsck.vfat", "-n", fat])


@pytest.mark.parametrize("line,expected,removed", [
    ("console=tty1 root=PARTUUID=ab-02 rootwait ds=nocloud;i=old\n", "console=tty1 root=PARTUUID=ab-02 rootwait\n",
     ["ds=nocloud;i=old"]),
    ("ds=nocloud-net;s=http://10.1.1.1/ console=tty1\n", "console=tty1\n", ["ds=nocloud-net;s=http://10.1.1.1/"]),
    ('a  ds="nocloud;s=file:///boot/"  b   c\r\n', "a  b   c\n", ['ds="nocloud;s=file:///boot/"']),
    ("a ds=nocloud b ds=nocloud;i=2\n", "a b\n", ["ds=nocloud", "ds=nocloud;i=2"]),
    ("a ds=nocloudish b\n", "a ds=nocloudish b\n", []),  # not the NoCloud selector: left alone
    ("console=tty1 rootwait", "console=tty1 rootwait\n", []),  # missing newline added
    ("console=tty1\nquiet\n\n", "console=tty1 quiet\n", []),  # several lines joined into one
])
def test_clean_cmdline(line, expected, removed):
    assert clean_cmdline(line) == (expected, removed)
    again, none = clean_cmdline(expected)
    assert (again, none) == (expected, [])  # idempotent


def test_find_boot_partition_mbr(pristine):
    part = bootpart.find_boot_partition(pristine.path)
    assert (part.number, part.scheme, part.type, part.fat) == (1, "dos", "0x0c", "FAT32")
    assert part.offset == pristine.boot_offset and part.size == pristine.boot_size
    assert part.partuuid == "12345678-01" and part.is_block_device is False


@needs_program("sgdisk")
def test_find_boot_partition_gpt(pristine, tmp_path):
    """A GPT disk (e.g. a card re-partitioned by hand) works too: an EFI-typed FAT partition."""
    path = tmp_path / "gpt.img"
    path.write_bytes(pristine.path.read_bytes() + b"\0" * 1024 * 1024)  # room for the backup GPT
    run(["sgdisk", "--mbrtogpt", path])
    run(["sgdisk", "-t", "1:EF00", path])
    parts = bootpart.partitions(path)
    assert [p["scheme"] for p in parts] == ["gpt", "gpt"]
    part = bootpart.find_boot_partition(path)
    assert (part.number, part.offset, part.fat) == (1, pristine.boot_offset, "FAT32")
    assert uuid.UUID(part.type) == uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
    bootpart.write_seed(path, SEED)
    assert bootpart.read_seed(path) == SEED


def test_write_seed_reads_back_and_fixes_cmdline(image, pristine, tmp_path):
    root_before = _root_digest(image, pristine)
    assert bootpart.read_seed(image) is None
    result = bootpart.write_seed(image, SEED, extra_files={"pibake/pibake-0.0.0-py3-none-any.whl": b"PK\x03\x04wheel"})
    assert result["verified"] is True and result["instance_id"] == "red01-0001"
    assert result["cmdline"] == {"present": True, "removed": ["ds=nocloud;i=stale-7"], "changed": True}
    assert result["files"]["user-data"] == hashlib.sha256(SEED.user_data.encode()).hexdigest()
    assert bootpart.read_seed(image) == SEED
    cmdline = bootpart.read_cmdline(image)
    assert cmdline == pristine.cmdline.replace(" ds=nocloud;i=stale-7", "")
    assert cmdline.count("\n") == 1 and "ds=nocloud" not in cmdline
    part = bootpart.find_boot_partition(image)
    assert bootpart.read_files(part, ["pibake/pibake-0.0.0-py3-none-any.whl"]) == {
        "pibake/pibake-0.0.0-py3-none-any.whl": b"PK\x03\x04wheel"}
    # Everything else on the boot partition is untouched, the root partition is byte-identical.
    back = bootpart.read_files(part, ["config.txt", "kernel8.img"])
    assert back == {"config.txt": pristine.boot_files["config.txt"], "kernel8.img": pristine.boot_files["kernel8.img"]}
    assert _root_digest(image, pristine) == root_before
    _fsck_boot(image, pristine, tmp_path)
    run(["e2fsck", "-fn", f"{image}?offset={pristine.root_offset}"])

    # Writing again (a reseed) replaces the files; cmdline.txt is already clean and is left alone; a new
    # pibake wheel replaces the old one (the manager installs whichever its glob finds last).
    newer = Seed(SEED.user_data, "instance-id: red01-0002\n", SEED.network_config, "red01-0002")
    second = bootpart.write_seed(image, newer, extra_files={"pibake/pibake-0.0.1-py3-none-any.whl": b"PK new"})
    assert second["cmdline"] == {"present": True, "removed": [], "changed": False}
    assert "cmdline.txt" not in second["files"]
    assert second["removed_files"] == ["pibake/pibake-0.0.0-py3-none-any.whl"]
    assert bootpart.list_files(part, "pibake") == ["pibake-0.0.1-py3-none-any.whl"]
    assert bootpart.read_seed(image).instance_id == "red01-0002"


def test_ubuntu_default_seed_is_replaced(tmp_path):
    layout = build_pi_image(tmp_path / "u.img", size="80M", boot_size="40M", family="ubuntu", kernel_size=65536)
    before = bootpart.read_seed(layout.path)
    assert before is not None and before.instance_id is None  # Ubuntu ships a seed without instance-id
    bootpart.write_seed(layout.path, SEED)
    assert bootpart.read_seed(layout.path) == SEED


def test_readback_mismatch_is_an_error(image, monkeypatch):
    real = bootpart.read_files

    def flaky_card(part, names):
        got = real(part, names)
        if "user-data" in got:
            got["user-data"] = got["user-data"][:-1] + b"X"
        return got

    monkeypatch.setattr(bootpart, "read_files", flaky_card)
    with pytest.raises(BootPartitionError, match="read-back of user-data .* differs"):
        bootpart.write_seed(image, SEED)


def test_not_a_pi_image(tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(BootPartitionError, match="no partition table"):
        bootpart.find_boot_partition(blank)
    linux_only = tmp_path / "linux.img"
    run(["truncate", "-s", "16M", linux_only])
    run(["sfdisk", "-q", linux_only], input="label: dos\n2048,,83\n")
    with pytest.raises(BootPartitionError, match=r"no FAT boot partition \(partitions: 1:0x83\)"):
        bootpart.find_boot_partition(linux_only)
    with pytest.raises(BootPartitionError, match="does not exist"):
        bootpart.read_seed(tmp_path / "missing.img")


@needs_root()
@needs_program("losetup")
def test_write_seed_on_a_loop_device(image, pristine, tmp_path):
    dev = run(["losetup", "--find", "--show", image]).stdout.strip()
    try:
        part = bootpart.find_boot_partition(dev)
        assert part.is_block_device and part.offset == pristine.boot_offset
        result = bootpart.write_seed(dev, SEED)
        assert result["verified"] and result["cmdline"]["removed"] == ["ds=nocloud;i=stale-7"]
        assert bootpart.read_seed(dev) == SEED
    finally:
        run(["losetup", "-d", dev])
    assert bootpart.read_seed(image) == SEED  # it reached the backing file, not just a cache
    _fsck_boot(image, pristine, tmp_path)


@pytest.mark.parametrize("text,added,tail", [
    ("", ["dtparam=i2c_arm=on"], "# added by pibake burn (node role settings)\ndtparam=i2c_arm=on\n"),
    ("#dtparam=i2c_arm=on\ndtparam=audio=on", ["dtparam=i2c_arm=on"], "dtparam=audio=on\n# added by pibake"),
    ("dtparam=i2c_arm=on\n[pi4]\narm_boost=1\n", [], "arm_boost=1\n"),  # already on for every board
    ("[all]\ndtparam=i2c_arm=on\n", [], "dtparam=i2c_arm=on\n"),
    # under [cm5] it applies to a CM5 only: added again under [all]
    ("[cm5]\ndtparam=i2c_arm=on\n", ["dtparam=i2c_arm=on"], "[cm5]\ndtparam=i2c_arm=on\n[all]\n# added by pibake"),
])
def test_ensure_config_lines(text, added, tail):
    new, got = bootpart.ensure_config_lines(text, ("dtparam=i2c_arm=on",))
    assert got == added
    assert (tail in new) if added else new == text
    assert new.startswith(text.rstrip("\n"))
    assert bootpart.ensure_config_lines(new, ("dtparam=i2c_arm=on",)) == (new, [])  # idempotent


def test_sensor_config_txt_switches_i2c_on_once(image, pristine, tmp_path):
    """The firmware switches I2C on from config.txt: burn writes the role's lines, a reseed adds nothing twice,
    and the rest of the file (the image's own commented-out #dtparam=i2c_arm=on included) stays as it was."""
    result = bootpart.write_seed(image, SEED, config_lines=("dtparam=i2c_arm=on",))
    assert result["config_txt"] == {"present": True, "added": ["dtparam=i2c_arm=on"]}
    part = bootpart.find_boot_partition(image)
    config = bootpart.read_files(part, ["config.txt"])["config.txt"].decode()
    original = pristine.boot_files["config.txt"].decode()
    assert config.startswith(original) and config.count("\ndtparam=i2c_arm=on\n") == 1
    again = bootpart.write_seed(image, SEED, config_lines=("dtparam=i2c_arm=on",))
    assert again["config_txt"]["added"] == [] and "config.txt" not in again["files"]
    assert bootpart.read_files(part, ["config.txt"])["config.txt"].decode() == config
    _fsck_boot(image, pristine, tmp_path)
