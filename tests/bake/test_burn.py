"""Burning (API level): real images, real loop devices, the real writer, guard, seed renderer and mtools."""

import hashlib
import http.server
import json
import lzma
import os
import threading
import zipfile
from pathlib import Path

import pytest

from pibake.bake import bootpart, burn, manifest
from pibake.bake.burn import next_card_verdict, output_paths, rounds
from pibake.errors import BurnError
from pibake.bake.devices import CardIdentity
from pibake.bake.synthetic import build_pi_image
from pibake.errors import PibakeError, PlanError, SeedError
from pibake.model import PlannedNode
from pibake.run import run
from tests.bake.burnkit import check_filesystems, loop_device, random_file, region_sha256
from tests.conftest import needs_program, needs_root

pytestmark = needs_program("sfdisk", "mkfs.vfat", "mke2fs", "mcopy", "fsck.vfat", "e2fsck", "ssh-keygen")
loops = [needs_root("loop devices need root"), needs_program("losetup")]
MIB = 1 << 20


@pytest.fixture(scope="module")
def pi(tmp_path_factory):
    """A Raspberry-Pi-OS-like image with a stale ds=nocloud token in cmdline.txt."""
    path = tmp_path_factory.mktemp("image") / "raspios.img"
    return build_pi_image(path, size="96M", boot_size="40M", cmdline_extra="ds=nocloud;i=stale-7",
                          kernel_size=MIB)


@pytest.fixture
def cluster(make_cluster, tmp_path):
    return make_cluster(tmp_path / "cluster")


def _root_file(path, offset, name):
    import subprocess

    return subprocess.run(["debugfs", "-R", f"cat {name}", f"{path}?offset={offset}"], capture_output=True,
                          check=True).stdout


def _assert_burned(path, layout, result, tmp_path):
    """What every burned card/file must show: seed equal, filesystems clean, cmdline one clean line."""
    seed = bootpart.read_seed(path)
    assert seed.instance_id == result.instance_id
    for name, text in seed.files().items():
        assert hashlib.sha256(text.encode()).hexdigest() == result.seed["files"][name]
    assert f"local-hostname: {result.hostname}" in seed.meta_data
    cmdline = bootpart.read_cmdline(path)
    assert cmdline.count("\n") == 1 and cmdline.endswith("\n") and "ds=nocloud" not in cmdline
    assert cmdline == layout.cmdline.replace(" ds=nocloud;i=stale-7", "")
    check_filesystems(path, tmp_path)
    if result.target_kind == "file":  # a file: the root file system is the image's, byte for byte
        assert region_sha256(path, layout.root_offset, layout.root_size) == \
            region_sha256(layout.path, layout.root_offset, layout.root_size)
    else:  # a card keeps old bytes in blocks the image does not use (sparse write): its files are the image's
        for name in ("/etc/fstab", "/etc/os-release", "/usr/bin/synthetic-tool"):
            assert _root_file(path, layout.root_offset, name) == _root_file(layout.path, layout.root_offset, name)


# ---------------------------------------------------------------- pure decisions


def test_output_paths_and_rounds():
    nodes = [PlannedNode("red01", "10.1.1.11"), PlannedNode("red02", "10.1.1.12", "sensor")]
    assert output_paths("out/{hostname}-{role}.img", nodes) == {"red01": "out/red01-worker.img",
                                                                "red02": "out/red02-sensor.img"}
    with pytest.raises(BurnError, match=r"same file for several hosts: put \{hostname\}"):
        output_paths("out/card.img", nodes)
    with pytest.raises(BurnError, match=r"only \{hostname\}, \{ip\} and \{role\}"):
        output_paths("out/{serial}.img", nodes)
    assert rounds(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert rounds(list("abc"), 1) == [["a"], ["b"], ["c"]]


def card(serial="000000001206", disk_id="5e3da3da", size=31914983424, mmc=False):
    return CardIdentity(path="/dev/sdb", model="STORAGE DEVICE", serial=serial, size=size, disk_id=disk_id,
                        serial_identifies_card=mmc)


@pytest.mark.parametrize("burned,now,iid,verdict", [
    # nothing in the reader
    ([], None, None, "absent"),
    ([(card(), "pibake-1")], card(size=0), None, "absent"),
    # a USB reader: same reader serial for every card; the seed we wrote tells the card we just burned
    ([(card(), "pibake-1")], card(), "pibake-1", "same"),
    ([(card(), "pibake-1")], card(), "pibake-0-from-last-week", "new"),  # same image, same disk id, other seed
    ([(card(), "pibake-1")], card(disk_id=None), None, "new"),  # a blank card
    ([(card(), "pibake-1"), (card(), "pibake-2")], card(), "pibake-1", "same"),  # any card of this batch
    # an mmc slot reports the card's own serial: that decides
    ([(card("0x1a2b", mmc=True), "pibake-1")], card("0x1a2b", mmc=True), None, "same"),
    ([(card("0x1a2b", mmc=True), "pibake-1")], card("0x9999", mmc=True), None, "new"),
])
def test_next_card_verdict(burned, now, iid, verdict):
    entries = [{"identity": ident, "instance_id": i} for ident, i in burned]
    assert next_card_verdict(entries, now, iid)[0] == verdict


def test_wait_for_next_card_asks_until_a_new_card_is_in():
    """Recorded facts of a session: reader empty, then the old card put back, then a new card."""
    burned = [{"identity": card(), "instance_id": "pibake-1"}]
    facts = iter([(None, None), (card(), "pibake-1"), (card(disk_id="0badcafe"), None)])
    asked = []
    got = burn.wait_for_next_card("/dev/sdb", "red02", burned, ask=asked.append, probe=lambda dev: next(facts))
    assert got.disk_id == "0badcafe"
    assert asked[0] == "Insert the card for red02 into /dev/sdb, then press Enter"
    assert asked[1].startswith("no card in the reader in /dev/sdb")
    assert asked[2].startswith("this is the card just burned (it carries seed pibake-1)")
    assert len(asked) == 3


def test_wait_for_next_card_lets_the_person_fix_a_refused_card():
    from pibake.errors import GuardError

    answers = iter([GuardError("refusing to write /dev/sdb (STORAGE DEVICE, 31.9 GB): it has mounted partitions "
                               "(/media/pi/bootfs)"), (card(disk_id="0badcafe"), None)])

    def probe(dev):
        got = next(answers)
        if isinstance(got, Exception):
            raise got
        return got

    asked = []
    burn.wait_for_next_card("/dev/sdb", "red02", [{"identity": card(), "instance_id": "pibake-1"}],
                            ask=asked.append, probe=probe)
    assert asked[1].startswith("refusing to write /dev/sdb") and asked[1].endswith("fix that, then press Enter")


# ---------------------------------------------------------------- image files


def test_burn_two_image_files(cluster, pi, tmp_path):
    out = tmp_path / "out"
    results = burn.burn(cluster, hostnames="red[01-02]", ips="10.1.1.[11-12]", output=f"{out}/{{hostname}}.img",
                        image=str(pi.path))
    assert [(r.hostname, r.ok, r.manifest_status) for r in results] == [("red01", True, "complete"),
                                                                       ("red02", True, "complete")]
    for r in results:
        assert r.target == str(out / f"{r.hostname}.img") and r.target_kind == "file"
        assert r.verified and r.bytes_written + r.bytes_skipped == pi.size and r.bytes_skipped > 0
        assert r.seed["cmdline"]["removed"] == ["ds=nocloud;i=stale-7"]
        _assert_burned(r.target, pi, r, tmp_path)
    assert results[0].instance_id != results[1].instance_id
    latest = manifest.latest_by_hostname(cluster)
    assert {h: e["status"] for h, e in latest.items()} == {"red01": "complete", "red02": "complete"}
    assert latest["red01"]["written_sha256"] == results[0].written_sha256
    assert latest["red01"]["image"]["name"] == "raspios.img"
    assert "red02" in (cluster / "plan.yaml").read_text()
    json.dumps([r.to_json() for r in results])  # the --json contract is plain data


def test_xz_image_is_decompressed_once_and_burned(cluster, pi, tmp_path):
    xz = tmp_path / "raspios.img.xz"
    xz.write_bytes(lzma.compress(pi.path.read_bytes(), preset=0))
    raw_sha = hashlib.sha256(pi.path.read_bytes()).hexdigest()
    (r,) = burn.burn(cluster, hostnames="red03", ips="10.1.1.13", output=str(tmp_path / "red03.img"), image=str(xz),
                     cache_dir=tmp_path / "cache" / "images")
    assert r.ok and r.image["raw_sha256"] == raw_sha and r.image["raw_cached"] is False
    _assert_burned(r.target, pi, r, tmp_path)
    assert not list((tmp_path / "cache").rglob("*.img"))  # sha256 unknown: nothing kept

    # With its sha256 known the decompressed image is kept (sparse) and the next burn starts at once.
    xz_sha = hashlib.sha256(xz.read_bytes()).hexdigest()
    for host, ip, cached in (("red04", "10.1.1.14", False), ("red05", "10.1.1.15", True)):
        (r,) = burn.burn(cluster, hostnames=host, ips=ip, output=str(tmp_path / f"{host}.img"), image=str(xz),
                         sha256=xz_sha, cache_dir=tmp_path / "cache" / "images")
        assert r.ok and r.image["raw_cached"] is cached and r.image["raw_sha256"] == raw_sha
        _assert_burned(r.target, pi, r, tmp_path)
    kept = tmp_path / "cache" / "raw" / f"{xz_sha}.img"
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]
    assert kept.read_bytes() == pi.path.read_bytes()
    assert os.stat(kept).st_blocks * 512 < pi.size  # sparse


def test_truncated_xz_with_its_sha256_leaves_no_raw_cache(cluster, pi, tmp_path):
    whole = lzma.compress(pi.path.read_bytes(), preset=0)
    xz = tmp_path / "cut.img.xz"
    xz.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PibakeError, match="corrupt or truncated"):
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", output=str(tmp_path / "red01.img"), image=str(xz),
                  sha256=hashlib.sha256(xz.read_bytes()).hexdigest(), cache_dir=tmp_path / "cache" / "images")
    assert list((tmp_path / "cache" / "raw").iterdir()) == []
    assert not (tmp_path / "red01.img").exists()


# ---------------------------------------------------------------- refusals: one line, nothing written


class _OneFile(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: _OneFile(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _nothing_written(cluster, out):
    assert not out.exists()
    assert manifest.entries(cluster) == []
    assert not (cluster / "plan.yaml").exists()


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text and text
    return text


def test_refused_image_path_does_not_exist(cluster, tmp_path):
    out = tmp_path / "red01.img"
    with pytest.raises(PibakeError) as err:
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", output=str(out), image=str(tmp_path / "nope.img"))
    assert "does not exist" in _one_line(err)
    _nothing_written(cluster, out)


def test_refused_corrupted_download(cluster, pi, tmp_path, http_dir, monkeypatch):
    served, url = http_dir
    data = bytearray(pi.path.read_bytes())
    good = hashlib.sha256(data).hexdigest()
    data[pi.root_offset + 4096] ^= 0xFF  # one flipped bit on the way
    (served / "raspios.img").write_bytes(bytes(data))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "red01.img"
    with pytest.raises(PibakeError) as err:
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", output=str(out), image=f"{url}/raspios.img",
                  sha256=good, cache_dir=tmp_path / "cache")
    assert "sha256" in _one_line(err) and good in str(err.value)
    _nothing_written(cluster, out)
    left = {p.name for p in (tmp_path / "cache").glob("raspios.img*")}
    assert left <= {"raspios.img.lock"}  # the bad download is gone (only E's cache lock file stays)


def test_refused_truncated_xz(cluster, pi, tmp_path):
    whole = lzma.compress(pi.path.read_bytes(), preset=0)
    xz = tmp_path / "raspios.img.xz"
    xz.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "red01.img"
    with pytest.raises(PibakeError) as err:
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", output=str(out), image=str(xz))
    assert "corrupt or truncated" in _one_line(err)
    _nothing_written(cluster, out)


@pytest.mark.parametrize("hosts,ips,message", [
    ("red[01-03]", "10.1.1.[11-12]", "gives 3 names but --ip gives 2"),
    ("red01", "10.9.9.9", "outside the cluster network 10.1.1.0/24"),
    ("Red_01", "10.1.1.11", "Red_01"),
])
def test_refused_plan_error(cluster, pi, tmp_path, hosts, ips, message):
    out = tmp_path / "out"
    with pytest.raises(PlanError) as err:
        burn.burn(cluster, hostnames=hosts, ips=ips, output=f"{out}/{{hostname}}.img", image=str(pi.path))
    assert message in _one_line(err)
    _nothing_written(cluster, out)


def test_refused_seed_lint_error(cluster, pi, tmp_path, monkeypatch):
    """cloud-init's schema (here a stricter copy given through pibake's documented override) rejects the seed."""
    from pibake.bake.lint import SCHEMA_ENV, find_cloud_init_schema

    real = find_cloud_init_schema()
    if real is None:
        pytest.skip("cloud-init's schema is not installed")
    schema = json.loads(Path(real).read_text())
    schema.setdefault("properties", {})["hostname"] = {"type": "integer"}
    strict = tmp_path / "strict-schema.json"
    strict.write_text(json.dumps(schema))
    monkeypatch.setenv(SCHEMA_ENV, str(strict))
    out = tmp_path / "out"
    with pytest.raises(SeedError) as err:
        burn.burn(cluster, hostnames="red[01-02]", ips="10.1.1.[11-12]", output=f"{out}/{{hostname}}.img",
                  image=str(pi.path))
    text = _one_line(err)
    assert text.startswith("seed lint failed, nothing written: red01: user-data: hostname")
    assert "red02:" in text
    _nothing_written(cluster, out)


def test_refused_without_a_target_or_with_both(cluster, pi, tmp_path):
    with pytest.raises(BurnError, match="say where to write"):
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", image=str(pi.path))
    with pytest.raises(BurnError, match="say where to write"):
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", image=str(pi.path), devices_=["/dev/null"],
                  output=str(tmp_path / "x.img"))
    assert manifest.entries(cluster) == []


def test_refused_output_that_is_the_image(cluster, pi, tmp_path):
    copy = tmp_path / "pi.img"
    copy.write_bytes(pi.path.read_bytes())
    with pytest.raises(BurnError, match="it is the image itself"):
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", output=str(copy), image=str(copy))
    assert manifest.entries(cluster) == []


# ---------------------------------------------------------------- manager: the pibake wheel


def test_manager_gets_the_pibake_wheel(cluster, pi, tmp_path, monkeypatch):
    """Built for real with pip from this checkout (in a copy), cached, put on the boot partition."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "red00.img"
    (r,) = burn.burn(cluster, hostnames="red00", ips="10.1.1.10", output=str(out), image=str(pi.path))
    assert r.ok and r.role == "manager"
    import pibake

    name = f"pibake/pibake-{pibake.__version__}-py3-none-any.whl"
    assert name in r.seed["files"]
    part = bootpart.find_boot_partition(out)
    wheel = bootpart.read_files(part, [name])[name]
    whl = tmp_path / "got.whl"
    whl.write_bytes(wheel)
    names = zipfile.ZipFile(whl).namelist()
    assert "pibake/cli/burn_cmd.py" in names and "pibake/bake/burn.py" in names and "pibake/firstboot/agent.py" in names
    cached = list((tmp_path / "cache" / "pibake" / "wheels").glob("*/pibake-*.whl"))
    assert len(cached) == 1 and cached[0].read_bytes() == wheel
    _assert_burned(out, pi, r, tmp_path)


def test_manager_wheel_is_cached_per_source_state(tmp_path, monkeypatch):
    """A frozen copy of the checkout (other work goes on in the real one): built once, then from the cache."""
    import shutil

    root = Path(burn.__file__).resolve().parent.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in burn._SOURCE_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, src / name)
    for part in burn._SOURCE_PARTS:
        shutil.copytree(root / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    first = burn.manager_wheel(source=src, cache_dir=tmp_path / "wheels")
    assert first.parent.parent == tmp_path / "wheels" and zipfile.is_zipfile(first)
    assert not (src / "build").exists()  # built in a scratch copy: the checkout stays clean

    def no_build(*args, **kwargs):
        raise AssertionError("built again although the sources did not change")

    monkeypatch.setattr(burn, "run", no_build)
    assert burn.manager_wheel(source=src, cache_dir=tmp_path / "wheels") == first
    (src / "pibake" / "cli" / "extra_module.py").write_text("# a change\n")
    with pytest.raises(AssertionError, match="built again"):
        burn.manager_wheel(source=src, cache_dir=tmp_path / "wheels")
    # Old builds are pruned: only the newest few stay.
    for i in range(6):
        old = tmp_path / "wheels" / f"old{i}"
        old.mkdir()
        os.utime(old, (1000 + i, 1000 + i))
    burn._prune_wheel_cache(tmp_path / "wheels", keep=first.parent)
    assert sorted(d.name for d in (tmp_path / "wheels").iterdir()) == sorted(
        [first.parent.name, "old5", "old4", "old3"])


def test_manager_wheel_given_and_refused(cluster, pi, tmp_path):
    bad = tmp_path / "something.zip"
    bad.write_bytes(b"PK")
    with pytest.raises(BurnError, match="pibake-<version>-py3-none-any.whl"):
        burn.burn(cluster, hostnames="red00", ips="10.1.1.10", output=str(tmp_path / "m.img"), image=str(pi.path),
                  wheel=bad)
    good = tmp_path / "pibake-9.9.9-py3-none-any.whl"
    good.write_bytes(b"PK\x05\x06" + bytes(18))
    (r,) = burn.burn(cluster, hostnames="red00", ips="10.1.1.10", output=str(tmp_path / "m.img"), image=str(pi.path),
                     wheel=good)
    assert r.seed["files"]["pibake/pibake-9.9.9-py3-none-any.whl"] == hashlib.sha256(good.read_bytes()).hexdigest()


# ---------------------------------------------------------------- reseed


def test_reseed_changes_only_the_seed(cluster, pi, tmp_path):
    out = tmp_path / "red01.img"
    (first,) = burn.burn(cluster, hostnames="red01", ips="10.1.1.11", output=str(out), image=str(pi.path))
    root_before = region_sha256(out, pi.root_offset, pi.root_size)
    kernel_before = bootpart.read_files(bootpart.find_boot_partition(out), ["kernel8.img", "config.txt"])
    result = burn.reseed(cluster, image_file=str(out), hostname="red01", ip="10.1.1.11")
    assert result.ok and result.action == "reseed" and result.instance_id != first.instance_id
    assert result.seed["previous_instance_id"] == first.instance_id
    assert bootpart.read_seed(out).instance_id == result.instance_id
    assert region_sha256(out, pi.root_offset, pi.root_size) == root_before
    assert bootpart.read_files(bootpart.find_boot_partition(out), ["kernel8.img", "config.txt"]) == kernel_before
    check_filesystems(out, tmp_path)
    entries = manifest.entries(cluster)
    assert [(e["action"], e["status"]) for e in entries] == [("burn", "complete"), ("reseed", "complete")]
    assert manifest.latest_by_hostname(cluster)["red01"]["instance_id"] == result.instance_id
    with pytest.raises(BurnError, match="does not exist"):
        burn.reseed(cluster, image_file=str(tmp_path / "missing.img"), hostname="red01", ip="10.1.1.11")
    with pytest.raises(BurnError, match="one of them"):
        burn.reseed(cluster, hostname="red01", ip="10.1.1.11")


def test_reseed_detects_ubuntu(cluster, tmp_path):
    ubuntu = build_pi_image(tmp_path / "ubuntu.img", size="80M", boot_size="40M", family="ubuntu",
                            kernel_size=256 * 1024)
    assert burn.detect_family(ubuntu.path, "raspios") == "ubuntu"
    result = burn.reseed(cluster, image_file=str(ubuntu.path), hostname="red05", ip="10.1.1.15")
    seed = bootpart.read_seed(ubuntu.path)
    assert seed.instance_id == result.instance_id and "#cloud-config" in seed.user_data


# ---------------------------------------------------------------- cards (loop devices)


def _apply(marks):
    def deco(f):
        for m in marks:
            f = m(f)
        return f
    return deco


@_apply(loops)
def test_burn_a_loop_device_full_of_random_bytes(cluster, pi, tmp_path):
    backing = random_file(tmp_path / "card.bin", 128 * MIB)
    questions = []
    with loop_device(backing) as dev:
        with pytest.raises(PibakeError, match="not a removable disk"):
            burn.burn(cluster, hostnames="red01", ips="10.1.1.11", devices_=[dev], image=str(pi.path))
        assert manifest.entries(cluster) == []
        (r,) = burn.burn(cluster, hostnames="red01", ips="10.1.1.11", devices_=[dev], image=str(pi.path),
                         allow_non_removable=True, confirm=lambda q: questions.append(q) or True)
        assert r.ok and r.target == dev and r.target_kind == "block" and r.verified
        assert r.card["size"] == 128 * MIB
        _assert_burned(dev, pi, r, tmp_path)
    _assert_burned(backing, pi, r, tmp_path)  # it is on the "card", not only in a cache
    assert len(questions) == 1 and "About to ERASE" in questions[0] and "Burn red01 (10.1.1.11)" in questions[0]
    assert "128" in questions[0] or "134.2 MB" in questions[0]


@_apply(loops)
def test_not_confirmed_writes_nothing(cluster, pi, tmp_path):
    backing = random_file(tmp_path / "card.bin", 128 * MIB)
    before = region_sha256(backing, 0, 128 * MIB)
    with loop_device(backing) as dev:
        with pytest.raises(BurnError, match="not confirmed: nothing written"):
            burn.burn(cluster, hostnames="red01", ips="10.1.1.11", devices_=[dev], image=str(pi.path),
                      allow_non_removable=True, confirm=lambda q: False)
    assert region_sha256(backing, 0, 128 * MIB) == before
    assert manifest.entries(cluster) == []


@_apply(loops)
def test_parallel_cards(cluster, pi, tmp_path):
    a, b = random_file(tmp_path / "a.bin", 112 * MIB, 1), random_file(tmp_path / "b.bin", 128 * MIB, 2)
    with loop_device(a) as dev_a, loop_device(b) as dev_b:
        results = burn.burn(cluster, hostnames="red[01-02]", ips="10.1.1.[11-12]", devices_=[dev_a, dev_b],
                            image=str(pi.path), allow_non_removable=True)
    assert [(r.hostname, r.target, r.ok) for r in results] == [("red01", dev_a, True), ("red02", dev_b, True)]
    for backing, r in zip((a, b), results):
        _assert_burned(backing, pi, r, tmp_path)
    assert {e["status"] for e in manifest.entries(cluster)} == {"complete"}


@_apply(loops)
def test_batch_on_one_reader_waits_for_a_different_card(cluster, pi, tmp_path):
    """One loop device is the reader; 'swapping the card' re-attaches it to another backing file."""
    cards = [random_file(tmp_path / f"card{i}.bin", 128 * MIB, i) for i in range(2)]
    asked = []
    with loop_device(cards[0]) as dev:
        def ask(message):
            asked.append(message)
            if len(asked) == 2:  # the first time the person forgot to swap; now they do
                run(["losetup", "-d", dev])
                run(["losetup", dev, cards[1]])

        results = burn.burn(cluster, hostnames="red[01-02]", ips="10.1.1.[11-12]", devices_=[dev],
                            image=str(pi.path), allow_non_removable=True, ask=ask)
    assert [(r.hostname, r.ok) for r in results] == [("red01", True), ("red02", True)]
    assert asked[0] == f"Insert the card for red02 into {dev}, then press Enter"
    assert asked[1].startswith(f"this is the card just burned (it carries seed {results[0].instance_id})")
    assert len(asked) == 2
    for backing, r in zip(cards, results):
        _assert_burned(backing, pi, r, tmp_path)


def test_batch_on_one_reader_needs_a_person(cluster, pi, tmp_path):
    with pytest.raises(BurnError, match="needs a card swap between burns"):
        burn.burn(cluster, hostnames="red[01-02]", ips="10.1.1.[11-12]", devices_=["/dev/sdz"], image=str(pi.path))
    with pytest.raises(BurnError, match="2 devices for 1 host"):
        burn.burn(cluster, hostnames="red01", ips="10.1.1.11", devices_=["/dev/sdy", "/dev/sdz"], image=str(pi.path))
    assert manifest.entries(cluster) == []


def test_manager_wheel_cannot_be_built_says_what_to_do(monkeypatch):
    monkeypatch.setattr(burn, "_source_tree", lambda: None)  # neither a checkout ...
    monkeypatch.setattr(burn, "_running_distribution", lambda: None)  # ... nor a pip-installed distribution
    with pytest.raises(BurnError, match=r"neither from a source checkout nor from a pip-installed .*--wheel FILE"):
        burn.manager_wheel()


@_apply(loops)
def test_batch_stopped_at_the_second_card_says_what_was_burned(cluster, pi, tmp_path):
    backing = random_file(tmp_path / "card.bin", 128 * MIB)
    answers = iter([True, False])
    with loop_device(backing) as dev:
        def ask(message):  # the next card: a blank one
            run(["losetup", "-d", dev])
            run(["losetup", dev, random_file(tmp_path / "card2.bin", 128 * MIB, 5)])

        with pytest.raises(BurnError) as err:
            burn.burn(cluster, hostnames="red[01-02]", ips="10.1.1.[11-12]", devices_=[dev], image=str(pi.path),
                      allow_non_removable=True, ask=ask, confirm=lambda q: next(answers))
    assert str(err.value) == f"not confirmed: nothing written to {dev} (burned: red01; not burned: red02)"
    assert [(e["hostname"], e["status"]) for e in manifest.entries(cluster)] == [("red01", "complete")]


def test_sensor_card_gets_i2c_in_config_txt(cluster, pi, tmp_path):
    out = tmp_path / "out"
    results = burn.burn(cluster, hostnames="red05,red06", ips="10.1.1.15,10.1.1.16", role="sensor",
                        output=f"{out}/{{hostname}}.img", image=str(pi.path))
    for r in results:
        assert r.ok and r.seed["config_txt"] == {"present": True, "added": ["dtparam=i2c_arm=on"]}
        part = bootpart.find_boot_partition(r.target)
        assert "\ndtparam=i2c_arm=on\n" in bootpart.read_files(part, ["config.txt"])["config.txt"].decode()
    worker = burn.burn(cluster, hostnames="red07", ips="10.1.1.17", output=f"{out}/{{hostname}}.img",
                       image=str(pi.path))[0]
    assert worker.seed["config_txt"] == {"present": False, "added": []}
    part = bootpart.find_boot_partition(worker.target)
    assert bootpart.read_files(part, ["config.txt"])["config.txt"] == pi.boot_files["config.txt"]


def test_board_zero_w_picks_the_armhf_image(cluster, tmp_path):
    """The cluster's image is the arm64 catalog entry; a Pi Zero W gets the armhf one, whose sha256 is not
    confirmed: burn refuses before any download or write, naming the image and --sha256."""
    out = tmp_path / "out"
    with pytest.raises(PibakeError, match="raspios-trixie-lite-armhf.*--sha256"):
        burn.burn(cluster, hostnames="red05", ips="10.1.1.15", role="sensor", board="zero-w",
                  output=f"{out}/{{hostname}}.img", cache_dir=tmp_path / "cache")
    assert not (out / "red05.img").exists()


def _set_boards(cluster, boards):
    import yaml

    path = cluster / "cluster.yaml"
    data = yaml.safe_load(path.read_text())
    data["nodes"] = {host: {"board": board} for host, board in boards.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_board_of_cluster_yaml_picks_the_image_without_board(cluster, tmp_path):
    """nodes: {red05: {board: zero-w}}: `pibake burn` without --board burns the armhf image for red05 (its
    sha256 is not confirmed: refused before any download, naming it), the cluster's image for the others."""
    _set_boards(cluster, {"red05": "zero-w", "red06": "zero2-w"})
    out = tmp_path / "out"
    with pytest.raises(PibakeError, match="raspios-trixie-lite-armhf.*--sha256"):
        burn.burn(cluster, hostnames="red05", ips="10.1.1.15", role="sensor", output=f"{out}/{{hostname}}.img",
                  cache_dir=tmp_path / "cache")
    assert not (out / "red05.img").exists()
    assert burn.boards_image(cluster, None, hostnames="red06", ips="10.1.1.16") is None  # zero2-w: arm64 as is
    assert burn.boards_image(cluster, None, hostnames="red05", ips="10.1.1.15") == "raspios-trixie-lite-armhf"
    assert burn.boards_image(cluster, "/x/pi.img", hostnames="red05", ips="10.1.1.15") == "/x/pi.img"  # a file: as is


def test_nodes_needing_two_images_are_burned_in_two_runs(cluster, tmp_path):
    _set_boards(cluster, {"red05": "zero-w"})
    out = tmp_path / "out"
    with pytest.raises(PibakeError) as err:
        burn.burn(cluster, hostnames="red05,red06", ips="10.1.1.15,10.1.1.16", output=f"{out}/{{hostname}}.img")
    assert str(err.value) == ("one burn writes one image, and the boards in cluster.yaml's nodes: need more: "
                              "red06 (no board) needs raspios-trixie-lite-arm64; red05 (zero-w) needs "
                              "raspios-trixie-lite-armhf; burn them in separate runs, or give --board")
    assert not out.exists()
