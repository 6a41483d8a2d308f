"""The lab cluster's decisions (pibake.lab.cluster) without booting anything: which host an image is for,
worker names, boot order, sinfo parsing, the images folder, the state file, and the CLI's one-line refusals.
The boots themselves are in tests/e2e/test_lab.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pibake.errors import PibakeError
from pibake.lab import cluster as labc
from pibake.model import PlannedNode, Seed
from tests.conftest import needs_program, running_as_root
from tests.fixtures_plugin import new_cluster


@pytest.fixture(scope="module")
def red(tmp_path_factory):
    from pibake.cluster import load_cluster
    from tests.bake.seed_fixtures import ssh_key

    cdir = tmp_path_factory.mktemp("labc") / "cluster"
    new_cluster(cdir, manager_ip="10.77.7.10", network="10.77.7.0/24", name="red",
                ssh_keys=(ssh_key(),), timezone="Etc/UTC", home=cdir.parent)
    return cdir, load_cluster(cdir)


def _seed(red, name, ip, role):
    from pibake.bake.seed import render_seed
    from pibake.secrets import manager_bundle, seed_secrets

    cdir, cluster = red
    bundle = manager_bundle(cdir) if role == "manager" else None
    return render_seed(cluster, PlannedNode(name, ip, role), seed_secrets(cdir), manager_bundle=bundle)


@pytest.mark.parametrize("name, ip, role", [("red00", "10.77.7.10", "manager"), ("red07", "10.77.7.17", "worker"),
                                            ("temp01", "10.77.7.31", "sensor")])
def test_seed_host_reads_address_and_role_from_the_seed(red, name, ip, role):
    assert labc.seed_host(name, _seed(red, name, ip, role), "red00") == {"name": name, "ip": ip, "role": role}


def test_seed_host_without_agent_config_or_address():
    seed = Seed(user_data="#cloud-config\n", meta_data="instance-id: x\n", network_config="", instance_id="x")
    assert labc.seed_host("red00", seed, "red00") == {"name": "red00", "ip": None, "role": "manager"}
    assert labc.seed_host("red05", seed, "red00")["role"] == "worker"
    broken = Seed(user_data="#cloud-config\n: [", meta_data="", network_config="version: [", instance_id=None)
    assert labc.seed_host("red05", broken, "red00") == {"name": "red05", "ip": None, "role": "worker"}


@pytest.mark.parametrize("manager, ip, count, names, ips", [
    ("red00", "10.77.7.10", 3, ["red01", "red02", "red03"], ["10.77.7.11", "10.77.7.12", "10.77.7.13"]),
    ("pi", "10.77.7.1", 2, ["pi01", "pi02"], ["10.77.7.2", "10.77.7.3"]),
    ("node009", "10.77.7.100", 2, ["node010", "node011"], ["10.77.7.101", "10.77.7.102"]),
    ("red00", "10.77.7.10", 0, [], []),
])
def test_worker_names_follow_the_manager(manager, ip, count, names, ips):
    assert labc.worker_names(manager, ip, "10.77.7.0/24", count) == (names, ips)


def test_worker_names_must_fit_the_network():
    with pytest.raises(labc.LabClusterError, match="3 workers after 10.77.7.252 do not fit in 10.77.7.0/24"):
        labc.worker_names("red00", "10.77.7.252", "10.77.7.0/24", 3)


def test_boot_order_manager_first_unless_delayed():
    hosts = [{"name": "red01", "role": "worker"}, {"name": "red00", "role": "manager"},
             {"name": "t1", "role": "sensor"}]
    names = lambda groups: [[h["name"] for h in g] for g in groups]  # noqa: E731
    assert names(labc.boot_order(hosts, 0)) == [["red00"], ["red01", "t1"]]
    assert names(labc.boot_order(hosts, 20)) == [["red01", "t1"], ["red00"]]
    assert names(labc.boot_order(hosts[1:2], 0)) == [["red00"]]


def test_parse_sinfo():
    text = "red01 idle\nred02 down*\nred01 allocated\n\nred03 idle~\n"
    assert labc.parse_sinfo(text) == {"red01": "idle", "red02": "down*", "red03": "idle~"}


def test_host_argv_enters_every_namespace_and_the_hosts_root():
    argv = labc.host_argv({"pid": 4242, "root": "/tmp/x/root"}, ["sinfo", "-N"])
    assert argv[1:6] == ["-t", "4242", "-a", "--wd=/", "--"]
    assert argv[6:10] == ["chroot", "/tmp/x/root", "/usr/bin/env", "-i"]
    assert argv[-2:] == ["sinfo", "-N"] and "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in argv


def test_lab_images_manager_first(tmp_path):
    for name in ("red02", "red00", "red01"):
        (tmp_path / f"{name}.img").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [n for n, _ in labc.lab_images(tmp_path, "red00")] == ["red00", "red01", "red02"]


@pytest.mark.parametrize("files, message", [
    (None, "no such folder"),
    ([], "no <hostname>.img files in it"),
    (["red01.img"], "no image for the manager red00 (red00.img)"),
    (["red00.img", "Red_1.img"], "the file name must be <hostname>.img with a valid hostname"),
])
def test_lab_images_refusals(tmp_path, files, message):
    folder = tmp_path / "images"
    if files is not None:
        folder.mkdir()
        for name in files:
            (folder / name).write_bytes(b"")
    with pytest.raises(labc.LabClusterError) as err:
        labc.lab_images(folder, "red00")
    assert message in str(err.value)


def test_state_round_trip_and_damage(tmp_path):
    assert labc.load_state("pz1", tmp_path) is None
    state = {"prefix": "pz1", "hosts": [{"name": "red00", "pid": 1, "netns_id": "net:[0]"}]}
    labc._save_state(state, tmp_path)
    assert labc.load_state("pz1", tmp_path) == state
    assert oct(os.stat(labc.state_path("pz1", tmp_path)).st_mode & 0o777) == "0o600"
    with pytest.raises(labc.LabClusterError, match="the lab has no host 'red09' \\(hosts: red00\\)"):
        labc.lab_run("red09", ["true"], prefix="pz1", state_dir=tmp_path)
    with pytest.raises(labc.LabClusterError, match="lab host red00 is not running"):
        labc.shell_argv("red00", prefix="pz1", state_dir=tmp_path)  # pid 1 is not the host's PID 1
    labc.state_path("pz1", tmp_path).write_text("{")
    with pytest.raises(labc.LabClusterError, match="is damaged: run `pibake lab down`"):
        labc.load_state("pz1", tmp_path)


@needs_program("sfdisk", "mkfs.vfat", "mcopy", "mke2fs")
def test_burn_lab_images_burns_manager_and_workers_from_the_plan(red, tmp_path):
    from pibake.bake.bootpart import read_seed, read_cmdline

    cdir, cluster = red
    out = labc.burn_lab_images(cdir, tmp_path / "images", workers=2)
    images = labc.lab_images(out, "red00")
    assert [n for n, _ in images] == ["red00", "red01", "red02"]
    hosts = [labc.seed_host(n, read_seed(p), "red00") for n, p in images]
    assert hosts == [{"name": "red00", "ip": "10.77.7.10", "role": "manager"},
                     {"name": "red01", "ip": "10.77.7.11", "role": "worker"},
                     {"name": "red02", "ip": "10.77.7.12", "role": "worker"}]
    assert "ds=nocloud" not in read_cmdline(images[1][1])
    assert not (tmp_path / "synthetic-raspios.img").exists()
    assert [h["ip"] for h in labc._hosts_from_images(images, cluster)] == ["10.77.7.10", "10.77.7.11", "10.77.7.12"]

    import shutil

    from pibake.bake.synthetic import build_pi_image

    shutil.copy(out / "red01.img", out / "red09.img")
    with pytest.raises(labc.LabClusterError, match="two images use the same address 10.77.7.11"):
        labc._hosts_from_images(labc.lab_images(out, "red00"), cluster)
    (out / "red09.img").unlink()
    build_pi_image(out / "red08.img", size="96M", boot_size="40M")
    with pytest.raises(PibakeError, match="red08: .*red08.img has no cloud-init seed on its boot partition"):
        labc._hosts_from_images(labc.lab_images(out, "red00"), cluster)


def _pibake(*args):
    return subprocess.run([sys.executable, "-m", "pibake", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["lab", "status", "--prefix", "pz9nolab"], "no lab is running (prefix pz9nolab): start one with `pibake lab up`"),
    (["lab", "shell", "red01", "--prefix", "pz9nolab"], "no lab is running (prefix pz9nolab)"),
    (["lab", "status", "--prefix", "Bad-Prefix"], "lab prefix 'Bad-Prefix' must be 2-9 characters"),
    (["lab", "power", "red01", "off", "--prefix", "pz9nolab"], "no lab is running (prefix pz9nolab)"),
    (["lab", "freeze", "red01", "--prefix", "pz9nolab"], "no lab is running (prefix pz9nolab)"),
])
def test_cli_refusals_are_one_line(args, message):
    proc = _pibake(*args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pibake: error: ") and message in lines[0], proc.stderr


def test_power_refuses_an_unknown_action_and_an_unknown_host(tmp_path):
    labc._save_state({"prefix": "pz9pw", "hosts": [{"name": "red01", "ip": "10.77.7.11", "pid": 0}]}, tmp_path)
    with pytest.raises(PibakeError, match="^power action must be on or off, not 'sideways'$"):
        labc.lab_power("red01", "sideways", prefix="pz9pw", state_dir=tmp_path)
    with pytest.raises(PibakeError, match=r"^the lab has no host 'red09' \(hosts: red01\)$"):
        labc.lab_power("red09", "off", prefix="pz9pw", state_dir=tmp_path)
    with pytest.raises(PibakeError, match="^lab host red01 is already off$"):  # its PID 1 is gone
        labc.lab_power("red01", "off", prefix="pz9pw", state_dir=tmp_path)
    with pytest.raises(PibakeError, match="^lab host red01 is powered off: nothing to freeze$"):
        labc.lab_freeze("red01", prefix="pz9pw", state_dir=tmp_path)


AGENT_UNIT = """[Unit]
Description=pibake agent
[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /usr/local/lib/pibake/agent.py --config /etc/pibake/agent.json
[Install]
WantedBy=multi-user.target
"""


@pytest.mark.parametrize("files, expected", [
    ({"pibake-agent.service": AGENT_UNIT},
     [("pibake-agent.service", ["/usr/bin/python3", "/usr/local/lib/pibake/agent.py", "--config",
                                "/etc/pibake/agent.json"])]),
    # not wanted by multi-user.target: systemd would not start it at boot
    ({"pibake-x.service": AGENT_UNIT.replace("WantedBy=multi-user.target", "WantedBy=other.target")}, []),
    ({"pibake-x.service": AGENT_UNIT.replace("[Install]\nWantedBy=multi-user.target\n", "")}, []),
    # ExecStart in another section, a '-' prefix (failure ignored), quoted arguments
    ({"b.service": "[Unit]\nExecStart=/bin/false\n[Install]\nWantedBy=multi-user.target\n"}, []),
    ({"b.service": "[Service]\nExecStart=-/bin/echo 'a b'\n[Install]\nWantedBy=multi-user.target\n",
      "a.service": AGENT_UNIT}, [("a.service", ["/usr/bin/python3", "/usr/local/lib/pibake/agent.py", "--config",
                                               "/etc/pibake/agent.json"]), ("b.service", ["/bin/echo", "a b"])]),
])
def test_boot_units_are_the_enabled_units_with_their_command(files, expected):
    assert labc.boot_units(files) == expected


def test_the_seeds_units_start_at_boot(red):
    """The units a worker's and the manager's seed write are the ones a power-on starts (the agent and the
    sensor agent; on the manager the registry and the two switch loops too)."""
    import yaml

    seeds = {role: _seed(red, name, ip, role) for name, ip, role in (("red00", "10.77.7.10", "manager"),
                                                                     ("red01", "10.77.7.11", "worker"))}
    for role, units in (("worker", ["pibake-agent.service", "pibake-sensor.service"]),
                        ("manager", ["pibake-agent.service", "pibake-registry.service", "pibake-sensor.service",
                                     "pibake-switch-auto.service", "pibake-switch-rules.service"])):
        files = {Path(f["path"]).name: f["content"] for f in yaml.safe_load(seeds[role].user_data)["write_files"]
                 if f["path"].startswith("/etc/systemd/system/pibake-")}
        assert [unit for unit, _argv in labc.boot_units(files)] == units, role


def test_cli_up_refuses_missing_images_folder(red, tmp_path):
    cdir, _ = red
    proc = _pibake("--cluster", str(cdir), "lab", "up", "--from-images", str(tmp_path / "nope"), "--prefix", "pz9up")
    assert proc.returncode == 1
    if running_as_root():
        assert "--from-images" in proc.stderr and "no such folder" in proc.stderr
    else:
        assert "the lab needs root" in proc.stderr
    assert not os.path.exists("/run/pibake-lab/pz9up.json")
    assert not os.path.exists("/tmp/pibake-lab-pz9up")


def test_cli_down_with_nothing_running():
    proc = _pibake("lab", "down", "--prefix", "pz9none", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["netns"] == []
    assert "lab pz9none: nothing was running" in proc.stderr


def test_not_root_is_refused(monkeypatch, red):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PibakeError, match="the lab needs root"):
        labc.lab_up(red[0], images_dir="x", prefix="pz9x")


def test_an_unknown_release_is_refused_before_anything_is_made(red):
    with pytest.raises(PibakeError, match=r"^unknown lab release 'sid': choose one of trixie, bookworm$"):
        labc.lab_up(red[0], images_dir="x", prefix="pz9x", release="sid")
    assert labc.load_state("pz9x") is None


def _doc_commands():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "lab.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith("pibake ")]


def test_docs_commands_parse_with_the_real_cli():
    """Every `pibake ...` line of docs/lab.md names real commands and options (tests/e2e/test_lab.py runs
    the same commands on a real lab)."""
    import shlex

    import click

    from pibake.cli import cli

    def rest_of(ctx):
        import warnings

        with warnings.catch_warnings():  # click 8.2 deprecates protected_args (merged into args in 9.0)
            warnings.simplefilter("ignore", DeprecationWarning)
            return [*ctx.protected_args, *ctx.args]

    commands = _doc_commands()
    assert len(commands) == 11
    assert {c.split(" lab ", 1)[1].split()[0] for c in commands if " lab " in c} == {"up", "status", "shell", "down",
                                                                                      "freeze", "power"}
    for line in commands:
        args = shlex.split(line)[1:]
        command, ctx = cli, cli.make_context("pibake", list(args), resilient_parsing=False)
        rest = rest_of(ctx)
        while isinstance(command, click.Group) and rest:
            name, command, rest = command.resolve_command(ctx, rest)
            ctx = command.make_context(name, list(rest), parent=ctx)
            rest = rest_of(ctx) if isinstance(command, click.Group) else []
        assert not isinstance(command, click.Group), line
