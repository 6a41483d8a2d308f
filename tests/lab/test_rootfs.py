"""The lab's cached rootfs and per-host overlays: real debootstrap, real overlayfs, real namespaces."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pibake.lab.rootfs import (
    DEFAULT_CACHE_DIR,
    LAB_PACKAGES,
    RootfsError,
    debian_mirror,
    ensure_rootfs,
    make_host_root,
    remove_host_root,
    rootfs_key,
    rootfs_path,
    rootfs_stamp,
)
from tests.fixtures_plugin import needs_lab
from tests.lab.sandbox import Sandbox, mounted_under

lab = [needs_lab("debootstrap", "unshare", "nsenter", "chroot")]


def host_run(sandbox, argv, **kw):
    return subprocess.run([*sandbox.enter, *argv], capture_output=True, text=True, **kw)


def test_rootfs_key_depends_on_release_and_package_set_not_order():
    assert rootfs_key("bookworm", ["a", "b"]) == rootfs_key("bookworm", ["b", "a", "a"])
    assert rootfs_key("bookworm", ["a"]) != rootfs_key("bookworm", ["a", "b"])
    assert rootfs_key("bookworm", ["a"]) != rootfs_key("trixie", ["a"])
    assert rootfs_path("/c", packages=["a"]).name == f"rootfs-trixie-{rootfs_key('trixie', ['a'])}"
    assert (rootfs_path("/c", release="bookworm", packages=["a"]).name
            == f"rootfs-bookworm-{rootfs_key('bookworm', ['a'])}")


def test_unknown_release_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(RootfsError, match=r"^unknown lab release 'sid': choose one of trixie, bookworm$"):
        ensure_rootfs(tmp_path, release="sid")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"debian.sources": "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"},
         "http://mirror.example/debian"),
        ({"sources.list": "# deb http://old/debian bookworm main\ndeb [arch=amd64] http://m.example/debian bookworm main\n"},
         "http://m.example/debian"),
        ({"other.list": "deb https://packages.example/apt stable main\n"}, "http://deb.debian.org/debian"),
        ({}, "http://deb.debian.org/debian"),
    ],
)
def test_debian_mirror_comes_from_the_machines_apt_sources(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert debian_mirror([tmp_path]) == expected


def lab_test(func):
    for mark in lab:
        func = mark(func)
    return func


@lab_test
def test_cached_rootfs_is_reused_and_carries_no_host_state(lab_rootfs):
    stamp = rootfs_stamp(lab_rootfs)
    assert stamp and stamp["packages"] == list(LAB_PACKAGES)
    again = ensure_rootfs()
    assert again == lab_rootfs
    assert rootfs_stamp(again)["built_at"] == stamp["built_at"]  # not rebuilt

    wanted = list(dict.fromkeys(LAB_PACKAGES))
    proc = subprocess.run(["chroot", lab_rootfs, "dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n",
                           *wanted], capture_output=True, text=True)
    states = dict(line.split() for line in proc.stdout.splitlines())
    assert {p: states.get(p) for p in wanted} == {p: "installed" for p in wanted}

    etc = lab_rootfs / "etc"
    assert (etc / "machine-id").read_text() == ""
    assert not list((etc / "ssh").glob("ssh_host_*"))
    assert not (etc / "munge/munge.key").exists()
    assert not (lab_rootfs / "var/lib/cloud").exists()
    assert not (lab_rootfs / "usr/sbin/policy-rc.d").exists()
    assert (etc / "hostname").read_text() == "localhost\n"
    assert not [line for line in (etc / "apt/sources.list").read_text().splitlines() if line.startswith("deb")]
    assert "-x" in (etc / "default/chrony").read_text()


@lab_test
def test_half_built_cache_is_rebuilt_not_used(tmp_path):
    packages = ("procps",)
    root = rootfs_path(tmp_path, packages=packages)
    partial = root.with_name(root.name + ".partial")
    # A build killed in the middle of debootstrap...
    # Packages come from the lab's own download cache when it has them (not part of the test).
    debs = str(DEFAULT_CACHE_DIR / "debs")
    code = ("from pibake.lab.rootfs import ensure_rootfs; "
            f"ensure_rootfs({str(tmp_path)!r}, packages={packages!r}, download_dir={debs!r})")
    build = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (partial / "debootstrap").exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    assert partial.is_dir()
    # ...and a rootfs renamed into place whose stamp was never written.
    root.mkdir()
    (root / "planted-by-test").write_text("half built")
    assert rootfs_stamp(root) is None

    built = ensure_rootfs(tmp_path, packages=packages, download_dir=debs)

    assert built == root
    assert rootfs_stamp(root)["packages"] == list(packages)
    assert not (root / "planted-by-test").exists()
    assert not partial.exists()
    assert (root / "usr/bin/ps").exists()
    assert not list((root / "var/cache/apt/archives").glob("*.deb"))  # debootstrap's copies: the cache has them
    assert not mounted_under(tmp_path)


@pytest.fixture
def two_hosts(lab_rootfs, tmp_path):
    hosts = []
    try:
        for name in ("glabfs01", "glabfs02"):
            sandbox = Sandbox(name)
            hosts.append(sandbox)
            sandbox.root = make_host_root(lab_rootfs, tmp_path / name, enter=sandbox.enter)
        yield hosts
    finally:
        for sandbox in hosts:
            sandbox.destroy()
        for sandbox in hosts:
            remove_host_root(tmp_path / sandbox.name)


@lab_test
def test_two_host_roots_have_separate_etc_and_mount_nothing_here(two_hosts, lab_rootfs, tmp_path):
    a, b = two_hosts
    write = host_run(a, ["chroot", a.root, "sh", "-c", "echo only-a > /etc/only-in-a"])
    assert write.returncode == 0, write.stderr
    assert host_run(a, ["chroot", a.root, "cat", "/etc/only-in-a"]).stdout == "only-a\n"
    assert host_run(b, ["chroot", b.root, "test", "-e", "/etc/only-in-a"]).returncode == 1
    assert not (lab_rootfs / "etc/only-in-a").exists()
    assert (tmp_path / "glabfs01/upper/etc/only-in-a").exists()
    # The overlay and its mounts exist only in the hosts' own mount namespaces.
    assert not mounted_under(tmp_path)
    assert not mounted_under(lab_rootfs)


@lab_test
def test_host_root_has_run_sys_cgroup_dev_and_boot_partition(two_hosts):
    a = two_hosts[0]
    script = (
        'stat -c "%a %n" /run/lock /run/sshd /dev/shm; '
        "mountpoint -q /sys/fs/cgroup && echo cgroup-mounted; "
        "mountpoint -q /boot/firmware && echo boot-mounted; "
        "mountpoint -q /run && echo run-mounted; "
        "echo x > /dev/null && echo devnull-ok; "
        "ls /dev"
    )
    proc = host_run(a, ["chroot", a.root, "sh", "-c", script])
    out = proc.stdout.split()
    assert "1777 /run/lock" in proc.stdout and "755 /run/sshd" in proc.stdout
    for word in ("cgroup-mounted", "boot-mounted", "run-mounted", "devnull-ok"):
        assert word in out, proc.stdout + proc.stderr
    # a minimal /dev: no disks of this machine inside a lab host
    assert not [name for name in out if name.startswith(("sd", "vd", "nvme", "loop"))]


@lab_test
def test_make_host_root_refuses_an_incomplete_rootfs_and_a_missing_enter(tmp_path, lab_rootfs):
    from pibake.errors import RootfsError

    with pytest.raises(RootfsError, match="not a complete lab rootfs"):
        make_host_root(tmp_path / "nothing", tmp_path / "h", enter=["true"])
    with pytest.raises(RootfsError, match="enter prefix"):
        make_host_root(lab_rootfs, tmp_path / "h", enter=[])


@lab_test
def test_failed_build_says_what_failed_and_leaves_nothing_behind(tmp_path):
    from pibake.errors import RootfsError

    # Nothing listens on the discard port of loopback: debootstrap cannot fetch the Release file.
    with pytest.raises(RootfsError, match=r"^debootstrap trixie from http://127.0.0.1:9/debian failed .*"
                                          r"check that the Debian mirror is reachable"):
        ensure_rootfs(tmp_path, packages=("procps",), mirror="http://127.0.0.1:9/debian")
    root = rootfs_path(tmp_path, packages=("procps",))
    assert not root.exists()
    assert not root.with_name(root.name + ".partial").exists()
    assert rootfs_stamp(root) is None
