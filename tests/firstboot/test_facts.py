"""Agent facts: each pure parser on recorded fixtures (Pi 3/4/5, Raspberry Pi OS, Ubuntu), then the
readers on this machine, and the agent's import footprint in Debian's own python3."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from pibake.firstboot import agent
from tests.conftest import needs_program
from tests.fixtures_plugin import recorded, slurmd_c

def fixture(name, binary=False):
    return recorded(f"node/{name}", binary)


@pytest.mark.parametrize("name, model", [
    ("model-pi3bplus.bin", "Raspberry Pi 3 Model B Plus Rev 1.3"),
    ("model-pi4b.bin", "Raspberry Pi 4 Model B Rev 1.4"),
    ("model-pi5b.bin", "Raspberry Pi 5 Model B Rev 1.0"),
])
def test_device_tree_model(name, model):
    assert agent.parse_device_tree_model(fixture(name, binary=True)) == model


@pytest.mark.parametrize("raw", [b"", b"\x00", b"  \x00"])
def test_device_tree_model_empty_is_none(raw):
    assert agent.parse_device_tree_model(raw) is None


def test_cpuinfo_pi4():
    text = fixture("cpuinfo-pi4b.txt")
    assert agent.parse_cpuinfo_count(text) == 4
    assert agent.parse_cpuinfo_model(text) == "Raspberry Pi 4 Model B Rev 1.4"
    # an x86 cpuinfo has "model name", never "Model": no false model
    assert agent.parse_cpuinfo_model("processor\t: 0\nmodel name\t: Intel Xeon\nmodel\t\t: 85\n") is None


def test_meminfo():
    assert agent.parse_meminfo_mb(fixture("meminfo-pi4b.txt")) == 7806
    assert agent.parse_meminfo_mb("MemFree: 10 kB\n") is None


@pytest.mark.parametrize("board, node, cpus, mem", [
    ("pi3bplus", "red03", 4, 906),
    ("pi4b-4g", "red02", 4, 3789),
    ("pi4b-8g", "red01", 4, 7806),
    ("pi5b", "red05", 4, 8052),
    ("vm", "vm", 2, 24105),
])
def test_slurmd_c(board, node, cpus, mem):
    facts = agent.parse_slurmd_c(slurmd_c(board))
    assert facts["NodeName"] == node
    assert facts["CPUs"] == cpus and facts["RealMemory"] == mem
    assert facts["Boards"] == 1 and facts["SocketsPerBoard"] == 1 and facts["ThreadsPerCore"] == 1
    assert facts["CoresPerSocket"] * facts["SocketsPerBoard"] * facts["ThreadsPerCore"] == cpus
    assert isinstance(facts["UpTime"], str)


def test_slurmd_c_without_nodename_is_an_error():
    with pytest.raises(ValueError, match="NodeName"):
        agent.parse_slurmd_c("slurmd: error: something\n")


def test_os_release_raspios_and_ubuntu():
    pi = agent.parse_os_release(fixture("os-release-raspios-bookworm.txt"))
    assert pi["ID"] == "raspbian" and pi["VERSION_CODENAME"] == "bookworm"
    assert pi["PRETTY_NAME"] == "Raspbian GNU/Linux 12 (bookworm)"
    ub = agent.parse_os_release(fixture("os-release-ubuntu-noble.txt"))
    assert ub["VERSION"] == "24.04.1 LTS (Noble Numbat)" and ub["ID_LIKE"] == "debian"


def test_os_release_quoting_and_junk():
    text = '# comment\n\nNAME="A \\"quoted\\" name"\nX=\'single\'\nnot a line\n1BAD=x\nEMPTY=\n'
    assert agent.parse_os_release(text) == {"NAME": 'A "quoted" name', "X": "single", "EMPTY": ""}


def test_default_route_lowest_metric():
    assert agent.parse_default_route_iface(fixture("net-route-pi-wlan-eth.txt")) == "eth0"
    header = fixture("net-route-pi-wlan-eth.txt").splitlines()[0]
    assert agent.parse_default_route_iface(header + "\n") is None


def test_addresses_and_mac_choice():
    addrs = {
        "lo": [("inet", "127.0.0.1"), ("inet6", "::1"), ("link", "00:00:00:00:00:00")],
        "eth0": [("inet", "10.1.1.11"), ("inet6", "fe80::1%eth0"), ("link", "DC:A6:32:01:02:03")],
        "wlan0": [("inet", "192.168.1.50"), ("inet6", "2001:db8::5"), ("link", "dc:a6:32:0a:0b:0c")],
    }
    ips, macs = agent.parse_addresses(addrs)
    assert ips == ["10.1.1.11", "192.168.1.50", "2001:db8::5"]
    assert macs == {"eth0": "dc:a6:32:01:02:03", "wlan0": "dc:a6:32:0a:0b:0c"}
    assert agent.choose_mac(macs, "wlan0", ["eth0", "wlan0"]) == "dc:a6:32:0a:0b:0c"
    assert agent.choose_mac(macs, None, ["eth0", "wlan0"]) == "dc:a6:32:01:02:03"
    assert agent.choose_mac({}, None, []) is None


@needs_program("slurmd")
def test_collect_facts_on_this_machine():
    facts = agent.collect_facts({"role": "worker"})
    assert facts["hostname"] == socket.gethostname().split(".")[0]
    assert facts["cpus"] >= 1 and facts["memory_mb"] >= 64
    assert facts["slurmd_c"].startswith("NodeName=")
    assert facts["slurmd_c_parsed"]["CPUs"] == facts["cpus"]
    assert facts["mac"] and len(facts["mac"].split(":")) == 6
    assert facts["os_release"]["ID"]
    assert facts["model"]
    assert facts["agent_version"] == agent.AGENT_VERSION
    json.dumps(facts)  # the enrolment body is JSON


def test_agent_runs_on_debian_python_with_only_stdlib_and_psutil():
    """cloud-init runs the agent with Debian's python3: none of pibake's other dependencies may load, and not
    requests either (importing it cost ~70 ms of CPU per agent run, a third of a deploy's work on a node)."""
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("Debian's /usr/bin/python3 is not installed")
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('agent', {str(Path(agent.__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.parse_slurmd_c('NodeName=x CPUs=1')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('flask', 'click', 'jinja2', 'yaml', 'pibake', 'cryptography', 'werkzeug'))\n"
        "print(json.dumps({'bad': bad, 'requests': 'requests' in sys.modules, 'psutil': 'psutil' in sys.modules}))\n"
    )
    proc = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"bad": [], "requests": False, "psutil": True}


def test_agent_help_on_debian_python():
    proc = subprocess.run(["/usr/bin/python3", "-I", agent.__file__, "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "--config" in proc.stdout
