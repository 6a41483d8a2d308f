"""Devices and the wrong-disk guard: decisions on recorded lsblk/sysfs/proc fixtures, then on real loop devices."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pibake.bake import devices
from pibake.bake.devices import SystemFacts, check_target, open_target
from pibake.errors import GuardError
from tests.conftest import needs_program, needs_root, not_applicable

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "devices"


def facts(scenario):
    return SystemFacts.from_dir(FIXTURES / scenario)


def blk(majmin):
    """A stat result for a block device node with this major:minor (the node itself cannot exist here)."""
    major, minor = (int(x) for x in majmin.split(":"))
    return os.stat_result((stat.S_IFBLK | 0o660, 0, 0, 1, 0, 6, 0, 0, 0, 0), {"st_rdev": os.makedev(major, minor)})


def decide(scenario, path, majmin, **kw):
    return check_target(path, facts=facts(scenario), stat_result=blk(majmin), **kw)


# ---------------------------------------------------------------- parsing


def test_parse_swaps_and_mountinfo():
    f = facts("workstation")
    assert devices.parse_swaps(f.swaps) == ["/dev/nvme0n1p3", "/dev/sde"]
    mounts = {m["mountpoint"]: m for m in devices.parse_mountinfo(f.mountinfo)}
    assert mounts["/"]["majmin"] == "259:2" and mounts["/"]["source"] == "/dev/nvme0n1p2"
    assert mounts["/media/alice/STICK"]["fstype"] == "exfat"


def test_mountinfo_escapes_spaces():
    line = r"88 26 8:97 / /media/alice/MY\040STICK rw,relatime - exfat /dev/sdg1 rw"
    assert devices.parse_mountinfo(line)[0]["mountpoint"] == "/media/alice/MY STICK"


def test_build_devices_workstation():
    by_name = {d.name: d for d in devices.build_devices(facts("workstation"))}
    assert set(by_name) == {"loop0", "loop1", "sda", "sdb", "sdc", "sdd", "sde", "sdf", "sdg", "mmcblk0", "nvme0n1"}
    card = by_name["sdb"]
    assert (card.size, card.model, card.serial, card.transport, card.removable) == (
        31914983424, "STORAGE DEVICE", "000000001206", "usb", True)
    assert [p.path for p in card.partitions] == ["/dev/sdb1", "/dev/sdb2"]
    assert set(by_name["nvme0n1"].holds) == {"/", "/boot/efi", "swap"}
    assert by_name["sde"].holds == ("swap",)
    # the built-in slot: no RM flag, but sysfs says it holds an SD card
    slot = by_name["mmcblk0"]
    assert slot.rm is False and slot.sd_card and slot.removable and slot.transport == "mmc"
    assert slot.model == "SD card SN64G"
    # a USB disk that is hotplug but not RM still counts as removable
    assert by_name["sdc"].rm is False and by_name["sdc"].removable


def test_nested_lvm_in_luks_holds_root():
    nvme = next(d for d in devices.build_devices(facts("laptop-lvm")) if d.name == "nvme0n1")
    assert set(nvme.holds) == {"/", "/boot", "/boot/efi", "swap"}
    assert "/" in nvme.partitions[2].mountpoints  # the LUKS partition carries the LVM root


def test_old_lsblk_strings_and_singular_mountpoint():
    by_name = {d.name: d for d in devices.build_devices(facts("old-lsblk"))}
    assert by_name["sdb"].path == "/dev/sdb" and by_name["sdb"].size == 7969177600
    assert by_name["sdb"].removable and by_name["sdb"].model == "Card Reader"
    assert set(by_name["sda"].holds) == {"/", "/boot"}


def test_mountinfo_alone_marks_a_disk_in_use():
    """lsblk may miss a mount (another tool's view, a race); /proc/self/mountinfo by maj:min catches it."""
    f = facts("workstation")
    doc = json.loads(f.lsblk_json)
    for node in doc["blockdevices"]:
        for child in node.get("children", []):
            child["mountpoints"] = [None]
        node["mountpoints"] = [None]
    stripped = SystemFacts(lsblk_json=json.dumps(doc), swaps=f.swaps, mountinfo=f.mountinfo, sysfs=f.sysfs)
    by_name = {d.name: d for d in devices.build_devices(stripped)}
    assert "/" in by_name["nvme0n1"].holds and "swap" in by_name["nvme0n1"].holds
    assert by_name["sdg"].holds == ("/media/alice/STICK",)
    with pytest.raises(GuardError, match="/media/alice/STICK"):
        check_target("/dev/sdg", facts=stripped, stat_result=blk("8:96"))


def test_dev_root_in_mountinfo_found_by_majmin():
    """Older Pi images mount / from "/dev/root": only the maj:min in mountinfo ties it to mmcblk0."""
    f = facts("raspberrypi")
    doc = json.loads(f.lsblk_json)
    for node in doc["blockdevices"]:
        for child in node.get("children", []):
            child["mountpoints"] = [None]
    mountinfo = f.mountinfo.replace("/dev/mmcblk0p2", "/dev/root").replace("/dev/mmcblk0p1", "/dev/root")
    pi = SystemFacts(lsblk_json=json.dumps(doc), swaps=f.swaps, mountinfo=mountinfo, sysfs=f.sysfs)
    with pytest.raises(GuardError, match="holds /, /boot/firmware of the running system"):
        check_target("/dev/mmcblk0", facts=pi, stat_result=blk("179:0"))


# ---------------------------------------------------------------- decisions: the matrix

REFUSED = [
    # (scenario, path, maj:min, kwargs, words the one-line reason must contain)
    ("workstation", "/dev/nvme0n1", "259:0", {}, ["Samsung SSD 980 PRO 1TB", "holds", "/", "running system"]),
    ("workstation", "/dev/nvme0n1", "259:0", {"allow_non_removable": True, "max_bytes": None}, ["holds"]),
    ("workstation", "/dev/sda", "8:0", {"allow_non_removable": True, "max_bytes": None}, ["/data", "unmount"]),
    ("workstation", "/dev/sdc", "8:32", {}, ["Expansion HDD", "NAAB12CD", "larger than 256 GB", "--max-size"]),
    ("workstation", "/dev/sdd", "8:48", {}, ["SD/MMC", "size 0", "no card"]),
    ("workstation", "/dev/sde", "8:64", {"allow_non_removable": True}, ["KINGSTON", "swap"]),
    ("workstation", "/dev/sdf", "8:80", {}, ["Multi-Card", "read-only", "lock switch"]),
    ("workstation", "/dev/sdg", "8:96", {}, ["Ultra Fit", "mounted", "/media/alice/STICK"]),
    ("workstation", "/dev/loop1", "7:1", {}, ["loop device", "not a removable disk", "--allow-non-removable"]),
    ("workstation", "/dev/loop0", "7:0", {"allow_non_removable": True}, ["/snap/core22/1380"]),
    ("workstation", "/dev/sdb1", "8:17", {}, ["partition of /dev/sdb", "STORAGE DEVICE", "whole disk /dev/sdb"]),
    ("workstation", "/dev/nvme0n1p2", "259:2", {}, ["partition of /dev/nvme0n1"]),
    ("raspberrypi", "/dev/mmcblk0", "179:0", {}, ["/boot/firmware", "running system"]),
    ("raspberrypi", "/dev/zram0", "254:0", {"allow_non_removable": True}, ["swap"]),
    ("laptop-lvm", "/dev/nvme0n1", "259:0", {"allow_non_removable": True, "max_bytes": None}, ["/boot", "/"]),
    ("laptop-lvm", "/dev/mapper/vg-root", "253:1", {}, ["lvm volume of /dev/nvme0n1"]),
    ("laptop-lvm", "/dev/mmcblk1", "179:256", {}, ["not a removable disk"]),
    ("laptop-lvm", "/dev/mmcblk1boot0", "179:512", {"allow_non_removable": True}, ["read-only"]),
    ("old-lsblk", "/dev/sda", "8:0", {}, ["Samsung SSD 860", "/boot"]),
]


@pytest.mark.parametrize("scenario,path,majmin,kw,words", REFUSED, ids=[f"{r[0]}:{r[1]}" for r in REFUSED])
def test_refused(scenario, path, majmin, kw, words):
    with pytest.raises(GuardError) as info:
        decide(scenario, path, majmin, **kw)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


ALLOWED = [
    ("workstation", "/dev/sdb", "8:16", {}),
    ("workstation", "/dev/mmcblk0", "179:0", {}),
    ("workstation", "/dev/loop1", "7:1", {"allow_non_removable": True}),
    ("workstation", "/dev/sdc", "8:32", {"max_bytes": 3 * 10**12}),
    ("workstation", "/dev/sdc", "8:32", {"max_bytes": None}),
    ("raspberrypi", "/dev/sda", "8:0", {}),
    ("laptop-lvm", "/dev/mmcblk0", "179:0", {}),
    ("laptop-lvm", "/dev/mmcblk1", "179:256", {"allow_non_removable": True}),
    ("old-lsblk", "/dev/sdb", "8:16", {}),
]


@pytest.mark.parametrize("scenario,path,majmin,kw", ALLOWED, ids=[f"{r[0]}:{r[1]}" for r in ALLOWED])
def test_allowed(scenario, path, majmin, kw):
    target = decide(scenario, path, majmin, **kw)
    assert target.kind == "block" and target.path == path and target.size == target.device.size > 0


def test_device_found_by_majmin_through_a_symlink_name():
    """/dev/disk/by-id/usb-... resolves to the same maj:min: the guard decides on the device, not the name."""
    target = check_target("/dev/disk/by-id/usb-Generic_STORAGE_DEVICE_000000001206-0:0",
                          facts=facts("workstation"), stat_result=blk("8:16"))
    assert target.device.name == "sdb"


def test_cap_is_exact():
    dev = next(d for d in devices.build_devices(facts("workstation")) if d.name == "sdb")
    assert devices.refusal_reasons(dev, max_bytes=dev.size) == []
    assert devices.refusal_reasons(dev, max_bytes=dev.size - 1)


def test_describe_devices_candidates_first_and_reasons():
    reports = devices.describe_devices(facts("workstation"))
    candidates = [r.device.name for r in reports if r.candidate]
    assert candidates == ["mmcblk0", "sdb"]
    assert reports[0].candidate and not reports[-1].candidate
    by_name = {r.device.name: r for r in reports}
    assert any("swap" in reason for reason in by_name["sde"].reasons)
    # unattached loops are left out; attached ones are listed with their reason
    pi = [r.device.name for r in devices.describe_devices(facts("raspberrypi"))]
    assert "loop0" not in pi and "sda" in pi


def test_confirmation_prompt_names_model_size_serial():
    target = decide("workstation", "/dev/sdb", "8:16")
    text = devices.confirmation_prompt(target)
    for word in ("/dev/sdb", "STORAGE DEVICE", "31.9 GB", "000000001206", "USB", "ERASE"):
        assert word in text


# ---------------------------------------------------------------- non-block targets (real paths)


def test_regular_file_targets(tmp_path):
    new = check_target(tmp_path / "out.img")
    assert (new.kind, new.exists, new.size) == ("file", False, None)
    existing = tmp_path / "old.img"
    existing.write_bytes(b"x" * 10)
    assert check_target(existing).size == 10
    fd = open_target(new)
    try:
        assert stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    assert devices.confirmation_prompt(new).startswith("About to create the image file")


@pytest.mark.parametrize("make,words", [
    (lambda tmp: tmp, ["is a directory"]),
    (lambda tmp: Path("/dev/null"), ["character device"]),
    (lambda tmp: tmp / "no" / "such" / "dir" / "x.img", ["directory", "does not exist"]),
    (lambda tmp: Path("/dev/sdzz9"), ["does not exist", "pibake devices"]),
    (lambda tmp: "", ["no target given"]),
])
def test_non_targets_refused(tmp_path, make, words):
    with pytest.raises(GuardError) as info:
        check_target(make(tmp_path))
    for word in words:
        assert word in str(info.value)


def test_fifo_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(GuardError, match="neither a block device nor a regular file"):
        check_target(fifo)


def test_this_machines_system_disk_is_refused():
    """Whatever holds / here (a real disk, gathered live) is refused even with every override."""
    root_dev = os.stat("/").st_dev
    majmin = f"{os.major(root_dev)}:{os.minor(root_dev)}"
    live = devices.gather_facts()
    disk = next((d for d in devices.build_devices(live) if "/" in d.holds), None)
    if disk is None:
        pytest.skip(not_applicable(f"/ is not on a block device lsblk lists here (dev {majmin}), as in a container"))
    with pytest.raises(GuardError, match="holds .*/"):
        check_target(disk.path, allow_non_removable=True, max_bytes=None)


# ---------------------------------------------------------------- real loop devices


@pytest.fixture
def loop_device(tmp_path):
    """A real loop device over a 32 MiB ext4 image; always detached (and unmounted) afterwards."""
    image = tmp_path / "card.img"
    with open(image, "wb") as fh:
        fh.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    proc = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup does not work here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    mounts = []
    try:
        yield dev, image, mounts
    finally:
        for point in mounts:
            subprocess.run(["umount", point], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


loop_tests = [needs_root("loop devices need root"), needs_program("losetup", "mkfs.ext4")]


def _apply(marks):
    def wrap(fn):
        for mark in marks:
            fn = mark(fn)
        return fn
    return wrap


@_apply(loop_tests)
def test_loop_device_is_not_removable(loop_device):
    dev, _, _ = loop_device
    with pytest.raises(GuardError, match=f"{dev} .*not a removable disk"):
        check_target(dev)
    target = check_target(dev, allow_non_removable=True)
    assert (target.kind, target.size) == ("block", 32 << 20)
    fd = open_target(target)
    try:
        assert stat.S_ISBLK(os.fstat(fd).st_mode)
        # while we hold it with O_EXCL, nobody else can open it exclusively
        with pytest.raises(OSError):
            os.open(dev, os.O_RDWR | os.O_EXCL)
    finally:
        os.close(fd)


@_apply(loop_tests)
def test_loop_device_with_mounted_filesystem_is_refused(loop_device, tmp_path):
    dev, _, mounts = loop_device
    point = tmp_path / "mnt"
    point.mkdir()
    proc = subprocess.run(["mount", dev, str(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount ext4 here: {proc.stderr.strip()}")
    mounts.append(str(point))
    with pytest.raises(GuardError, match=f"mounted filesystems \\({point}\\)"):
        check_target(dev, allow_non_removable=True)


@_apply(loop_tests)
def test_open_target_refuses_a_device_mounted_after_the_check(loop_device, tmp_path):
    dev, _, mounts = loop_device
    target = check_target(dev, allow_non_removable=True)
    point = tmp_path / "mnt"
    point.mkdir()
    proc = subprocess.run(["mount", dev, str(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount ext4 here: {proc.stderr.strip()}")
    mounts.append(str(point))
    with pytest.raises(GuardError, match="in use"):
        open_target(target)


@_apply(loop_tests)
def test_open_target_refuses_a_device_held_open_exclusively(loop_device):
    dev, _, _ = loop_device
    target = check_target(dev, allow_non_removable=True)
    holder = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(GuardError, match="in use"):
            open_target(target)
    finally:
        os.close(holder)


@_apply(loop_tests)
def test_open_target_notices_a_size_change(loop_device):
    """The card changed between check and write (here: the loop's capacity grew): refused at open time."""
    dev, image, _ = loop_device
    target = check_target(dev, allow_non_removable=True)
    with open(image, "r+b") as fh:
        fh.truncate(48 << 20)
    subprocess.run(["losetup", "-c", dev], check=True, capture_output=True)
    with pytest.raises(GuardError, match="size changed"):
        open_target(target)


@_apply(loop_tests)
def test_open_target_rechecks_facts_on_the_open_device(loop_device):
    """open_target re-runs the decisions on fresh facts: a fact that turned bad in between refuses the write."""
    dev, _, _ = loop_device
    target = check_target(dev, allow_non_removable=True)
    live = devices.gather_facts()
    doc = json.loads(live.lsblk_json)
    for node in doc["blockdevices"]:
        if node.get("path") == dev:
            node["mountpoints"] = ["/srv/appeared"]
    changed = SystemFacts(lsblk_json=json.dumps(doc), swaps=live.swaps, mountinfo=live.mountinfo, sysfs=live.sysfs)
    with pytest.raises(GuardError, match="/srv/appeared"):
        open_target(target, facts_provider=lambda: changed)
    # and the fd was closed: we can open it exclusively ourselves now
    os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))


@_apply(loop_tests)
def test_unattached_loop_device_refused():
    proc = subprocess.run(["losetup", "--find"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("no free loop device")
    free = proc.stdout.strip()
    with pytest.raises(GuardError, match="unattached loop device|size 0"):
        check_target(free, allow_non_removable=True)


# ---------------------------------------------------------------- docs examples are tests

DOC = Path(__file__).resolve().parents[2] / "docs" / "images-and-devices.md"


def _doc_block_after(marker):
    text = DOC.read_text(encoding="utf-8")
    start = text.index(marker)
    fence = text.index("```\n", start) + 4
    return text[fence:text.index("\n```", fence)]


def test_doc_devices_output_is_what_pibake_prints():
    block = _doc_block_after("<!-- pibake devices --facts tests/fixtures/devices/workstation -->")
    out = subprocess.run([sys.executable, "-m", "pibake", "devices", "--facts", str(FIXTURES / "workstation")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.rstrip("\n") == block


def test_doc_refusal_and_prompt_lines_are_real():
    text = DOC.read_text(encoding="utf-8")
    with pytest.raises(GuardError) as info:
        decide("workstation", "/dev/sdc", "8:32")
    assert f"pibake: error: {info.value}\n" in text
    assert devices.confirmation_prompt(decide("workstation", "/dev/sdb", "8:16")) + "\n" in text


def test_cli_devices_json_and_record_round_trip(tmp_path):
    """`pibake devices --record DIR` on this machine, then the same decisions from the recorded facts."""
    live = subprocess.run([sys.executable, "-m", "pibake", "devices", "--json", "--record", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert live.returncode == 0, live.stderr
    replay = subprocess.run([sys.executable, "-m", "pibake", "devices", "--json", "--facts", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    rows = json.loads(live.stdout)
    assert rows == json.loads(replay.stdout)
    for row in rows:
        assert row["candidate"] == (not row["reasons"])
        assert {"path", "size", "model", "serial", "transport", "removable", "partitions", "mounted"} <= set(row)


@pytest.mark.parametrize("text,expected", [
    ("256G", 256 * 10**9), ("512 GB", 512 * 10**9), ("2T", 2 * 10**12), ("64GiB", 64 * 2**30),
    ("1000000", 10**6), ("1.5T", 15 * 10**11), ("none", None), ("OFF", None),
])
def test_parse_size(text, expected):
    assert devices.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12X", "-1G", "G"])
def test_parse_size_refuses(text):
    with pytest.raises(GuardError, match="cannot read the size"):
        devices.parse_size(text)


# ---------------------------------------------------------------- card identity


def test_parse_disk_id_mbr_gpt_blank():
    mbr = bytearray(4096)
    mbr[440:444] = (0x1A2B3C4D).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    assert devices.parse_disk_id(bytes(mbr)) == "1a2b3c4d"
    gpt = bytearray(mbr)
    gpt[512:520] = b"EFI PART"
    import uuid
    guid = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
    gpt[512 + 56:512 + 72] = guid.bytes_le
    assert devices.parse_disk_id(bytes(gpt)) == str(guid)
    assert devices.parse_disk_id(bytes(4096)) is None


def _identity(serial=None, size=32, disk_id=None, by_serial=False):
    return devices.CardIdentity(path="/dev/sdb", model="m", serial=serial, size=size, disk_id=disk_id,
                                serial_identifies_card=by_serial)


@pytest.mark.parametrize("a,b,expected", [
    (_identity("A", by_serial=True), _identity("A", by_serial=True, disk_id="x"), True),
    (_identity("A", by_serial=True), _identity("B", by_serial=True), False),
    (_identity("R", disk_id="11111111"), _identity("R", disk_id="22222222"), False),  # USB reader: disk id
    (_identity("R", size=32), _identity("R", size=64), False),
    (_identity("R", disk_id="11111111"), _identity("R", disk_id="11111111"), True),
    (_identity("R"), _identity("R"), None),  # two blank cards of one size in one USB reader: cannot tell
])
def test_same_card(a, b, expected):
    assert devices.same_card(a, b) is expected


@needs_root("loop devices need root")
@needs_program("losetup", "sfdisk")
def test_card_identity_of_a_loop_device(tmp_path):
    image = tmp_path / "card.img"
    with open(image, "wb") as fh:
        fh.truncate(16 << 20)
    subprocess.run(["sfdisk", "-q", str(image)], input="label: dos\nlabel-id: 0x5eed1234\nstart=2048, type=c\n",
                   text=True, check=True, capture_output=True)
    proc = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup does not work here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        ident = devices.card_identity(check_target(dev, allow_non_removable=True))
        assert (ident.disk_id, ident.size, ident.serial_identifies_card) == ("5eed1234", 16 << 20, False)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    assert devices.card_identity(check_target(image)).disk_id == "5eed1234"
