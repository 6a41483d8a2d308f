"""The switch blocks of the manual, run as written against the Kasa simulator and the Shelly/Tasmota fakes."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.switches.conftest import needs_kasa_simulator, needs_mosquitto, write_cluster

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXITS_RE = re.compile(r"\s+#\s*exits (\d+)\s*$")


def block(page, name):
    return re.search(rf"```sh\n# doc-test: {name}\n(.*?)```", (DOCS / page).read_text(), re.S).group(1)


def run_block(text, cwd):
    """Run each pibake line in ``cwd``; `# exits N` is the wanted code."""
    outputs = []
    for line in text.splitlines():
        wanted = 0
        match = EXITS_RE.search(line)
        if match:
            wanted, line = int(match.group(1)), line[:match.start()]
        words = shlex.split(line)
        assert words[0] == "pibake"
        out = subprocess.run([sys.executable, "-m", "pibake", *words[1:]], cwd=cwd,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == wanted, (line, out.stderr)
        assert "Traceback" not in out.stderr
        outputs.append((line, out))
    return outputs


@needs_kasa_simulator
def test_commands_page_switch_block(tmp_path, kasa_plug, shelly, tasmota):
    """docs/commands.md, block cmd-switch."""
    tasmota.password = "tasmota-pass-1"
    write_cluster(tmp_path / "cluster", [
        {"name": "rack-red01", "driver": "shelly", "address": shelly.address, "node": "red01"},
        {"name": "fan", "driver": "tasmota", "address": tasmota.address, "thing": "fan"},
        {"name": "lamp", "driver": "kasa", "address": kasa_plug.address, "thing": "lamp"},
    ])
    (tmp_path / "fan-password").write_text("tasmota-pass-1\n")
    from pibake import switches
    switches.set_credentials(tmp_path / "cluster", "rack-red01", password="shelly-pass-1")
    outputs = dict(run_block(block("commands.md", "cmd-switch"), tmp_path))
    assert tasmota.power is False and shelly.output is False  # on, toggle -> off; off
    assert "fan: on" in outputs["pibake switch on fan"].stderr
    assert '"model": "Nous A1T"' in outputs["pibake switch info fan --json"].stdout
    assert "no rules in cluster.yaml" in outputs["pibake switch rules --once"].stderr


def doc_cluster_yaml(kasa_plug, shelly, tasmota, mqtt_port):
    """docs/switches.md's sw-config with the example addresses replaced by the loopback devices."""
    import yaml

    text = re.search(r"```yaml\n# doc-test: sw-config\n(.*?)```", (DOCS / "switches.md").read_text(), re.S).group(1)
    data = yaml.safe_load(text)
    where = {"10.1.1.50": kasa_plug.address, "10.1.1.51": shelly.address, "10.1.1.52": tasmota.address,
             "10.1.1.10:1883": f"127.0.0.1:{mqtt_port}"}
    for entry in data["switches"]:
        for key in ("address", "mqtt_broker"):
            if key in entry:
                entry[key] = where[entry[key]]
    return data


def json_keys(value):
    if isinstance(value, dict):
        return {k: json_keys(v) for k, v in value.items()}
    return None


@needs_kasa_simulator
@needs_mosquitto
def test_switches_page_blocks(tmp_path, kasa_plug, shelly, tasmota, mosquitto, monkeypatch):
    """docs/switches.md, blocks sw-credentials, sw-commands (and its JSON sample) and sw-python, as written,
    against the devices of sw-config: the Kasa simulator, the Shelly fake and the Tasmota fake on Mosquitto."""
    import json

    import yaml

    from tests.switches.conftest import MQTT_PASSWORD

    tasmota.connect_mqtt(mosquitto, "pibake", MQTT_PASSWORD)
    write_cluster(tmp_path / "cluster", [])
    data = doc_cluster_yaml(kasa_plug, shelly, tasmota, mosquitto)
    (tmp_path / "cluster" / "cluster.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "net-password").write_text("shelly-pass-1\n")
    (tmp_path / "broker-password").write_text(MQTT_PASSWORD + "\n")

    run_block(block("switches.md", "sw-credentials"), tmp_path)
    outputs = run_block(block("switches.md", "sw-commands"), tmp_path)
    assert shelly.output is True  # off, then cycled: on again
    assert [t for t, p, _ in tasmota.mqtt_seen if p in ("ON", "TOGGLE")] == ["cmnd/tasmota_5A1B2C/Power1"] * 2
    line, last = outputs[-1]
    printed = json.loads(last.stdout)
    sample = re.search(rf"{re.escape(line)}\n```\n\n```json\n(.*?)```", (DOCS / "switches.md").read_text(), re.S)
    assert json_keys(json.loads(sample.group(1))) == json_keys(printed)
    assert printed["state"] == {"on": False, "power_w": 0.0, "energy_kwh": 1.234}

    code = re.search(r"```python\n# doc-test: sw-python\n(.*?)```", (DOCS / "switches.md").read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), "sw-python", "exec"), {})  # noqa: S102  the manual's example, as written
    assert tasmota.power is True
