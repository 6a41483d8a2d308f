"""docs/sensors-node.md: its settings example loads with the agent's own loader, and the agent commands it shows
(--dry-run --json, --status) run against a simulated bus (the page's sn-settings and sn-node-check blocks)."""

import json
import re
import subprocess
import sys

import pytest

from tests.firstboot.sensorkit import AGENT_FILE, FIXTURES, ROOT, load_agent

# the agent reads the simulated bus through the real driver (a test extra)
pytest.importorskip("bme280", reason="test extra RPi.bme280 not installed (pip install -e .[test])")
sa = load_agent()
PAGE = ROOT / "docs" / "sensors-node.md"


def block(name):
    text = PAGE.read_text()
    m = re.search(rf"<!-- doc-test: {name} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"sensors-node.md has no block {name}"
    return m.group(1)


def test_sensors_node_page_blocks(tmp_path):
    shown = json.loads(block("sn-settings"))
    assert set(shown) == set(sa.DEFAULTS) - {"rejected_max", "batch", "request_timeout_s", "backoff_base_s",
                                             "backoff_max_s", "thermal_dir", "proc_net_wireless"}
    # the example, made to run here: the simulated bus instead of /dev/i2c-1, files under tmp_path
    settings = {**shown, "sim_bus": str(FIXTURES / "bme280-lab.json"), "buffer": str(tmp_path / "buffer.sqlite3"),
                "agent_config": str(tmp_path / "agent.json"), "wifi_interface": None}
    config = tmp_path / "sensor.json"
    config.write_text(json.dumps(settings))
    assert sa.load_settings(config)["offsets"] == {"temperature_c": -0.8, "humidity_pct": 2.5}

    lines = [ln for ln in block("sn-node-check").splitlines() if "sensor_agent.py" in ln]
    assert len(lines) == 2
    outputs = []
    for line in lines:
        args = line.split("sensor_agent.py", 1)[1].split()
        proc = subprocess.run([sys.executable, str(AGENT_FILE), "--config", str(config), *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    reading = json.loads(outputs[0])
    assert reading["place"] == "kitchen" and reading["metrics"]["temperature_c"] == 24.28  # 25.08 - 0.8
    assert outputs[1].splitlines()[0] == "pending: 0"  # --dry-run stored nothing
