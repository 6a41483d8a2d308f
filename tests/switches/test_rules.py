"""Rules from a sensor to a switch, with the real pieces: docs/switches.md's sw-rules block as cluster.yaml (its
fan is an HS110 of the npm TP-Link simulator on loopback), readings stored through the manager's own ingest
path (pibake.sensors.Sensors -> readings.db, SQLite), and rules_pass / `pibake switch rules` switching the plug
through python-kasa. Every switching is checked in the switch log."""

import json
import re
import subprocess
import sys
import time

import yaml

from pibake.switches.kasa import KasaSwitch
from tests.switches.conftest import needs_kasa_simulator, write_cluster
from tests.switches.test_docs_blocks import DOCS


def docs_cluster(tmp_path, plug, **switch):
    text = re.search(r"```yaml\n# doc-test: sw-rules\n(.*?)```", (DOCS / "switches.md").read_text(), re.S).group(1)
    data = yaml.safe_load(text)
    data["switches"][0].update(address=plug.address, **switch)  # the block's 10.1.1.50 is never contacted
    return write_cluster(tmp_path / "cluster", **data), data


class Temp01:
    """The sensor node temp01 sending its readings to the manager (the ingest POST /api/v1/readings runs)."""

    def __init__(self, cluster):
        from pibake.sensors import Sensors

        self.sensors, self.seq = Sensors(cluster), 0

    def send(self, celsius, at):
        self.seq += 1
        reading = {"seq": self.seq, "time": at, "metrics": {"temperature_c": celsius, "humidity_pct": 40.0}}
        assert self.sensors.ingest("temp01", {"readings": [reading]}, now=at)["accepted"] == 1


def plug_on(plug):
    from pibake.model import SwitchConfig

    return KasaSwitch(SwitchConfig(name="fan", driver="kasa", address=plug.address)).state().on


def rule_entries(cluster):
    from pibake import switches

    return [e for e in switches.switch_log(cluster, 1000) if str(e.get("by", "")).startswith("rule ")]


@needs_kasa_simulator
def test_the_docs_rule_switches_the_fan_from_stored_readings(tmp_path, kasa_plug):
    from pibake.switches.rules import rules_pass

    cluster, data = docs_cluster(tmp_path, kasa_plug)
    rule = data["rules"][0]
    assert (rule["on_above"], rule["off_below"], rule["min_on_s"]) == (30, 27, 300)
    temp01 = Temp01(cluster)
    t0 = time.time()
    assert plug_on(kasa_plug) is False  # the simulator's relay starts off

    def round_at(offset):
        [row] = rules_pass(cluster, clock=lambda: t0 + offset)
        return row

    # no reading yet: nothing happens
    row = round_at(0)
    assert (row["action"], row["why"]) == (None, "no temperature_c reading from temp01; fan left off")

    temp01.send(31.2, t0)
    row = round_at(1)
    assert (row["action"], row["on"], row["value"]) == ("on", True, 31.2)
    assert row["why"] == "temperature_c 31.2°C is above 30°C"
    assert plug_on(kasa_plug) is True

    temp01.send(28.0, t0 + 2)  # inside the hysteresis band
    assert round_at(3)["why"] == "temperature_c 28°C: fan stays on"

    temp01.send(26.0, t0 + 4)  # below off_below, but the fan was switched on a few seconds ago
    row = round_at(5)
    assert row["action"] is None and "(min_on_s 300); it stays on for now" in row["why"], row
    assert plug_on(kasa_plug) is True

    row = round_at(305)  # min_on_s later (the reading is 301 s old, within max_age_s 600)
    assert (row["action"], row["on"], row["why"]) == ("off", False, "temperature_c 26°C is below 27°C")
    assert plug_on(kasa_plug) is False

    row = round_at(4 + 601)  # the newest reading is now too old: nothing is switched on stale data
    assert row["action"] is None and row["why"] == ("temp01's newest temperature_c is 601 s old (max_age_s 600); "
                                                    "fan left off")

    entries = rule_entries(cluster)
    assert [(e["action"], e["on"], e["why"]) for e in entries] == [
        ("on", True, "temperature_c 31.2°C is above 30°C"), ("off", False, "temperature_c 26°C is below 27°C")]
    assert all(e["by"] == "rule cupboard-fan" and e["switch"] == "fan" and e["ok"] for e in entries)


@needs_kasa_simulator
def test_switch_rules_once_json_and_a_hand_switching_counts_as_a_change(tmp_path, kasa_plug):
    from pibake import switches

    cluster, _data = docs_cluster(tmp_path, kasa_plug)
    Temp01(cluster).send(31.5, time.time())
    pibake = [sys.executable, "-m", "pibake", "--cluster", str(cluster), "switch"]
    switches.switch_command(cluster, "fan", "off", by="cli")  # a person turned the fan off a moment ago
    proc = subprocess.run(pibake + ["rules", "--once", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["rule"] == "cupboard-fan" and row["action"] is None and row["on"] is False
    assert "(min_off_s 300); it stays off for now" in row["why"]
    assert plug_on(kasa_plug) is False and rule_entries(cluster) == []

    # the human output: one line per rule with the reason
    proc = subprocess.run(pibake + ["rules", "--once"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.startswith("rule cupboard-fan: temperature_c 31.5°C is above 30°C"), \
        proc.stderr


@needs_kasa_simulator
def test_an_unreachable_plug_is_reported_and_the_exit_code_says_so(tmp_path, kasa_plug):
    cluster, _data = docs_cluster(tmp_path, kasa_plug, timeout=1)
    Temp01(cluster).send(31.5, time.time())
    kasa_plug.stop()
    proc = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(cluster), "switch", "rules", "--once",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["action"] == "error" and row["on"] is None and "fan" in row["why"] and "Traceback" not in proc.stderr


def test_no_rules_says_so(tmp_path):
    cluster = write_cluster(tmp_path / "cluster")
    proc = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(cluster), "switch", "rules", "--once"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "no rules in cluster.yaml (see docs/switches.md)"
