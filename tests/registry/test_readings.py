"""Sensor readings on the manager: POST /api/v1/readings (node credential, schema, clock, batch size,
idempotence), the readings store (real SQLite: downsampling, retention, late readings), thresholds and
alerts, places, GET /api/v1/sensors..."""

import json
import sqlite3
import time

import pytest
import yaml

from pibake.errors import ConfigError, RegistryError
from pibake.registry.schema import openapi_document
from pibake.sensors import Sensors
from pibake.sensors_model import MAX_BATCH, METRICS, metrics_schema
from tests.fixtures_plugin import update_cluster_yaml
from tests.registry.conftest import enrolment

T0 = 1796306400.0  # 2026-12-03 14:00 UTC, on an hour


def reading(seq, t, **metrics):
    return {"seq": seq, "time": t, "place": None,
            "metrics": metrics or {"temperature_c": 21.43, "humidity_pct": 40.2, "pressure_hpa": 1006.53}}


@pytest.fixture
def node(client, creds):
    """red-zero enrolled as a sensor: its HTTP Basic pair."""
    r = client.post("/api/v1/enrol", json=enrolment("red-zero", 9, role="sensor"), headers=creds.join)
    assert r.status_code == 201, r.json
    return ("red-zero", r.json["credential"])


def rows(cluster_dir, sql="SELECT count(*) FROM readings"):
    conn = sqlite3.connect(cluster_dir / "readings.db")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------ POST /api/v1/readings

def test_a_node_posts_readings_and_a_resend_stores_nothing_twice(client, node, cluster_dir):
    now = time.time()
    batch = {"readings": [reading(1, now - 20), reading(2, now - 10)]}
    r = client.post("/api/v1/readings", json=batch, auth=node)
    assert r.status_code == 200, r.json
    assert r.json == {"accepted": 2, "duplicates": 0, "last_seq": 2}
    batch["readings"].append(reading(3, now))
    r = client.post("/api/v1/readings", json=batch, auth=node)
    assert r.json == {"accepted": 1, "duplicates": 2, "last_seq": 3}
    assert rows(cluster_dir) == [(3,)]
    assert rows(cluster_dir, "SELECT node FROM sensor_nodes") == [("red-zero",)]


def test_readings_are_a_nodes_own_admin_and_strangers_are_refused(client, node, creds):
    body = {"readings": [reading(1, time.time())]}
    assert client.post("/api/v1/readings", json=body).status_code == 401
    assert client.post("/api/v1/readings", json=body, auth=("red-zero", "wrong")).status_code == 401
    r = client.post("/api/v1/readings", json=body, auth=creds.admin)
    assert r.status_code == 403 and r.is_json
    # the body cannot name another node: there is no such field
    r = client.post("/api/v1/readings", json={"readings": [dict(reading(1, time.time()), node="red01")]}, auth=node)
    assert r.status_code == 400 and "unknown field(s) node" in r.json["error"]


def test_a_pending_node_may_not_send_readings(cluster_dir, app_options, creds):
    from pibake.registry.app import create_app

    client = create_app(cluster_dir, require_approval=True, **app_options).test_client()
    r = client.post("/api/v1/enrol", json=enrolment("red-zero", 9, role="sensor"), headers=creds.join)
    r = client.post("/api/v1/readings", json={"readings": [reading(1, time.time())]},
                    auth=("red-zero", r.json["credential"]))
    assert r.status_code == 403 and "pending approval" in r.json["error"]


@pytest.mark.parametrize("change,status,message", [
    (lambda b: b["readings"][1]["metrics"].update(humidity_pct=140), 400,
     "readings[1].metrics.humidity_pct: 140 is outside 0..100"),
    (lambda b: b["readings"][0]["metrics"].update(temperature_c=-60.5), 400,
     "readings[0].metrics.temperature_c: -60.5 is outside -40..85"),
    (lambda b: b["readings"][0]["metrics"].update(throttled=1.5), 400,
     "readings[0].metrics.throttled: 1.5 must be a whole number"),
    (lambda b: b["readings"][0]["metrics"].update(lux=3), 400, "readings[0].metrics: unknown field(s) lux"),
    (lambda b: b["readings"][1].update(time=time.time() + 3600), 400,
     "clock: readings[1].time is 3600 s ahead of the manager's clock"),
    (lambda b: b["readings"][0].update(time=12), 400, "readings[0].time: must be Unix seconds after 2000-01-01"),
    (lambda b: b["readings"][0].pop("seq"), 400, "readings[0].seq: must be a whole number"),
    (lambda b: b["readings"][0].update(networks=[{"ssid": "x", "bssid": "nope"}]), 400,
     "readings[0].networks[0].bssid: must be a MAC address"),
    (lambda b: b.update(readings=[reading(i, time.time()) for i in range(MAX_BATCH + 1)]), 413,
     f"{MAX_BATCH + 1} readings in one batch; send at most {MAX_BATCH}"),
])
def test_bad_readings_refuse_the_whole_batch_and_store_nothing(client, node, cluster_dir, change, status, message):
    now = time.time()
    body = {"readings": [reading(1, now - 10), reading(2, now)]}
    change(body)
    r = client.post("/api/v1/readings", json=body, auth=node)
    assert r.status_code == status, r.json
    assert r.json["error"].startswith(message), r.json["error"]
    assert rows(cluster_dir) == [(0,)]


def test_a_batch_of_500_readings_with_wifi_scans_fits_the_body_limit(client, node, cluster_dir):
    now = time.time()
    nets = [{"ssid": f"net:{i}\\x", "bssid": f"aa:bb:cc:dd:ee:{i:02x}", "signal_dbm": -40 - i, "signal_pct": 90 - i,
             "channel": 6, "frequency_mhz": 2437, "security": "WPA2 WPA3"} for i in range(12)]
    batch = [dict(reading(i, now - 5000 + i * 10), wifi={"ssid": "home", "bssid": "aa:bb:cc:dd:ee:00", "channel": 6,
                                                          "frequency_mhz": 2437, "bitrate_mbps": 72.2,
                                                          "signal_dbm": -40}, networks=nets)
             for i in range(MAX_BATCH)]
    assert len(json.dumps({"readings": batch})) > 256 * 1024  # over the app's general limit
    r = client.post("/api/v1/readings", json={"readings": batch}, auth=node)
    assert r.status_code == 200 and r.json["accepted"] == MAX_BATCH
    assert rows(cluster_dir, "SELECT count(*) FROM networks") == [(MAX_BATCH * 12,)]


# ------------------------------------------------------------------ the store over a simulated time

@pytest.fixture
def sensors(cluster_dir, client, node):
    return Sensors(cluster_dir)


def feed(sensors, start, hours, every=60, seq0=1, node="red-zero", value=lambda t: 20.0):
    out, seq = [], seq0
    t = start
    while t < start + hours * 3600:
        out.append(reading(seq, t, temperature_c=value(t), humidity_pct=50.0))
        seq += 1
        t += every
    for i in range(0, len(out), MAX_BATCH):
        sensors.ingest(node, {"readings": out[i:i + MAX_BATCH]}, now=out[min(i + MAX_BATCH, len(out)) - 1]["time"])
    return seq


def test_hourly_aggregates_match_the_raw_readings_and_serve_long_ranges(sensors):
    seq = feed(sensors, T0, 3, value=lambda t: 10.0 + (t - T0) / 3600)  # 10..13 rising
    sensors.run_pass(now=T0 + 3 * 3600 + 1)
    raw = sensors.series("red-zero", "temperature_c", T0, T0 + 3 * 3600, 3599, now=T0 + 3 * 3600)
    hourly = sensors.series("red-zero", "temperature_c", T0, T0 + 3 * 3600, 3600, now=T0 + 3 * 3600)
    assert raw["source"] == "raw" and hourly["source"] == "hourly"
    assert [p["n"] for p in hourly["points"]] == [60, 60, 60]
    first = hourly["points"][0]
    assert first["min"] == 10.0 and first["max"] == pytest.approx(10.0 + 59 / 60)
    assert first["mean"] == pytest.approx(10.0 + 29.5 / 60, abs=1e-3)
    # a day-sized step merges hours, weighting each by its count
    day = sensors.series("red-zero", "temperature_c", T0, T0 + 3 * 3600, 86400, now=T0 + 3 * 3600)
    assert len(day["points"]) == 1 and day["points"][0]["n"] == 180
    assert day["points"][0]["mean"] == pytest.approx(10.0 + 89.5 / 60, abs=1e-3)
    assert seq == 181


def test_late_readings_reopen_their_hour_and_unrolled_hours_come_from_raw(sensors):
    feed(sensors, T0, 2)
    sensors.run_pass(now=T0 + 2 * 3600 + 1)
    # readings of the first hour buffered on a node out of range arrive now, with higher seqs
    sensors.ingest("red-zero", {"readings": [reading(1000 + i, T0 + 30 + i * 60, temperature_c=30.0) for i in range(3)]},
                   now=T0 + 2 * 3600 + 5)
    before = sensors.series("red-zero", "temperature_c", T0, T0 + 7200, 3600, now=T0 + 7300)
    assert before["points"][0]["n"] == 63 and before["points"][0]["max"] == 30.0  # from raw: not rolled up yet
    sensors.run_pass(now=T0 + 2 * 3600 + 10)
    after = sensors.series("red-zero", "temperature_c", T0, T0 + 7200, 3600, now=T0 + 7300)
    assert after["points"] == before["points"]
    assert rows(sensors.cluster_dir, "SELECT count(*) FROM pending_hours") == [(0,)]


def test_retention_drops_raw_after_raw_days_and_keeps_the_hourly_history(sensors, cluster_dir):
    update_cluster_yaml(cluster_dir, {"sensors": {"raw_days": 1, "hourly_days": 3}})
    feed(sensors, T0, 2, every=600)
    sensors.run_pass(now=T0 + 2 * 86400)
    assert rows(cluster_dir) == [(0,)]
    series = sensors.series("red-zero", "temperature_c", T0, T0 + 7200, None, now=T0 + 2 * 86400)
    assert series["source"] == "hourly" and [p["n"] for p in series["points"]] == [6, 6]
    sensors.run_pass(now=T0 + 4 * 86400)
    assert rows(cluster_dir, "SELECT count(*) FROM hourly") == [(0,)]


def test_the_pass_runs_from_ingest_at_most_every_pass_every_s(sensors, cluster_dir):
    feed(sensors, T0, 1, every=300)  # 12 readings, the first ingest ran the first pass
    assert rows(cluster_dir, "SELECT hour FROM pending_hours") == [(int(T0),)]
    sensors.ingest("red-zero", {"readings": [reading(100, T0 + 3600 + 10)]}, now=T0 + 3600 + 10)
    assert rows(cluster_dir, "SELECT hour FROM pending_hours ORDER BY hour") == [(int(T0),), (int(T0) + 3600,)]
    sensors.ingest("red-zero", {"readings": [reading(101, T0 + 3600 + 700)]}, now=T0 + 3600 + 700)
    assert rows(cluster_dir, "SELECT hour FROM pending_hours") == [(int(T0) + 3600,)]  # the first hour rolled up


# ------------------------------------------------------------------ thresholds, alerts, places, the list

def test_thresholds_from_cluster_yaml_and_the_api_set_alert_states_with_since(sensors, cluster_dir):
    update_cluster_yaml(cluster_dir, {"sensors": {"thresholds": {"*": {"temperature_c": {"min": 15, "max": 28}},
                                                                "red-zero": {"humidity_pct": {"max": 60}}}}})
    sensors.ingest("red-zero", {"readings": [reading(1, T0, temperature_c=21.0, humidity_pct=40.0)]}, now=T0)
    sensors.ingest("red-zero", {"readings": [reading(2, T0 + 60, temperature_c=29.5, humidity_pct=65.0)]}, now=T0 + 60)
    sensors.ingest("red-zero", {"readings": [reading(3, T0 + 120, temperature_c=30.0, humidity_pct=50.0)]},
                   now=T0 + 120)
    (item,) = sensors.list(now=T0 + 130)
    assert item["alerts"]["temperature_c"] == {"state": "high", "since": T0 + 60, "value": 30.0}
    assert item["alerts"]["humidity_pct"]["state"] == "ok" and item["alerting"] == ["temperature_c"]
    assert "pressure_hpa" not in item["alerts"]  # no threshold, no alert state
    # the API's threshold for this node overrides cluster.yaml's; the state is re-evaluated now
    assert sensors.set_threshold("red-zero", "temperature_c", None, 35, now=T0 + 200) == {
        "min": None, "max": 35.0, "source": "api"}
    (item,) = sensors.list(now=T0 + 210)
    assert item["alerts"]["temperature_c"]["state"] == "ok" and item["alerts"]["temperature_c"]["since"] == T0 + 200
    assert sensors.set_threshold("red-zero", "temperature_c", None, None, now=T0 + 300)["source"] == "cluster.yaml"
    with pytest.raises(RegistryError, match="min 30 is above max 20"):
        sensors.set_threshold("red-zero", "temperature_c", 30, 20)
    with pytest.raises(RegistryError, match="outside the plausible range"):
        sensors.set_threshold("red-zero", "humidity_pct", None, 120)


def test_a_place_set_on_the_manager_labels_readings_without_their_own(sensors):
    sensors.ingest("red-zero", {"readings": [reading(1, T0)]}, now=T0)
    sensors.mark("red-zero", "kitchen", now=T0 + 10)
    own = dict(reading(3, T0 + 120), place="garden")
    late = reading(4, T0 + 5)  # taken before the mark, buffered, sent after it
    sensors.ingest("red-zero", {"readings": [reading(2, T0 + 60), own, late]}, now=T0 + 120)
    sensors.mark("red-zero", "hall", now=T0 + 150)
    sensors.ingest("red-zero", {"readings": [reading(5, T0 + 140), reading(6, T0 + 160)]}, now=T0 + 170)
    places = [(r["seq"], r["place"]) for r in sensors.export("red-zero", now=T0 + 200)]
    assert places == [(1, None), (4, None), (2, "kitchen"), (3, "garden"), (5, "kitchen"), (6, "hall")]
    with pytest.raises(RegistryError, match="not a place label"):
        sensors.mark("red-zero", "kitchen\n- evil")
    with pytest.raises(RegistryError, match="no node named nobody"):
        sensors.mark("nobody", "kitchen")


def test_list_shows_latest_values_with_units_last_seen_and_offline(sensors, client, creds):
    assert [s["node"] for s in sensors.list()] == ["red-zero"]  # an enrolled sensor, nothing sent yet
    assert sensors.list()[0]["offline"] is True and sensors.list()[0]["last_seen"] is None
    now = time.time()
    sensors.ingest("red-zero", {"readings": [reading(1, now - 60), reading(2, now - 1, temperature_c=22.5, pressure_hpa=1000.0)]})
    r = client.get("/api/v1/sensors", auth=creds.admin)
    assert r.status_code == 200
    (item,) = r.json
    assert item["offline"] is False and item["last_seq"] == 2 and item["last_reading_time"] == now - 1
    assert item["values"]["temperature_c"] == {"value": 22.5, "unit": "°C"}
    assert item["values"]["pressure_hpa"]["unit"] == "hPa"
    assert sensors.list(now=time.time() + 601)[0]["offline"] is True


def test_rest_series_place_and_threshold_endpoints(client, node, creds):
    now = time.time()
    nets = [{"ssid": "home", "bssid": "aa:bb:cc:dd:ee:01", "signal_dbm": -48, "signal_pct": 96},
            {"ssid": "", "bssid": "aa:bb:cc:dd:ee:02", "signal_dbm": -81, "signal_pct": 38}]
    body = {"readings": [dict(reading(i, now - 3000 + i * 300, temperature_c=20.0 + i), networks=nets)
                         for i in range(10)]}
    assert client.post("/api/v1/readings", json=body, auth=node).status_code == 200
    r = client.get("/api/v1/sensors/red-zero/readings?metric=temperature_c&since=-1h&step=600", auth=creds.admin)
    assert r.status_code == 200, r.json
    assert r.json["source"] == "raw" and r.json["unit"] == "°C" and r.json["step"] == 600
    assert sum(p["n"] for p in r.json["points"]) == 10 and r.json["points"][-1]["max"] == 29.0
    for query, message in (("metric=lux", "metric: unknown metric 'lux'"), ("", "metric: is required"),
                           ("metric=temperature_c&since=yesterday", "since: 'yesterday' is not a time"),
                           ("metric=temperature_c&since=-30d&step=1", "range: step 1 s gives more than 10000 points")):
        r = client.get(f"/api/v1/sensors/red-zero/readings?{query}", auth=creds.admin)
        assert r.status_code == 400 and r.json["error"].startswith(message), r.json
    assert client.get("/api/v1/sensors/nobody/readings?metric=temperature_c", auth=creds.admin).status_code == 404
    assert client.get("/api/v1/sensors/red-zero/readings?metric=temperature_c", auth=node).status_code == 403

    r = client.post("/api/v1/sensors/red-zero/place", json={"place": "attic"}, auth=creds.admin)
    assert r.status_code == 200 and r.json["place"] == "attic"
    r = client.put("/api/v1/sensors/red-zero/thresholds/temperature_c", json={"min": 10, "max": 25}, auth=creds.admin)
    assert r.status_code == 200 and r.json == {"min": 10, "max": 25, "source": "api"}
    r = client.put("/api/v1/sensors/red-zero/thresholds/temperature_c", json={"min": 30, "max": 25}, auth=creds.admin)
    assert r.status_code == 400 and "threshold: temperature_c: min 30 is above max 25" in r.json["error"]
    r = client.get("/api/v1/sensors/red-zero", auth=creds.admin)
    assert r.status_code == 200
    assert r.json["thresholds"]["temperature_c"]["max"] == 25 and r.json["place_set"] == "attic"
    assert [n["bssid"] for n in r.json["networks"]] == ["aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"]
    assert {(s["ssid"], s["seen"]) for s in r.json["survey"]} == {("home", 10), ("", 10)}
    r = client.delete("/api/v1/sensors/red-zero/thresholds/temperature_c", auth=creds.admin)
    assert r.status_code == 200 and r.json is None



def test_a_final_newline_does_not_slip_through_a_pattern(client, node, creds):
    """Python's ``$`` (and so a JSON Schema validator's re.search) also matches before a final newline: the
    published patterns end in ``$(?!\\n)`` so that "attic\\n" is not a place label nor a BSSID."""
    net = {"ssid": "home", "bssid": "aa:bb:cc:dd:ee:01\n", "signal_dbm": -48, "signal_pct": 96}
    r = client.post("/api/v1/readings", json={"readings": [dict(reading(0, time.time()), networks=[net])]}, auth=node)
    assert r.status_code == 400 and "bssid" in r.json["error"], r.json
    r = client.post("/api/v1/readings", json={"readings": [dict(reading(0, time.time()), place="attic\n")]}, auth=node)
    assert r.status_code == 400 and "place" in r.json["error"], r.json
    r = client.post("/api/v1/sensors/red-zero/place", json={"place": "attic\n"}, auth=creds.admin)
    assert r.status_code == 400 and "place" in r.json["error"], r.json
    r = client.get("/api/v1/sensors/red-zero/readings?metric=temperature_c&since=-1h%0A", auth=creds.admin)
    assert r.status_code == 400, r.json

# ------------------------------------------------------------------ one home for the metrics

def test_the_published_metrics_schema_is_the_models():
    assert openapi_document()["components"]["schemas"]["Metrics"] == json.loads(json.dumps(metrics_schema()))
    assert set(openapi_document()["paths"]["/sensors/{node}/readings"]["get"]["parameters"][0]["schema"]["enum"]) \
        == set(METRICS)


@pytest.mark.parametrize("sensors_yaml,problem", [
    ({"raw_days": 0}, "sensors.raw_days"),
    ({"thresholds": {"red-zero": {"lux": {"max": 3}}}}, "sensors.thresholds.red-zero"),
    ({"thresholds": {"*": {"temperature_c": {"min": 30, "max": 20}}}},
     "sensors.thresholds.*.temperature_c: min 30 is above max 20"),
    ({"thresholds": {"Bad Name": {"temperature_c": {"max": 20}}}}, "sensors.thresholds"),
    ({"retention": 3}, "sensors"),
])
def test_bad_sensor_settings_in_cluster_yaml_are_named(cluster_dir, sensors_yaml, problem):
    from pibake.cluster import load_cluster

    update_cluster_yaml(cluster_dir, {"sensors": sensors_yaml})
    with pytest.raises(ConfigError) as err:
        load_cluster(cluster_dir)
    assert problem in str(err.value)


# ------------------------------------------------------------------ docs/sensors.md blocks

def _page_block(name, lang):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "sensors.md").read_text()
    if lang == "json":
        return re.search(rf"<!-- doc-test: {name} -->\n```json\n(.*?)```", page, re.S).group(1)
    return re.search(rf"```{lang}\n# doc-test: {name}\n(.*?)```", page, re.S).group(1)


def test_docs_settings_example_is_accepted(sensors, cluster_dir):
    """docs/sensors.md sens-settings: valid in cluster.yaml, and its thresholds are the ones in force."""
    from pibake.cluster import load_cluster

    update_cluster_yaml(cluster_dir, yaml.safe_load(_page_block("sens-settings", "yaml")))
    load_cluster(cluster_dir)
    assert sensors.settings()["raw_days"] == 14 and sensors.settings()["offline_after_s"] == 600
    assert sensors.readings.thresholds("red-zero", sensors.settings()["thresholds"]) == {
        "temperature_c": {"min": 16, "max": 26, "source": "cluster.yaml"},
        "humidity_pct": {"min": None, "max": 65, "source": "cluster.yaml"},
        "soc_temperature_c": {"min": None, "max": 80, "source": "cluster.yaml"}}


def test_docs_body_is_accepted_once(client, node, cluster_dir):
    """docs/sensors.md sens-body, posted twice (its time moved to now: the example's date is fixed)."""
    body = json.loads(_page_block("sens-body", "json"))
    body["readings"][0]["time"] = time.time()
    r = client.post("/api/v1/readings", json=body, auth=node)
    assert r.status_code == 200 and r.json == {"accepted": 1, "duplicates": 0, "last_seq": 1042}
    r = client.post("/api/v1/readings", json=body, auth=node)
    assert r.json == {"accepted": 0, "duplicates": 1, "last_seq": 1042}
    assert rows(cluster_dir, "SELECT place, humidity_pct FROM readings") == [("kitchen", 40.2)]
    assert rows(cluster_dir, "SELECT count(*) FROM networks") == [(2,)]


def test_sensors_page_rest_block(client, node, creds):
    """docs/sensors.md sens-rest: each curl line's method, path and body, sent to the real app with the admin
    credential (the test client stands in for TLS to red00:8443)."""
    import shlex

    now = time.time()
    client.post("/api/v1/readings", json={"readings": [reading(i, now - 3600 + i * 60) for i in range(50)]}, auth=node)
    answers = []
    for line in _page_block("sens-rest", "sh").strip().splitlines():
        words = shlex.split(line)
        assert words[:3] == ["curl", "--cacert", "secrets/ca.crt"] and words[3] == "-u"
        method = words[words.index("-X") + 1] if "-X" in words else "GET"
        body = json.loads(words[words.index("-d") + 1]) if "-d" in words else None
        path = words[-1].split(":8443", 1)[1]
        answers.append(client.open(path, method=method, json=body, auth=creds.admin))
    assert [a.status_code for a in answers] == [200] * 5
    assert answers[0].json[0]["node"] == "red-zero" and answers[1].json["node"] == "red-zero"
    assert sum(p["n"] for p in answers[2].json["points"]) == 50
    assert answers[3].json["place"] == "kitchen" and answers[4].json == {"min": 16, "max": 26, "source": "api"}


def test_the_wifi_link_is_stored_when_it_changes(sensors, cluster_dir):
    link = {"ssid": "home", "bssid": "aa:bb:cc:dd:ee:ff", "channel": 6, "frequency_mhz": 2437, "bitrate_mbps": 72.2,
            "signal_dbm": -50}
    batch = [dict(reading(i, T0 + i * 10), wifi=dict(link, signal_dbm=-50 - i)) for i in range(4)]
    batch.append(dict(reading(4, T0 + 40), wifi=dict(link, bssid="aa:bb:cc:dd:ee:01")))  # roamed
    sensors.ingest("red-zero", {"readings": batch}, now=T0 + 50)
    stored = rows(cluster_dir, "SELECT seq, wifi IS NOT NULL FROM readings ORDER BY seq")
    assert stored == [(0, 1), (1, 0), (2, 0), (3, 0), (4, 1)]
    assert sensors.list(now=T0 + 60)[0]["wifi"]["bssid"] == "aa:bb:cc:dd:ee:01"
