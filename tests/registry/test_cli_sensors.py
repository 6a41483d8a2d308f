"""`pibake sensors list|show|export|mark|threshold` against a real cluster directory whose readings came in
through the real REST endpoint; docs/commands.md's cmd-sensors block is run line by line."""

import csv
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pibake.registry.app import create_app
from tests.registry.conftest import enrolment

REPO = Path(__file__).resolve().parents[2]


def pibake(cluster_dir, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(cluster_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture
def with_readings(cluster_dir, app_options, creds):
    """red-zero (a sensor) sent 30 readings over the last half hour, with a Wi-Fi scan."""
    client = create_app(cluster_dir, **app_options).test_client()
    r = client.post("/api/v1/enrol", json=enrolment("red-zero", 9, role="sensor"), headers=creds.join)
    auth = ("red-zero", r.json["credential"])
    now = time.time()
    nets = [{"ssid": "home:5G\\", "bssid": "aa:bb:cc:dd:ee:01", "signal_dbm": -51, "signal_pct": 88, "channel": 36,
             "frequency_mhz": 5180, "security": "WPA2"}]
    readings = [{"seq": i, "time": now - 1800 + i * 60, "place": None, "networks": nets if i == 29 else [],
                 "metrics": {"temperature_c": 20.0 + i / 10, "humidity_pct": 45.0, "pressure_hpa": 1006.5,
                             "wifi_signal_dbm": -51, "throttled": 0}} for i in range(30)]
    r = client.post("/api/v1/readings", json={"readings": readings}, auth=auth)
    assert r.status_code == 200 and r.json["accepted"] == 30
    return cluster_dir


def test_list_show_export_mark_threshold(with_readings, tmp_path):
    d = with_readings
    out = pibake(d, "sensors", "list", "--json")
    assert out.returncode == 0, out.stderr
    (item,) = json.loads(out.stdout)
    assert item["node"] == "red-zero" and item["offline"] is False and item["last_seq"] == 29
    assert item["values"]["temperature_c"] == {"value": 22.9, "unit": "°C"}

    human = pibake(d, "sensors", "list")
    assert human.returncode == 0 and human.stdout == ""
    assert re.search(r"red-zero\s+-\s+online\s+\d+s ago\s+22.9 °C\s+45 %\s+1006.5 hPa\s+-51 dBm", human.stderr)

    shown = pibake(d, "sensors", "show", "red-zero")
    assert shown.returncode == 0 and "home:5G\\" in shown.stderr and "-51 dBm" in shown.stderr

    exported = pibake(d, "sensors", "export", "red-zero", "--format", "csv", "--since", "-10m")
    rows = list(csv.DictReader(exported.stdout.splitlines()))
    assert exported.returncode == 0 and 9 <= len(rows) <= 11
    assert rows[-1]["temperature_c"] == "22.9" and rows[-1]["gas_ohm"] == "" and rows[-1]["seq"] == "29"
    as_json = json.loads(pibake(d, "sensors", "export", "red-zero", "--format", "json").stdout)
    assert [r["seq"] for r in as_json] == list(range(30))

    marked = pibake(d, "sensors", "mark", "red-zero", "living room", "--json")
    assert marked.returncode == 0 and json.loads(marked.stdout)["place"] == "living room"
    assert json.loads(pibake(d, "sensors", "list", "--json").stdout)[0]["place_set"] == "living room"

    set_ = pibake(d, "sensors", "threshold", "red-zero", "temperature_c", "--max", "22", "--json")
    assert json.loads(set_.stdout) == {"min": None, "max": 22.0, "source": "api"}
    item = json.loads(pibake(d, "sensors", "show", "red-zero", "--json").stdout)
    assert item["alerts"]["temperature_c"]["state"] == "high" and item["alerting"] == ["temperature_c"]


@pytest.mark.parametrize("args,message", [
    (("show", "nobody"), "pibake: error: no node named nobody is enrolled or has sent readings"),
    (("mark", "red-zero", "kitchen\nx"), "pibake: error: place: 'kitchen\\nx' is not a place label"),
    (("mark", "red-zero"), "pibake: error: give a PLACE, or --clear (not both)"),
    (("threshold", "red-zero", "lux", "--max", "3"), "pibake: error: metric: unknown metric 'lux'"),
    (("threshold", "red-zero", "humidity_pct", "--min", "70", "--max", "60"),
     "pibake: error: threshold: humidity_pct: min 70 is above max 60"),
    (("export", "red-zero", "--since", "yesterday"), "pibake: error: since: 'yesterday' is not a time"),
])
def test_bad_input_is_one_line_and_exit_1(with_readings, args, message):
    out = pibake(with_readings, "sensors", *args)
    assert out.returncode == 1 and out.stderr.startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_commands_page_sensors_block(with_readings, tmp_path):
    """docs/commands.md cmd-sensors, every line, with the exit code it names."""
    text = (REPO / "docs" / "commands.md").read_text()
    block = re.search(r"# doc-test: cmd-sensors\n(.*?)```", text, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) >= 8
    for line in lines:
        command, _, comment = line.partition("#")
        expected = int(re.search(r"exits (\d+)", comment).group(1)) if "exits" in comment else 0
        argv = shlex.split(command)
        assert argv[:2] == ["pibake", "sensors"]
        out = pibake(with_readings, *argv[1:], cwd=tmp_path)
        assert out.returncode == expected, (line, out.stderr)
    assert (tmp_path / "red-zero.csv").read_text().startswith("seq,time,utc,place,temperature_c,")


def _sensors_page_block(name, lang):
    text = (REPO / "docs" / "sensors.md").read_text()
    return re.search(rf"```{lang}\n# doc-test: {name}\n(.*?)```", text, re.S).group(1)


def test_sensors_page_cli_block(with_readings, tmp_path):
    """docs/sensors.md sens-cli, every line."""
    for line in _sensors_page_block("sens-cli", "sh").strip().splitlines():
        argv = shlex.split(line)
        assert argv[:2] == ["pibake", "sensors"]
        out = pibake(with_readings, *argv[1:], cwd=tmp_path)
        assert out.returncode == 0, (line, out.stderr)
    assert len((tmp_path / "red-zero.csv").read_text().splitlines()) == 31


def test_sensors_page_python_block(with_readings, monkeypatch, capsys):
    """docs/sensors.md sens-python, run in the directory holding the cluster (its path is "cluster")."""
    monkeypatch.chdir(with_readings.parent)
    assert with_readings.name == "cluster"
    exec(compile(_sensors_page_block("sens-python", "python"), "sens-python", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("red-zero online {'value': 22.9, 'unit': '°C'}")
    source, points, threshold = out[1].split()
    assert source == "hourly" and points in ("1", "2") and threshold == "None"  # 30 minutes of readings, a week
    from pibake.sensors import Sensors

    assert Sensors(with_readings).show("red-zero")["thresholds"]["humidity_pct"]["max"] == 65
