"""Lab hosts: own hostname, /proc, /run and per-host config dirs over a shared root; a bridge on an
unusual subnet; clean teardown, also after a crash (by-name leftover cleanup)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pibake.errors import LabError
from pibake.lab import LabNetwork, cleanup_stale
from pibake.lab import hosts as lab_hosts
from tests.conftest import needs_program
from tests.fixtures_plugin import needs_lab

pytestmark = [needs_lab("ip", "nsenter", "unshare", "mount"), pytest.mark.root]

SUBNET_OCTET = 60 + os.getpid() % 100


def names_with(prefix):
    return [n for n in lab_hosts._netns_names() + lab_hosts._link_names() if n.startswith(prefix + "-")]


@pytest.fixture
def lab(make_lab):
    return make_lab("pl", f"10.77.{SUBNET_OCTET}.0/24")


def test_two_hosts_have_their_own_identity(lab):
    a, b = lab("alpha", 11), lab("beta", 12)
    assert a.run(["hostname"]).stdout.strip() == "alpha"
    assert b.run(["hostname"]).stdout.strip() == "beta"
    assert a.run(["cat", "/etc/hostname"]).stdout == "alpha\n"
    assert "10.77" in a.run(["cat", "/etc/hosts"]).stdout and "alpha" in a.run(["cat", "/etc/hosts"]).stdout
    # own PID namespace: PID 1 is the lab init, and the other host's processes are invisible
    ps_a = a.run(["ps", "-e", "-o", "pid=,args="]).stdout
    assert ps_a.splitlines()[0].split()[0] == "1" and "sleep 4242" not in ps_a
    sleeper = b.popen(["sleep", "4242"])
    assert "sleep 4242" in b.run(["ps", "-e", "-o", "args="]).stdout
    assert "sleep 4242" not in a.run(["ps", "-e", "-o", "args="]).stdout
    sleeper.kill()
    sleeper.wait()
    # own network: eth0 with its address and a MAC derived from it, default route on eth0
    addr = a.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert f"10.77.{SUBNET_OCTET}.11/24" in addr
    assert a.mac == f"02:77:0a:4d:{SUBNET_OCTET:02x}:0b"
    assert a.mac in a.run(["ip", "link", "show", "eth0"]).stdout
    assert a.run(["ip", "route", "show", "default"]).stdout.startswith("default dev eth0")


def test_per_host_run_and_config_dirs(lab):
    a, b = lab("alpha", 11), lab("beta", 12)
    a.run(["sh", "-c", "echo a > /etc/pibake/marker && echo a > /run/marker && echo a > /var/log/marker"])
    assert a.path("/etc/pibake/marker").read_text() == "a\n"
    for path in ("/etc/pibake/marker", "/run/marker", "/var/log/marker"):
        assert b.run(["test", "-e", path], check=False).returncode == 1, path
        assert not os.path.exists(path), path  # nor on the machine itself
    modes = a.run(["stat", "-c", "%n %a %U", "/run/lock", "/run/munge", "/run/slurm", "/run/sshd"]).stdout
    assert modes.split("\n")[:4] == ["/run/lock 1777 root", "/run/munge 755 munge", "/run/slurm 755 slurm",
                                     "/run/sshd 755 root"]
    assert a.run(["stat", "-c", "%U %a", "/etc/munge"]).stdout.strip() == "munge 700"
    # no DNS: the machine's resolver is never asked; unknown names fail at once
    assert "nameserver 127.0.0.1" in a.run(["cat", "/etc/resolv.conf"]).stdout
    assert a.run(["getent", "hosts", "beta"], check=False).returncode == 2
    a.path("/etc/hosts").write_text(a.path("/etc/hosts").read_text() + f"{b.ip} beta\n")
    assert a.run(["getent", "hosts", "beta"]).stdout.split() == [b.ip, "beta"]
    assert a.run(["test", "-e", "/etc/munge/munge.key"], check=False).returncode == 1  # never the machine's key
    assert a.run(["test", "-e", "/etc/default/munge"]).returncode == 0  # packaged defaults are there
    with pytest.raises(LabError, match="shared with the machine"):
        a.path("/usr/bin/python3")


def test_run_honours_the_working_directory_and_env(lab):
    a = lab("alpha", 11)
    assert a.run(["pwd"], cwd="/tmp").stdout.strip() == "/tmp"
    assert a.run(["sh", "-c", "echo $FOO"], env={"FOO": "bar"}).stdout.strip() == "bar"


def test_hosts_talk_over_the_bridge(lab):
    a, b = lab("alpha", 11), lab("beta", 12)
    server = textwrap.dedent("""
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 7777)); s.listen(); print("listening", flush=True)
        c, addr = s.accept(); c.sendall(socket.gethostname().encode() + b" " + addr[0].encode()); c.close()
    """)
    srv = b.popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "listening"
    client = ("import socket; c = socket.create_connection(('%s', 7777), timeout=10); "
              "print(c.recv(100).decode())" % b.ip)
    assert a.run([sys.executable, "-c", client]).stdout.strip() == f"beta {a.ip}"
    assert srv.wait(timeout=10) == 0


@needs_program("munged", "munge", "unmunge", "mungekey")
def test_munge_credentials_cross_hosts(lab):
    """The per-host layout is enough for real munge: a credential made on one host decodes on another."""
    a, b = lab("alpha", 11), lab("beta", 12)
    a.run(["mungekey", "--create", "--keyfile", "/etc/munge/munge.key"])
    key = a.path("/etc/munge/munge.key").read_bytes()
    b.path("/etc/munge/munge.key").write_bytes(key)
    for h in (a, b):
        h.run(["chown", "munge:munge", "/etc/munge/munge.key"])
        h.run(["chmod", "0400", "/etc/munge/munge.key"])
        h.run(["service", "munge", "start"])
    cred = a.run(["munge", "-n"]).stdout
    out = b.run(["unmunge"], input=cred).stdout
    assert "STATUS:          Success (0)" in out


def test_bad_names_and_addresses(lab):
    with pytest.raises(LabError, match="RFC 1123"):
        lab("Bad_Name", 20)
    with pytest.raises(LabError, match="not a free address of the lab subnet"):
        lab("good", "10.99.0.1")
    with pytest.raises(LabError, match="not an IP address"):
        lab("good", 300)
    with pytest.raises(LabError, match="prefix"):
        LabNetwork.create("X-bad")
    with pytest.raises(LabError, match="private IPv4"):
        LabNetwork.create("plbad", "8.8.8.0/24")


def test_destroy_takes_every_process_down(lab):
    a = lab("alpha", 11)
    a.run(["sh", "-c", "setsid sleep 3131 >/dev/null 2>&1 < /dev/null &"])
    assert "sleep 3131" in a.run(["ps", "-e", "-o", "args="]).stdout
    pids = lab_hosts.pids_in_netns(f"/run/netns/{a.netns}")
    assert pids
    a.destroy()
    assert not any(os.path.exists(f"/proc/{p}") and not lab_hosts._is_zombie(p) for p in pids)
    assert a.netns not in lab_hosts._netns_names() and a.veth not in lab_hosts._link_names()


def test_leftovers_of_a_crashed_run_are_found_by_name(tmp_path):
    """A process that made a lab and was SIGKILLed leaves namespaces, links and processes: the next run
    removes them by name (its prefix carries the dead pid)."""
    octet = 160 + os.getpid() % 90
    code = textwrap.dedent(f"""
        import os, sys
        from pibake.lab import LabHost, LabNetwork, run_prefix
        net = LabNetwork.create(run_prefix("pz"), "10.77.{octet}.0/24")
        h = LabHost.create("crashy", "10.77.{octet}.5", network=net, base_dir={str(tmp_path)!r})
        h.run(["sh", "-c", "setsid sleep 5151 >/dev/null 2>&1 < /dev/null &"])
        print(os.getpid(), h.pid, flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead_pid, init_pid = map(int, proc.stdout.split())
    prefix = f"pz{dead_pid}"
    assert sorted(names_with(prefix)) == sorted([f"{prefix}-crashy", f"{prefix}-br", f"{prefix}-5"])
    assert os.path.exists(f"/proc/{init_pid}")
    report = cleanup_stale("pz")
    assert report[prefix]["netns"] == [f"{prefix}-crashy"] and report[prefix]["processes"] >= 2
    assert names_with(prefix) == []
    assert not os.path.exists(f"/proc/{init_pid}") or lab_hosts._is_zombie(init_pid)
    assert cleanup_stale("pz") == {}


def test_popen_signals_reach_the_program(lab):
    """nsenter forks into the PID namespace and does not forward signals: HostProcess does."""
    a = lab("alpha", 11)
    trap = a.popen(["sh", "-c", "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.1; done"],
                   stdout=subprocess.PIPE, text=True)
    assert trap.stdout.readline().strip() == "ready"
    trap.terminate()
    assert trap.stdout.read().strip() == "got-term"
    assert trap.wait(timeout=10) == 3
