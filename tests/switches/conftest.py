"""Devices for the switch tests, all on loopback: the npm TP-Link simulator, a real Mosquitto with a password
file, the Shelly/Tasmota fakes of fakes.py, and a cluster directory declaring them."""

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from pibake.run import which
from tests.conftest import needs_program
from tests.fixtures_plugin import LOOPBACK, RED, new_cluster, wait_for_port
from tests.switches.fakes import FakeShelly, FakeTasmota

# Marks for the tests that use the npm plug simulator or Mosquitto (the one place that says what they need).
needs_kasa_simulator = needs_program("node", "npm")
needs_mosquitto = needs_program("mosquitto", "mosquitto_passwd")

HERE = Path(__file__).resolve().parent
KASA_SIMULATOR = "tplink-smarthome-simulator@5.0.1"
MQTT_USER, MQTT_PASSWORD = "pibake", "broker-secret-42"


def npm_cache():
    """Where the npm simulator is installed once per machine (never into the checkout)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pibake-test" / "npm"


def install_kasa_simulator():
    prefix = npm_cache()
    package = prefix / "node_modules" / "tplink-smarthome-simulator" / "package.json"
    if not package.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run([which("npm"), "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                        KASA_SIMULATOR], check=True, capture_output=True, timeout=300)
    return prefix / "node_modules"


class KasaSimulator:
    """One HS110 plug of tplink-smarthome-simulator, run by node on 127.0.0.1:<free port>."""

    def __init__(self, model="hs110"):
        node_modules = install_kasa_simulator()
        # The simulator binds UDP to a free port, then TCP to the same number, which another program may
        # hold: then it exits, and a new try picks another port.
        for _ in range(5):
            self.proc = subprocess.Popen([which("node"), str(HERE / "kasa_simulator.js"), model],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, "NODE_PATH": str(node_modules)})
            line = self.proc.stdout.readline()
            if line:
                break
            error = self.proc.stderr.read()
            self.proc.wait()
        else:
            raise RuntimeError(f"the Kasa simulator did not start: {error[-500:]}")
        self.port = json.loads(line)["port"]
        self.address = f"127.0.0.1:{self.port}"

    def pause(self):  # the plug keeps its socket but stops answering (a hung device)
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def kasa_plug():
    if not (which("node") and which("npm")):
        pytest.skip("not installed: node, npm (the TP-Link plug simulator runs on node)")
    sim = KasaSimulator()
    yield sim
    sim.stop()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    """A real Mosquitto on 127.0.0.1 that only lets MQTT_USER in (password file made by mosquitto_passwd)."""
    broker, passwd = which("mosquitto"), which("mosquitto_passwd")
    if not (broker and passwd):
        pytest.skip("not installed: mosquitto (Debian package mosquitto)")
    where = tmp_path_factory.mktemp("mosquitto")
    subprocess.run([passwd, "-b", "-c", str(where / "passwd"), MQTT_USER, MQTT_PASSWORD], check=True,
                   capture_output=True)
    port = free_port()
    conf = where / "mosquitto.conf"
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {where / 'passwd'}\npersistence false\nlog_dest stderr\n")
    proc = subprocess.Popen([broker, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    wait_for_port(port, proc, "mosquitto")
    yield port
    proc.terminate()
    proc.wait(5)


@pytest.fixture(scope="module")
def mosquitto_tls(tmp_path_factory):
    """Mosquitto with TLS only, its certificate from a pibake cluster CA (the registry certificate of a
    cluster whose manager is 127.0.0.1): yields (port, cluster directory)."""
    broker, passwd = which("mosquitto"), which("mosquitto_passwd")
    if not (broker and passwd):
        pytest.skip("not installed: mosquitto (Debian package mosquitto)")
    where = tmp_path_factory.mktemp("mosquitto-tls")
    cluster = where / "cluster"
    new_cluster(cluster, name="tls", **LOOPBACK)
    subprocess.run([passwd, "-b", "-c", str(where / "passwd"), MQTT_USER, MQTT_PASSWORD], check=True,
                   capture_output=True)
    port = free_port()
    secrets = cluster / "secrets"
    (where / "mosquitto.conf").write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {where / 'passwd'}\n"
        f"cafile {secrets / 'ca.crt'}\ncertfile {secrets / 'registry.crt'}\nkeyfile {secrets / 'registry.key'}\n"
        "persistence false\nlog_dest stderr\n")
    proc = subprocess.Popen([broker, "-c", str(where / "mosquitto.conf")], stderr=subprocess.PIPE, text=True)
    wait_for_port(port, proc, "mosquitto")
    yield port, cluster
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def shelly():
    device = FakeShelly(password="shelly-pass-1").start()
    yield device
    device.stop()


@pytest.fixture
def tasmota():
    device = FakeTasmota(password="tasmota-pass-1").start()
    yield device
    device.stop()


BASE = {"name": "red", **RED}


def write_cluster(cluster_dir, switches=None, **settings):
    """A real cluster directory (tests/fixtures_plugin.py) whose cluster.yaml declares ``switches`` (and
    ``settings``); no ssh keys (``home`` without .ssh)."""
    if switches is not None:
        settings["switches"] = switches
    return new_cluster(cluster_dir, name="red", home=cluster_dir, settings=settings)
