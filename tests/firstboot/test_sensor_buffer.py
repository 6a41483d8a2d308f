"""The sensor agent's buffer and sender: readings on disk (real SQLite) before anything is sent, sent in order over
real TLS pinned to the cluster CA to a server keeping the registry's (node, seq) contract; registry down, a crash
mid-send (in-process and a SIGKILLed agent process), refusals, a full buffer, the wrong CA, MQTT failing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pibake import secrets
from tests.firstboot.readings_server import ReadingsServer
from tests.firstboot.sensorkit import AGENT_FILE, FIXTURES, load_agent
from tests.firstboot.tlsserver import free_port

sa = load_agent()
pytest.importorskip("bme280", reason="test extra RPi.bme280 not installed (pip install -e .[test])")
CREDENTIAL = "c0ffee-node-credential"


def server_for(cluster, port=0):
    sdir = secrets.secrets_dir(cluster)
    return ReadingsServer(sdir / "registry.crt", sdir / "registry.key", {"red01": CREDENTIAL}, port=port)


def node_files(tmp_path, cluster, url, **settings):
    (tmp_path / "node-credential").write_text(CREDENTIAL + "\n")
    agent_cfg = {"registry_url": url, "ca_cert": str(secrets.secrets_dir(cluster) / "ca.crt"), "hostname": "red01",
                 "credential_file": str(tmp_path / "node-credential")}
    (tmp_path / "agent.json").write_text(json.dumps(agent_cfg))
    values = {"sim_bus": str(FIXTURES / "bme280-lab.json"), "wifi_interface": None,
              "thermal_dir": str(tmp_path / "no-thermal"), "buffer": str(tmp_path / "state" / "buffer.sqlite3"),
              "agent_config": str(tmp_path / "agent.json"), "backoff_base_s": 0.01, "backoff_max_s": 0.05,
              "batch": 3, "place": "kitchen", "interval_s": 1, **settings}
    (tmp_path / "sensor.json").write_text(json.dumps(values))
    return tmp_path / "sensor.json"


def make_agent(config_path):
    settings = sa.load_settings(config_path)
    return sa.Agent(settings, sa.load_agent_config(settings["agent_config"]), reader=sa.Reader(settings))


def buffer_readings(agent, count, agent_json):
    """Take ``count`` readings without sending (the agent's sender detached), then attach a sender again."""
    agent.shipper.sender = None
    for _ in range(count):
        agent.step()
    agent.shipper.sender = sa.Sender(sa.load_agent_config(agent_json))


def wait_until_sendable(agent):
    agent.shipper.next_try = 0.0


def test_readings_are_sent_in_order_in_batches(tmp_path, cluster_a):
    with server_for(cluster_a) as server:
        agent = make_agent(node_files(tmp_path, cluster_a, server.url))
        buffer_readings(agent, 7, tmp_path / "agent.json")  # collect first: 7 readings waiting
        assert agent.buffer.pending() == 7
        assert agent.shipper.flush() == 7
        assert [seqs for _, seqs in server.posts] == [[1, 2, 3], [4, 5, 6], [7]]
        stored = server.stored("red01")
        assert [r["seq"] for r in stored] == list(range(1, 8))
        assert stored[0]["place"] == "kitchen" and stored[0]["metrics"]["temperature_c"] == 25.08
        assert agent.buffer.pending() == 0
        assert oct(os.stat(tmp_path / "state" / "buffer.sqlite3").st_mode & 0o777) == "0o600"
        agent.close()


def test_registry_away_then_back_loses_nothing(tmp_path, cluster_a):
    port = free_port()
    agent = make_agent(node_files(tmp_path, cluster_a, f"https://127.0.0.1:{port}"))
    for _ in range(4):
        agent.step()  # connection refused each time: kept, backoff grows
        wait_until_sendable(agent)
    assert agent.buffer.pending() == 4 and agent.shipper.failures == 4
    with server_for(cluster_a, port=port) as server:
        server.mode = "down"  # answers 503 while it starts
        agent.step()
        assert agent.buffer.pending() == 5
        server.mode = "ok"
        wait_until_sendable(agent)
        assert agent.shipper.flush() == 5
        assert [r["seq"] for r in server.stored("red01")] == [1, 2, 3, 4, 5]
    agent.close()


def test_crash_between_store_and_answer_resends_without_duplicates(tmp_path, cluster_a):
    with server_for(cluster_a) as server:
        config = node_files(tmp_path, cluster_a, server.url)
        agent = make_agent(config)
        buffer_readings(agent, 5, tmp_path / "agent.json")
        server.mode = "store_then_drop"  # the registry stored 1..3 but the agent never hears so
        assert agent.shipper.flush() == 0
        assert agent.buffer.pending() == 5
        agent.close()  # the agent restarts
        server.mode = "ok"
        again = make_agent(config)
        assert again.buffer.pending() == 5
        assert again.shipper.flush() == 5
        assert [r["seq"] for r in server.stored("red01")] == [1, 2, 3, 4, 5]  # each once
        assert [seqs for _, seqs in server.posts] == [[1, 2, 3], [1, 2, 3], [4, 5]]
        reading = again.step()
        assert reading["seq"] == 6  # seq keeps growing across the restart
        again.close()


def test_sigkilled_agent_process_loses_and_duplicates_nothing(tmp_path, cluster_a):
    """The real agent process, killed with SIGKILL at arbitrary points while the registry stores then drops every
    answer; restarted with the registry healthy it delivers every reading it had buffered, each once."""
    with server_for(cluster_a) as server:
        config = node_files(tmp_path, cluster_a, server.url, interval_s=0.2)
        server.mode = "store_then_drop"
        for delay in (0.9, 0.6, 1.1):
            proc = subprocess.Popen([sys.executable, str(AGENT_FILE), "--config", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        server.mode = "ok"
        out = subprocess.run([sys.executable, str(AGENT_FILE), "--config", str(config), "--once", "--json"],
                             capture_output=True, text=True, timeout=60, check=True)
        last = json.loads(out.stdout)["seq"]
        seqs = [r["seq"] for r in server.stored("red01")]
        assert seqs == sorted(set(seqs)) and seqs[-1] == last
        buffer = sa.Buffer(str(tmp_path / "state" / "buffer.sqlite3"), 100)
        assert buffer.pending() == 0
        buffer.close()
        # every seq the agent ever handed out was stored: none lost (a kill can only come before the INSERT commits,
        # and then that reading never got a seq)
        assert seqs == list(range(1, last + 1))
        assert last >= 6 and any(len(set(s)) < len(s) for s in [sum((p for _, p in server.posts), [])])  # resends happened


def test_refused_batch_moves_to_rejected_and_sending_goes_on(tmp_path, cluster_a, capsys):
    with server_for(cluster_a) as server:
        config = node_files(tmp_path, cluster_a, server.url)
        agent = make_agent(config)
        buffer_readings(agent, 4, tmp_path / "agent.json")
        server.mode = "refuse"
        agent.shipper.flush(max_batches=1)
        server.mode = "ok"
        agent.shipper.flush()
        assert [r["seq"] for r in server.stored("red01")] == [4]
        rejected = agent.buffer.rejected()
        assert [r["seq"] for r in rejected[0]["batch"]] == [1, 2, 3]
        assert "humidity_pct: 140 is outside 0..100" in rejected[0]["error"]
        agent.close()
        assert sa.main(["--config", str(config), "--status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["pending"] == 0 and status["rejected_batches"] == 1


def test_wrong_credential_keeps_the_readings(tmp_path, cluster_a):
    with server_for(cluster_a) as server:
        agent = make_agent(node_files(tmp_path, cluster_a, server.url))
        (tmp_path / "node-credential").write_text("not-the-credential")
        agent.step()
        assert agent.buffer.pending() == 1 and server.stored("red01") == [] and agent.buffer.rejected() == []
        (tmp_path / "node-credential").unlink()  # not enrolled yet: nothing is even tried
        wait_until_sendable(agent)
        agent.step()
        assert agent.buffer.pending() == 2 and server.requests == 1 and server.posts == []
        agent.close()


def test_another_clusters_certificate_gets_nothing(tmp_path, cluster_a, cluster_b):
    with server_for(cluster_b) as server:
        agent = make_agent(node_files(tmp_path, cluster_a, server.url))
        agent.step()
        assert "TLS check of the registry failed" in agent.shipper.last_problem
        assert server.posts == [] and agent.buffer.pending() == 1
        agent.close()


def test_full_buffer_drops_the_oldest_and_counts(tmp_path, caplog):
    buffer = sa.Buffer(str(tmp_path / "b.sqlite3"), limit=5)
    for i in range(8):
        buffer.add({"time": float(i), "metrics": {}})
    assert [r["seq"] for r in buffer.oldest(10)] == [4, 5, 6, 7, 8] and buffer.dropped == 3
    assert "dropped the 1 oldest (3 dropped since start)" in caplog.text
    buffer.remove_upto(8)
    buffer.close()
    buffer = sa.Buffer(str(tmp_path / "b.sqlite3"), limit=5)
    assert buffer.add({"time": 9.0, "metrics": {}})["seq"] == 9  # AUTOINCREMENT: never reused
    buffer.close()


def test_mqtt_missing_or_failing_never_blocks_https(tmp_path, cluster_a, monkeypatch, caplog):
    with server_for(cluster_a) as server:
        config = node_files(tmp_path, cluster_a, server.url, mqtt={"host": "red00", "port": 8883})
        monkeypatch.setitem(sys.modules, "sensor_mqtt", None)  # not installed next to the agent
        agent = make_agent(config)
        assert agent.publisher is None and "sensor_mqtt cannot be loaded" in caplog.text
        agent.step()
        agent.close()
        published = []

        class Broken:
            def __init__(self, node, settings):
                published.append(("init", node, settings["host"]))

            def publish(self, reading):
                published.append(reading["seq"])
                raise OSError("broker unreachable")

            def close(self):
                published.append("closed")

        monkeypatch.setitem(sys.modules, "sensor_mqtt", type(sys)("sensor_mqtt"))
        sys.modules["sensor_mqtt"].MqttPublisher = Broken
        agent = make_agent(config)
        agent.step()
        agent.close()
        assert published == [("init", "red01", "red00"), 2, "closed"]
        assert [r["seq"] for r in server.stored("red01")] == [1, 2]
        assert "MQTT publish of reading 2 failed: broker unreachable" in caplog.text


def test_bad_settings_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "sensor.json"
    bad.write_text(json.dumps({"interval_s": 0, "offsets": {"temp": 1}, "address": "0x20", "colour": "red"}))
    assert sa.main(["--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sensor-agent: error: ") and err.count("\n") == 1 and "colour" in err
    bad.write_text(json.dumps({"interval_s": 0, "offsets": {"temp": 1}, "address": "0x20"}))
    assert sa.main(["--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "interval_s" in err and "offsets" in err and "address" in err


def test_dropins_override_the_seeded_settings(tmp_path):
    (tmp_path / "sensor.json").write_text(json.dumps({"interval_s": 60, "offsets": {"temperature_c": -0.5}}))
    (tmp_path / "sensor.d").mkdir()
    (tmp_path / "sensor.d" / "20-calibration.json").write_text(json.dumps({"offsets": {"temperature_c": -1.2}}))
    (tmp_path / "sensor.d" / "10-lab.json").write_text(json.dumps({"interval_s": 5, "sim_bus": "/x.json"}))
    (tmp_path / "sensor.d" / "notes.txt").write_text("not a drop-in")
    settings = sa.load_settings(tmp_path / "sensor.json")
    assert (settings["interval_s"], settings["offsets"], settings["sim_bus"]) == (5, {"temperature_c": -1.2}, "/x.json")
    (tmp_path / "sensor.d" / "30-bad.json").write_text(json.dumps({"colour": 1}))
    with pytest.raises(sa.ConfigError, match="30-bad.json: unknown setting"):
        sa.load_settings(tmp_path / "sensor.json")
