"""The Python programs the lab runs outside pibake's own process are real files: a lab host's PID 1
(``pibake/lab/remote/lab_init.py``, package data) and the registry probe run inside the manager's network
namespace (``pibake.lab.registry_probe``)."""

import configparser
import fnmatch
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pibake.lab import hosts as lab_hosts
from pibake.lab import registry_probe
from tests.conftest import needs_program, needs_root

ROOT = Path(__file__).resolve().parents[2]
LAB_INIT = ROOT / "pibake" / "lab" / "remote" / "lab_init.py"


def _load_lab_init():
    namespace = {"__name__": "lab_init"}
    exec(compile(LAB_INIT.read_text(), str(LAB_INIT), "exec"), namespace)  # noqa: S102  not a module: a program
    return namespace


def test_the_lab_init_program_ships_as_package_data():
    assert lab_hosts.init_program() == LAB_INIT.read_text()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["pibake.lab"].split(",")]
    assert any(fnmatch.fnmatch("remote/lab_init.py", p) for p in patterns)


def test_lab_init_reads_its_binds():
    assert _load_lab_init()["parse_binds"](["/a/b=/etc/b", "/x=/y=z"]) == [("/a/b", "/etc/b"), ("/x", "/y=z")]


@needs_root("PID 1 of a lab host mounts /run and binds in its own namespaces")
@needs_program("unshare")
def test_lab_init_names_the_host_binds_its_directories_and_stops_on_sigterm(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "seen").write_text("from the host's root\n")
    argv = ["unshare", "--pid", "--fork", "--mount", "--uts", "--mount-proc", "--propagation", "private", "--",
            sys.executable, str(LAB_INIT), "pibake-test-c", "pibake-lab-init:test", f"{src}={dst}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
        pid = lab_hosts._child_pid(proc.pid)  # noqa: SLF001  the lab's own way to find a host's PID 1
        enter = ["nsenter", "-t", str(pid), "-u", "-m", "--"]
        assert subprocess.run([*enter, "hostname"], capture_output=True, text=True).stdout == "pibake-test-c\n"
        assert subprocess.run([*enter, "cat", str(dst / "seen")], capture_output=True, text=True).stdout == \
            "from the host's root\n"
        assert subprocess.run([*enter, "stat", "-c", "%a", "/run/lock"], capture_output=True,
                              text=True).stdout == "1777\n"
        assert not (dst / "seen").exists()  # the bind stays inside the host's mount namespace
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("ca, reason", [
    ("missing", "the cluster CA {ca} is missing: run `pibake init` (or copy the cluster directory with its secrets/)"),
    ("cluster", "connection refused"),
])
def test_the_registry_probe_says_0_and_why_when_nothing_answers(tmp_path, ca, reason):
    import socket

    from pibake.cluster import init_cluster

    if ca == "cluster":
        init_cluster(tmp_path / "c", manager="localhost", manager_ip="127.0.0.1", network="127.0.0.0/8", name="c")
    ca_file = str(tmp_path / "c" / "secrets" / "ca.crt")
    with socket.socket() as s:  # a free port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = io.StringIO()
    spec = {"base": f"https://127.0.0.1:{port}", "ca": ca_file, "path": "/health", "password": None, "timeout": 5}
    assert registry_probe.main(io.StringIO(json.dumps(spec)), out) == 0
    assert json.loads(out.getvalue()) == [0, reason.format(ca=ca_file)]


@pytest.mark.parametrize("password, status", [(None, 401), ("wrong", 401), ("right", 200)])
def test_the_registry_probe_asks_the_real_registry(live_registry, password, status):
    """``python -m pibake.lab.registry_probe`` as the lab runs it (a separate interpreter, JSON on stdin)."""
    spec = {"base": live_registry.base, "ca": live_registry.ca, "path": "/nodes",
            "password": live_registry.password if password == "right" else password}
    proc = subprocess.run([sys.executable, "-m", "pibake.lab.registry_probe"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=60, check=True)
    got_status, body = json.loads(proc.stdout)
    assert got_status == status
    assert body == [] if status == 200 else isinstance(body, str) and body
    assert live_registry.password not in proc.stdout + proc.stderr


@pytest.fixture
def live_registry(tmp_path):
    from tests.live_registry import serve

    live, stop = serve(tmp_path)
    yield live
    stop()
