"""`pibake burn` and `pibake reseed` as a person runs them: the real CLI in a subprocess, real images,
loop devices as cards, the commands of docs/burning.md, and a burn killed in the middle of a write."""

import json
import lzma
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pibake.bake import bootpart, manifest
from pibake.errors import BootPartitionError
from pibake.bake.synthetic import build_pi_image
from tests.bake.burnkit import check_filesystems, loop_device, random_file, region_sha256
from tests.conftest import needs_program, needs_root

pytestmark = needs_program("sfdisk", "mkfs.vfat", "mke2fs", "mcopy", "fsck.vfat", "e2fsck", "ssh-keygen")
ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "burning.md"
PIBAKE = [sys.executable, "-m", "pibake"]
MIB = 1 << 20


@pytest.fixture(scope="module")
def assets(tmp_path_factory, make_cluster):
    """A Raspberry-Pi-OS-like image (+ .xz) and a cluster made by the real `init`, using that image."""
    base = tmp_path_factory.mktemp("assets")
    layout = build_pi_image(base / "raspios.img", size="96M", boot_size="40M",
                            cmdline_extra="ds=nocloud;i=stale-7", kernel_size=MIB)
    (base / "raspios.img.xz").write_bytes(lzma.compress(layout.path.read_bytes(), preset=0))
    make_cluster(base / "cluster-template", image=str(layout.path), family="raspios")
    return base, layout


@pytest.fixture
def work(assets, tmp_path, monkeypatch):
    """A working directory like a user's: cluster/, raspios.img, raspios.img.xz."""
    base, layout = assets
    shutil.copytree(base / "cluster-template", tmp_path / "cluster")
    for name in ("raspios.img", "raspios.img.xz"):
        os.symlink(base / name, tmp_path / name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(base / "cache"))  # the manager wheel is built once per session
    return tmp_path, layout


def pibake(cwd, *args, input=None, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(PIBAKE + list(args), cwd=cwd, input=input, capture_output=True, text=True,
                          env=full_env, timeout=300)


def _refused(proc):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pibake: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---------------------------------------------------------------- refusals


def test_refusals_write_nothing(work, tmp_path):
    cwd, layout = work
    good = ["--hostname", "red01", "--ip", "10.1.1.11", "--output", "out/red01.img"]
    truncated = cwd / "cut.img.xz"
    data = (cwd / "raspios.img.xz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    strict = cwd / "strict.json"
    from pibake.bake.lint import SCHEMA_ENV, find_cloud_init_schema

    schema_path = find_cloud_init_schema()
    cases = [
        (good + ["--image", "missing.img"], {}, "image file missing.img does not exist"),
        (good + ["--image", "cut.img.xz"], {}, "is corrupt or truncated"),
        (good + ["--image", "raspios.img", "--sha256", "0" * 64], {}, "sha256 mismatch"),
        (["--hostname", "red[01-02]", "--ip", "10.1.1.11", "--output", "out/{hostname}.img"], {},
         "--hostname gives 2 names but --ip gives 1"),
        (["--hostname", "red01", "--ip", "10.1.1.11"], {}, "say where to write"),
    ]
    if schema_path:
        schema = json.loads(Path(schema_path).read_text())
        schema.setdefault("properties", {})["hostname"] = {"type": "integer"}
        strict.write_text(json.dumps(schema))
        cases.append((good, {SCHEMA_ENV: str(strict)}, "seed lint failed, nothing written: red01: user-data: hostname"))
    for args, env, message in cases:
        line = _refused(pibake(cwd, "burn", *args, env=env))
        assert message in line, (args, line)
        assert not (cwd / "out").exists(), args
        assert not (cwd / "cluster" / "manifest.jsonl").exists(), args
        assert not (cwd / "cluster" / "plan.yaml").exists(), args


def test_refused_when_not_a_pi_image(work):
    cwd, _ = work
    (cwd / "blank.img").write_bytes(bytes(4 * MIB))
    proc = pibake(cwd, "reseed", "--image", "blank.img", "--hostname", "red01", "--ip", "10.1.1.11")
    assert "no partition table" in _refused(proc)


# ---------------------------------------------------------------- a burn killed mid-write


def test_killed_burn_is_incomplete_and_a_rerun_succeeds(work, tmp_path):
    cwd, layout = work
    args = ["burn", "--hostname", "red01", "--ip", "10.1.1.11", "--output", "out/red01.img", "--full"]
    env = dict(os.environ, PIBAKE_TEST_WRITE_DELAY="0.25")
    proc = subprocess.Popen(PIBAKE + args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            entries = manifest.entries(cwd / "cluster")
            if entries and entries[0]["status"] == "running" and (cwd / "out" / "red01.img").exists():
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        else:
            pytest.fail("the burn never started writing")
        time.sleep(0.3)  # inside the write (every progress step sleeps 0.25 s; a full write has ~50 steps)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    (entry,) = manifest.entries(cwd / "cluster")
    assert entry["status"] == "incomplete" and entry["hostname"] == "red01"
    assert manifest.latest_by_hostname(cwd / "cluster")["red01"]["status"] == "incomplete"
    with pytest.raises(BootPartitionError, match="no partition table"):  # a cut-short card never looks good
        bootpart.find_boot_partition(cwd / "out" / "red01.img")

    again = pibake(cwd, *args, "--json")
    assert again.returncode == 0, again.stderr
    (result,) = json.loads(again.stdout)
    assert result["manifest_status"] == "complete" and result["verified"]
    statuses = [e["status"] for e in manifest.entries(cwd / "cluster")]
    assert statuses == ["incomplete", "complete"]
    assert manifest.latest_by_hostname(cwd / "cluster")["red01"]["burn_id"] == result["burn_id"]
    assert bootpart.read_seed(cwd / "out" / "red01.img").instance_id == result["instance_id"]
    check_filesystems(cwd / "out" / "red01.img", tmp_path)


# ---------------------------------------------------------------- a card (loop device)


@needs_root("loop devices need root")
@needs_program("losetup")
def test_card_burn_prompt_and_reseed(work, tmp_path):
    cwd, layout = work
    backing = random_file(tmp_path / "card.bin", 128 * MIB)
    before = region_sha256(backing, 0, 128 * MIB)
    with loop_device(backing) as dev:
        base = ["--hostname", "red01", "--ip", "10.1.1.11", "--device", dev]
        # Not removable: refused in one line, nothing written.
        assert "not a removable disk" in _refused(pibake(cwd, "burn", *base))
        # Removable allowed, but the person says no.
        proc = pibake(cwd, "burn", *base, "--allow-non-removable", input="n\n")
        assert proc.returncode == 1 and "About to ERASE " + dev in proc.stderr
        assert "Burn red01 (10.1.1.11) on it? [y/N]" in proc.stderr
        assert "not confirmed: nothing written" in proc.stderr
        assert region_sha256(backing, 0, 128 * MIB) == before
        # --yes
        proc = pibake(cwd, "burn", *base, "--allow-non-removable", "--yes", "--json")
        assert proc.returncode == 0, proc.stderr
        (burned,) = json.loads(proc.stdout)
        assert burned["target"] == dev and burned["target_kind"] == "block" and burned["verified"]
        assert burned["seed"]["cmdline"]["removed"] == ["ds=nocloud;i=stale-7"]
        root_before = region_sha256(dev, layout.root_offset, layout.root_size)
        proc = pibake(cwd, "reseed", "--device", dev, "--hostname", "red01", "--ip", "10.1.1.11",
                      "--allow-non-removable", "--json", input="y\n")
        assert proc.returncode == 0, proc.stderr
        assert f"About to replace the seed on {dev} (loop device, 134.2 MB, serial none reported) with red01 " \
               "(10.1.1.11); the OS stays as it is. Continue? [y/N]" in proc.stderr
        (reseeded,) = json.loads(proc.stdout)
        assert reseeded["action"] == "reseed" and reseeded["instance_id"] != burned["instance_id"]
        assert reseeded["seed"]["previous_instance_id"] == burned["instance_id"]
        assert region_sha256(dev, layout.root_offset, layout.root_size) == root_before
    seed = bootpart.read_seed(backing)
    assert seed.instance_id == reseeded["instance_id"]
    cmdline = bootpart.read_cmdline(backing)
    assert cmdline.count("\n") == 1 and "ds=nocloud" not in cmdline
    check_filesystems(backing, tmp_path)
    assert [(e["action"], e["status"]) for e in manifest.entries(cwd / "cluster")] == [
        ("burn", "complete"), ("reseed", "complete")]


# ---------------------------------------------------------------- the manual's commands


def doc_blocks(text=None):
    """[(name, [command lines])] of the ```sh blocks of docs/burning.md, in order."""
    text = DOC.read_text() if text is None else text
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        lines = [ln for ln in body.splitlines() if ln.strip()]
        marker = re.fullmatch(r"# doc-test: ([a-z0-9-]+)", lines[0]) if lines else None
        blocks.append((marker.group(1) if marker else None, [ln for ln in lines[1:] if not ln.startswith("#")]))
    return blocks


def test_every_command_in_the_manual_is_marked_for_this_test():
    blocks = doc_blocks()
    assert blocks and all(name for name, _ in blocks), "every ```sh block needs a '# doc-test: NAME' line"
    assert len({name for name, _ in blocks}) == len(blocks)
    assert set(name for name, _ in blocks) == set(DOC_RUNS)
    assert all(cmds for _, cmds in blocks)
    assert "```\n" not in re.sub(r"```(sh)?\n.*?```", "", DOC.read_text(), flags=re.S)


def drive(argv, cwd, on_enter, timeout=300):
    """Run an interactive command: answer 'y' to [y/N] questions, call on_enter() at 'press Enter'."""
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err, out, seen = bytearray(), bytearray(), 0
    deadline = time.monotonic() + timeout
    try:
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        while streams:
            assert time.monotonic() < deadline, f"{argv} did not finish: {err.decode()}"
            ready, _, _ = select.select(list(streams), [], [], 0.2)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                else:
                    streams[fd].extend(chunk)
            pending = err[seen:].decode(errors="replace")
            if pending.endswith("[y/N]: "):
                proc.stdin.write(b"y\n")
                proc.stdin.flush()
                seen = len(err)
            elif pending.endswith("then press Enter "):
                on_enter()
                proc.stdin.write(b"\n")
                proc.stdin.flush()
                seen = len(err)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    return proc.returncode, out.decode(), err.decode()


# name -> what the test checks after running the block (the commands themselves come from the manual)
DOC_RUNS = {"burn-card", "burn-files", "burn-xz", "burn-batch", "burn-parallel", "burn-manager", "reseed-card",
            "reseed-file", "manifest", "burn-json"}


@needs_root("loop devices stand in for /dev/sdb and /dev/sdc")
@needs_program("losetup")
def test_the_manual_commands_run(work, tmp_path):
    cwd, layout = work
    cards = {name: random_file(tmp_path / f"{name}.bin", 112 * MIB, seed=i)
             for i, name in enumerate(("sdb", "sdb-second", "sdc"))}
    swaps = []
    outputs = {}
    with loop_device(cards["sdb"]) as sdb, loop_device(cards["sdc"]) as sdc:
        def swap_card():
            swaps.append(time.monotonic())
            if len(swaps) == 2:  # the first Enter comes with the same card still in: pibake must notice
                subprocess.run(["losetup", "-d", sdb], check=True)
                subprocess.run(["losetup", sdb, str(cards["sdb-second"])], check=True)

        for name, commands in doc_blocks():
            for command in commands:
                argv = shlex.split(command)
                if argv[0] == "pibake":
                    argv = PIBAKE + [{"/dev/sdb": sdb, "/dev/sdc": sdc}.get(a, a) for a in argv[1:]]
                    argv = [a.replace("/dev/sdb,/dev/sdc", f"{sdb},{sdc}") for a in argv]
                    if "--device" in argv:
                        argv.append("--allow-non-removable")
                rc, out, err = drive(argv, cwd, swap_card)
                assert rc == 0, f"{name}: {command}\n{err}"
                outputs[name] = (out, err)
        # burn-batch: two cards through one reader, the same card noticed when put back
        assert len(swaps) == 2
        assert "this is the card just burned" in outputs["burn-batch"][1]
        assert bootpart.read_seed(cards["sdb"]) is not None
    latest = manifest.latest_by_hostname(cwd / "cluster")
    assert {e["status"] for e in manifest.entries(cwd / "cluster")} == {"complete"}
    expected = {"red00", "red01", "red02", "red03", "red04", "red05", "red06", "red07", "red08", "red09", "red10",
                "red11"}
    assert set(latest) == expected
    # The first card in /dev/sdb: red01, then red04 (first of the batch). The second card: red05, then red02
    # (parallel pair with red03 in /dev/sdc), then reseeded as red01.
    assert bootpart.read_seed(cards["sdb"]).instance_id == latest["red04"]["instance_id"]
    assert bootpart.read_seed(cards["sdb-second"]).instance_id == latest["red01"]["instance_id"]  # reseed-card
    assert bootpart.read_seed(cards["sdc"]).instance_id == latest["red03"]["instance_id"]
    targets = [(e["hostname"], e["target"]) for e in manifest.entries(cwd / "cluster") if e["target_kind"] == "block"]
    hosts = [h for h, _ in targets]  # the parallel pair starts in either order
    assert hosts[:3] == ["red01", "red04", "red05"] and set(hosts[3:5]) == {"red02", "red03"} and hosts[5] == "red01"
    assert latest["red01"]["action"] == "reseed" and latest["red06"]["action"] == "reseed"
    for host in ("red06", "red07", "red08", "red09", "red10", "red11", "red00"):
        path = cwd / "out" / f"{host}.img"
        assert bootpart.read_seed(path).instance_id == latest[host]["instance_id"]
    for card in cards.values():
        check_filesystems(card, tmp_path)
    check_filesystems(cwd / "out" / "red11.img", tmp_path)
    wheels = [n for n in latest["red00"]["seed_files"] if n.startswith("pibake/pibake-")]
    assert len(wheels) == 1 and wheels[0].endswith("-py3-none-any.whl")
    (json_result,) = json.loads(outputs["burn-json"][0])
    assert json_result["hostname"] == "red10" and json_result["manifest_status"] == "complete"
    tail = outputs["manifest"][0].splitlines()
    assert len(tail) == 2 and all(json.loads(line)["burn_id"] for line in tail)


def test_burn_from_a_cloudmesh_inventory(work):
    cwd, _ = work
    (cwd / "inventory.yaml").write_text(
        "red01:\n  host: red01\n  ip: 10.1.1.11\n  service: worker\n  tag: ubuntu\n"
        "red02:\n  host: red02\n  ip: 10.1.1.12\n  service: worker\n")
    proc = pibake(cwd, "burn", "--inventory", "inventory.yaml", "--output", "out/{hostname}.img", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [(r["hostname"], r["ip"], r["manifest_status"]) for r in json.loads(proc.stdout)] == [
        ("red01", "10.1.1.11", "complete"), ("red02", "10.1.1.12", "complete")]
    assert bootpart.read_seed(cwd / "out" / "red02.img").instance_id == json.loads(proc.stdout)[1]["instance_id"]
    both = pibake(cwd, "burn", "--inventory", "inventory.yaml", "--hostname", "red03", "--ip", "10.1.1.13",
                  "--output", "out/{hostname}.img")
    assert "either --inventory or --hostname/--ip" in _refused(both)
