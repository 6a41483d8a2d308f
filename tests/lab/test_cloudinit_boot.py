"""Booting a lab host = cloud-init's four stages from a NoCloud seed on its /boot/firmware.

Real cloud-init (the rootfs's own, bookworm's 22.4), real overlay root, real namespaces.
"""

import socket
import subprocess

import pytest

from pibake.errors import SeedError
from pibake.errors import BootError
from pibake.lab.boot import BootResult, boot_host, read_host_file, validate_seed
from pibake.lab.rootfs import make_host_root, remove_host_root
from pibake.model import Seed
from tests.conftest import needs_program, needs_root
from tests.fixtures_plugin import needs_lab
from tests.lab.sandbox import Sandbox, mounted_under

pytestmark = [needs_root("lab hosts need root"), needs_program("debootstrap", "unshare", "nsenter", "chroot")]
lab = needs_lab("debootstrap", "unshare", "nsenter", "chroot")  # and namespaces + overlayfs

USER_DATA = """\
#cloud-config
hostname: glab01
fqdn: glab01.lab.test
manage_etc_hosts: true
timezone: Etc/UTC
write_files:
  - path: /etc/pibake-lab/written
    content: written by cloud-init
    permissions: '0640'
package_update: false
packages: [munge, slurmd, python3-requests]
ntp:
  enabled: true
  servers: [127.0.0.1]
runcmd:
  - [sh, -c, 'echo "runcmd ran as $(id -un) on $(hostname)" > /var/tmp/pibake-marker']
"""
META_DATA = "instance-id: glab01-0001\nlocal-hostname: glab01\n"
NETWORK_CONFIG = """\
version: 2
ethernets:
  eth0:
    addresses: [10.77.9.11/24]
"""


@pytest.fixture
def host(lab_rootfs, tmp_path_factory):
    hosts = []

    def make(name):
        sandbox = Sandbox(name)
        hosts.append(sandbox)
        sandbox.dir = tmp_path_factory.mktemp(name)
        sandbox.root = make_host_root(lab_rootfs, sandbox.dir / "host", enter=sandbox.enter)
        return sandbox

    yield make
    for sandbox in hosts:
        sandbox.destroy()
    for sandbox in hosts:
        assert not mounted_under(sandbox.dir)
        remove_host_root(sandbox.dir / "host")


@pytest.fixture(scope="module")
def booted(lab_rootfs, tmp_path_factory):
    """One host booted from the seed above (module scope: the boot is the expensive part)."""
    before = socket.gethostname()
    sandbox = Sandbox("glabboot")
    state = tmp_path_factory.mktemp("glabboot")
    try:
        sandbox.root = make_host_root(lab_rootfs, state / "host", enter=sandbox.enter)
        seed = Seed(user_data=USER_DATA, meta_data=META_DATA, network_config=NETWORK_CONFIG,
                    instance_id="glab01-0001")
        result = boot_host(sandbox.root, seed, enter=sandbox.enter, host="glab01")
        yield sandbox, result, before
    finally:
        sandbox.destroy()
        remove_host_root(state / "host")


def in_host(sandbox, path):
    return read_host_file(sandbox.root, path, enter=sandbox.enter)


@lab
def test_boot_reports_done_with_no_errors(booted):
    _, result, _ = booted
    assert result.status["status"] == "done", result.log_tail[-4000:]
    assert result.status["errors"] == []
    assert result.errors == [], result.output_tail[-4000:]
    assert result.done and result.ok
    assert [(s.name, s.returncode) for s in result.stages] == [
        ("init-local", 0), ("init", 0), ("modules-config", 0), ("modules-final", 0)]
    assert result.status["datasource"] == "nocloud"
    assert result.check() is result


@lab
def test_seed_was_read_from_the_boot_partition(booted):
    sandbox, result, _ = booted
    assert "file:///boot/firmware/" in result.log_tail
    assert in_host(sandbox, "/boot/firmware/user-data") == USER_DATA
    assert "glab01-0001" in in_host(sandbox, "/run/cloud-init/.instance-id")
    # network-config came from the boot partition too, rendered but never brought up
    rendered = in_host(sandbox, "/etc/network/interfaces.d/50-cloud-init")
    assert "10.77.9.11" in rendered


@lab
def test_modules_ran_inside_the_host(booted):
    sandbox, result, _ = booted
    assert in_host(sandbox, "/var/tmp/pibake-marker") == "runcmd ran as root on glab01\n"
    assert in_host(sandbox, "/etc/pibake-lab/written") == "written by cloud-init"
    assert "glab01" in in_host(sandbox, "/etc/hosts")
    assert "server 127.0.0.1" in in_host(sandbox, "/etc/chrony/chrony.conf")
    # packages: already in the cached rootfs, installed offline without a package source
    assert "slurmd is already the newest version" in result.output_tail
    # first boot made this host's identity: its own ssh host keys, not the cache's
    assert in_host(sandbox, "/etc/ssh/ssh_host_ed25519_key.pub").startswith("ssh-ed25519 ")


@lab
def test_hostname_changes_in_the_host_only(booted):
    sandbox, result, before = booted
    assert result.hostname == "glab01"
    assert in_host(sandbox, "/etc/hostname").strip() == "glab01"
    assert socket.gethostname() == before
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() == before


@lab
def test_seed_failing_the_schema_is_not_booted_and_the_error_names_host_and_key(host):
    sandbox = host("glabbad")
    bad = {"user-data": "#cloud-config\nruncmd: 'echo not a list'\n", "meta-data": "instance-id: bad-1\n"}
    with pytest.raises(SeedError) as info:
        boot_host(sandbox.root, bad, enter=sandbox.enter, host="red02")
    message = str(info.value)
    assert message.startswith("red02: ")
    assert "runcmd" in message and "is not of type 'array'" in message
    # nothing booted: no cloud-init state, no seed on the boot partition
    assert in_host(sandbox, "/var/lib/cloud/instance/boot-finished") == ""
    assert in_host(sandbox, "/boot/firmware/user-data") == ""


@lab
@pytest.mark.parametrize(
    "files, expected",
    [
        ({"user-data": "#cloud-config\n", "meta-data": "[not, a, mapping]\n"}, "red03: meta-data must be a YAML mapping"),
        ({"user-data": "#cloud-config\n", "meta-data": "instance-id: x\n", "network-config": "a: [\n"},
         "red03: network-config is not valid YAML"),
        ({"user-data": "runcmd: [ls]\n", "meta-data": "instance-id: x\n"}, "red03: user-data must start with #cloud-config"),
        ({"user-data": "#cloud-config\n"}, "seed has no meta-data"),
    ],
)
def test_validate_seed_table(host, files, expected):
    sandbox = host("glabval")
    with pytest.raises(SeedError, match=expected):
        validate_seed(sandbox.root, files, enter=sandbox.enter, host="red03")


@lab
def test_refuses_a_host_without_its_own_uts_namespace(host):
    sandbox = host("glabuts")
    shares_uts = ["nsenter", "--target", str(sandbox.pid), "--mount", "--pid"]
    with pytest.raises(BootError, match="UTS namespace"):
        boot_host(sandbox.root, {"user-data": "#cloud-config\n", "meta-data": "instance-id: u\n"},
                  enter=shares_uts, host="red04")


def test_boot_result_collects_errors_from_status_and_stage_exit_codes():
    status = {
        "status": "error",
        "errors": ["('locale', ProcessExecutionError(...))"],
        "init": {"errors": []},
        "modules-config": {"errors": ["('locale', ProcessExecutionError(...))", "('ntp', RuntimeError())"]},
    }
    from pibake.lab.boot import StageResult

    result = BootResult(host="red05", status=status,
                        stages=[StageResult("init", 0, 0.1), StageResult("modules-config", 1, 0.2)])
    assert not result.done and not result.ok
    assert result.errors == ["('locale', ProcessExecutionError(...))", "('ntp', RuntimeError())",
                             "cloud-init modules-config exited with 1"]
    with pytest.raises(BootError, match=r"^red05: cloud-init did not finish cleanly: \('locale'"):
        result.check()


@lab
@needs_program("mcopy", "mkfs.vfat", "sfdisk", "mke2fs")
def test_host_boots_the_seed_read_back_from_a_burned_image(lab_rootfs, tmp_path):
    """The lab's path: seed on a Pi-like image's FAT partition -> read back -> the host's /boot/firmware."""
    from pibake.bake.bootpart import read_seed, write_seed
    from pibake.bake.synthetic import build_pi_image

    image = tmp_path / "red06.img"
    build_pi_image(image, size="96M")
    burned = Seed(
        user_data="#cloud-config\nhostname: red06\nruncmd:\n  - [sh, -c, 'cat /boot/firmware/extra.txt > /var/tmp/extra']\n",
        meta_data="instance-id: red06-0001\n",
        network_config="version: 2\nethernets:\n  eth0:\n    addresses: [10.77.9.16/24]\n",
        instance_id="red06-0001",
    )
    write_seed(image, burned, extra_files={"extra.txt": b"shipped on the card\n"})
    seed = read_seed(image)
    assert seed.user_data == burned.user_data

    sandbox = Sandbox("glabimg")
    try:
        root = make_host_root(lab_rootfs, tmp_path / "host", enter=sandbox.enter, boot_image=image)
        sandbox.root = root
        result = boot_host(root, seed, enter=sandbox.enter, host="red06")
        assert result.ok, result.errors
        assert result.hostname == "red06"
        assert in_host(sandbox, "/var/tmp/extra") == "shipped on the card\n"
        assert "root=PARTUUID=" in in_host(sandbox, "/boot/firmware/cmdline.txt")
        assert in_host(sandbox, "/boot/firmware/config.txt").startswith("# For more options")
        assert "10.77.9.16" in in_host(sandbox, "/etc/network/interfaces.d/50-cloud-init")
    finally:
        sandbox.destroy()
        remove_host_root(tmp_path / "host")
