"""GET /api/v1/rules, the rules on the page and `pibake switch rules --list`: the rules loop's last round as the
registry shows it. The fan is the npm Kasa simulator on loopback; readings go through the manager's own
ingest path (pibake.sensors.Sensors -> readings.db); rounds are pibake.switches.rules.rules_pass, what
pibake-switch-rules.service runs every minute."""

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pibake.switches.rules import rules_pass
from tests.switches.conftest import kasa_plug, needs_kasa_simulator  # noqa: F401  (fixture)

RULE = {"name": "cupboard-fan", "sensor": "temp01", "metric": "temperature_c", "switch": "fan",
        "on_above": 30, "off_below": 27, "min_on_s": 0, "min_off_s": 0, "max_age_s": 600}


def add_rule(cluster_dir, plug):
    path = cluster_dir / "cluster.yaml"
    data = yaml.safe_load(path.read_text())
    data["switches"] = [{"name": "fan", "driver": "kasa", "address": plug.address, "thing": "fan", "timeout": 2}]
    data["rules"] = [RULE]
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def send(cluster_dir, celsius, at, seq):
    from pibake.sensors import Sensors

    reading = {"seq": seq, "time": at, "metrics": {"temperature_c": celsius}}
    assert Sensors(cluster_dir).ingest("temp01", {"readings": [reading]}, now=at)["accepted"] == 1


def login(client, creds):
    assert client.post("/login", data={"password": creds.admin[1]}).status_code == 302


@needs_kasa_simulator
def test_rules_over_rest_on_the_page_and_in_the_cli(client, creds, cluster_dir, kasa_plug):  # noqa: F811
    add_rule(cluster_dir, kasa_plug)
    assert client.get("/api/v1/rules").status_code == 401
    before = client.get("/api/v1/rules", auth=creds.admin)
    assert before.status_code == 200 and before.json["last_round"] is None
    [item] = before.json["rules"]
    assert item["last"] is None and item["thresholds"]["on_above"] == 30
    assert item["describe"] == "fan on above 30°C, off below 27°C (temp01 temperature_c)"

    t0 = time.time()
    rules_pass(cluster_dir, clock=lambda: t0)  # no reading yet: stale, nothing switched
    [stale] = client.get("/api/v1/rules", auth=creds.admin).json["rules"]
    assert (stale["last"]["state"], stale["last"]["action"], stale["last"]["value"]) == ("stale", None, None)

    send(cluster_dir, 31.5, t0 + 10, 1)
    rules_pass(cluster_dir, clock=lambda: t0 + 12)
    answer = client.get("/api/v1/rules", auth=creds.admin).json
    [hot] = answer["rules"]
    assert hot["last"]["state"] == "ok" and hot["last"]["action"] == "on" and hot["last"]["on"] is True
    assert hot["last"]["value"] == 31.5 and hot["last"]["reading_age_s"] == 2.0
    assert hot["last"]["why"] == "temperature_c 31.5°C is above 30°C"
    ok_since = hot["last"]["since"]
    assert answer["last_round"] == hot["last"]["time"]

    send(cluster_dir, 28.0, t0 + 20, 2)
    rules_pass(cluster_dir, clock=lambda: t0 + 80)  # still ok: the state's start stays where it was
    [calm] = client.get("/api/v1/rules", auth=creds.admin).json["rules"]
    assert calm["last"]["action"] is None and calm["last"]["since"] == ok_since and calm["last"]["on"] is True

    login(client, creds)
    page = client.get("/").get_data(as_text=True)
    assert 'id="rules"' in page and 'id="rule-cupboard-fan"' in page
    assert "temperature_c 28°C: fan stays on" in page and "28.0 <small>(60.0 s old)" in page

    kasa_plug.stop()  # the plug stops answering: error, with its own start time
    rules_pass(cluster_dir, clock=lambda: t0 + 90)
    [broken] = client.get("/api/v1/rules", auth=creds.admin).json["rules"]
    assert broken["last"]["state"] == "error" and broken["last"]["action"] == "error" and broken["last"]["on"] is None
    assert broken["last"]["since"] != ok_since and "fan" in broken["last"]["why"]
    assert '<span class="badge error">error</span>' in client.get("/").get_data(as_text=True)

    # docs/switches.md, block sw-rules-list: the table, then the JSON (the same as GET /api/v1/rules' rules)
    text = (Path(__file__).resolve().parents[2] / "docs" / "switches.md").read_text()
    lines = re.search(r"```sh\n# doc-test: sw-rules-list\n(.*?)```", text, re.S).group(1).strip().splitlines()
    runs = [subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(cluster_dir), *shlex.split(line)[1:]],
                           capture_output=True, text=True, timeout=120) for line in lines]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert "cupboard-fan" in runs[0].stderr and "error since" in runs[0].stderr, runs[0].stderr
    assert json.loads(runs[1].stdout) == client.get("/api/v1/rules", auth=creds.admin).json["rules"]
