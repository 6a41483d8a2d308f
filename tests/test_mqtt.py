"""MQTT against a real Mosquitto on loopback, configured by pibake.mqtt from a real cluster directory (CA,
broker certificate, ACL, password file): authentication, TLS, the ACL, node passwords issued by the registry,
the sensor publisher (firstboot/sensor_mqtt.py) with Home Assistant discovery and its last will, and a Tasmota
plug on the same broker. Plus the pure parts (hash format, cluster.yaml checks)."""

import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pibake import mqtt
from pibake.cluster import init_cluster, validate_cluster_data
from pibake.run import which
from pibake import secrets
from pibake.secrets import admin_password
from tests.conftest import needs_program, needs_root
from tests.fixtures_plugin import LOOPBACK, RED, new_cluster
from tests.registry.conftest import enrolment
from tests.switches.conftest import free_port

paho = pytest.importorskip("paho.mqtt.client")

needs_mosquitto = needs_program("mosquitto", "mosquitto_passwd")
FIRSTBOOT = Path(__file__).resolve().parents[1] / "firstboot"
TOPIC = "tasmota_5A1B2C"
PLUG_PASSWORD = "plug-secret-77"
READING = {"seq": 1, "time": 1796306400.5, "place": "kitchen",
           "metrics": {"temperature_c": 21.43, "humidity_pct": 40.2, "pressure_hpa": 1006.53,
                       "wifi_signal_dbm": -55, "soc_temperature_c": 45.2, "throttled": 0}}
# What Home Assistant's MQTT sensor documents, for every metric; device class, unit and state class where
# the metric has them (the BME280's three all do).
HA_KEYS = {"name", "unique_id", "state_topic", "value_template", "availability_topic", "payload_available",
           "payload_not_available", "expire_after", "device"}
HA_DEVICE_KEYS = {"identifiers", "name", "model", "manufacturer"}


# --------------------------------------------------------------------------- pure parts


def test_hash_is_what_mosquitto_passwd_writes(tmp_path):
    if not which("mosquitto_passwd"):
        pytest.skip("not installed: mosquitto_passwd (Debian package mosquitto)")
    subprocess.run([which("mosquitto_passwd"), "-b", "-c", str(tmp_path / "pw"), "red01", "s3cret"], check=True,
                   capture_output=True)
    theirs = mqtt.parse_password_file((tmp_path / "pw").read_text())["red01"]
    assert theirs.startswith("$7$101$")
    assert mqtt.check_password("s3cret", theirs) and not mqtt.check_password("s3creT", theirs)
    ours = mqtt.hash_password("s3cret")
    assert ours.split("$")[:3] == theirs.split("$")[:3]  # same scheme and rounds; the broker check is below
    assert mqtt.check_password("s3cret", ours)


def test_password_file_changes_keep_other_users():
    text = mqtt.set_passwords("", {"pibake_admin": "$7$a", "red01": "$7$b"})
    text = mqtt.set_passwords(text, {"red02": "$7$c", "red01": None})
    assert mqtt.parse_password_file(text) == {"pibake_admin": "$7$a", "red02": "$7$c"}
    with pytest.raises(ValueError):
        mqtt.set_passwords(text, {"evil:x": "$7$d"})


BASE = {"name": "red", "manager": "red00", "manager_ip": "10.1.1.10", "network": "10.1.1.0/24"}


@pytest.mark.parametrize("section, problem", [
    ({"enabled": "yes"}, "mqtt.enabled: 'yes' is not of type 'boolean'"),
    ({"port": 8443}, "mqtt.port: 8443 is the registry's port"),
    ({"port": 0}, "mqtt.port: 0 is less than the minimum of 1"),
    ({"base": "pibake/#"}, "mqtt.base: 'pibake/#' is not a topic prefix"),
    ({"discovery_prefix": "/ha"}, "mqtt.discovery_prefix: '/ha' is not a topic prefix"),
    ({"base": "homeassistant"}, "mqtt.base: must differ from discovery_prefix"),
    ({"brokers": 2}, "mqtt: unknown key 'brokers'"),
])
def test_mqtt_section_is_validated(section, problem):
    problems = validate_cluster_data({**BASE, "mqtt": section})
    assert any(p.startswith(problem) for p in problems), problems


def test_mqtt_section_defaults():
    from pibake.cluster import cluster_from_data

    assert validate_cluster_data({**BASE, "mqtt": {"enabled": True}}) == []
    settings = cluster_from_data({**BASE, "mqtt": {"enabled": True}}).mqtt
    assert (settings.enabled, settings.port, settings.discovery_prefix, settings.base) == \
        (True, 8883, "homeassistant", "pibake")
    assert cluster_from_data(BASE).mqtt.enabled is False
    assert mqtt.node_settings(cluster_from_data(BASE), "red02") is None
    block = mqtt.node_settings(cluster_from_data({**BASE, "mqtt": {"enabled": True}}), "red02")
    assert block == {"host": "red00", "port": 8883, "ca_cert": "/etc/pibake/ca.crt", "username": "red02",
                     "password_file": "/etc/pibake/mqtt-password", "discovery_prefix": "homeassistant",
                     "base": "pibake"}  # SENSORS_CONTRACT.md's settings["mqtt"]


def _doc_block(name):
    """The body of the block marked ``name`` in docs/mqtt.md (without its marker line)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text()
    import re

    for mark, _lang, body in re.findall(r"(?:^<!-- doc-test: ([a-z0-9-]+) -->\n)?^```([a-z]*)\n(.*?)^```", text,
                                        flags=re.S | re.M):
        if mark == name or body.startswith(f"# doc-test: {name}\n"):
            return body.split("\n", 1)[1] if body.startswith("# doc-test") else body
    raise AssertionError(f"no block {name} in docs/mqtt.md")


def test_docs_mqtt_page_blocks():
    """docs/mqtt.md: mqtt-config validates and says the defaults; mqtt-acl is what broker_acl writes for the
    page's plug; mqtt-discovery is what sensor_mqtt sends."""
    from pibake.cluster import cluster_from_data
    from pibake.model import MqttSettings, SwitchConfig

    config = yaml.safe_load(_doc_block("mqtt-config"))
    assert validate_cluster_data({**BASE, **config}) == []
    assert cluster_from_data({**BASE, **config}).mqtt == MqttSettings(enabled=True)
    plug = SwitchConfig(name="fan", driver="tasmota", address="10.1.1.52", thing="fan", mqtt_broker="red00:8883",
                        mqtt_topic="tasmota_5A1B2C")
    acl = [line for line in mqtt.broker_acl(MqttSettings(enabled=True), [plug]).splitlines()
           if line and not line.startswith("#")]
    assert acl == [line for line in _doc_block("mqtt-acl").splitlines() if line]
    sys.path.insert(0, str(FIRSTBOOT))
    try:
        import sensor_mqtt
    finally:
        sys.path.remove(str(FIRSTBOOT))
    assert json.loads(_doc_block("mqtt-discovery")) == sensor_mqtt.discovery_config(
        "red-zero", "temperature_c", expire_after=180)


# --------------------------------------------------------------------------- the broker


class Broker:
    """Mosquitto with pibake's own drop-in, ACL and password file (pibake.mqtt.install_broker)."""

    def __init__(self, where):
        self.where = where
        self.cluster = where / "cluster"
        self.port = free_port()
        new_cluster(self.cluster, name="mq", **LOOPBACK, settings={
            "mqtt": {"enabled": True, "port": self.port},
            "switches": [{"name": "fan", "driver": "tasmota", "address": "127.0.0.1:1", "thing": "fan",
                          "mqtt_broker": f"127.0.0.1:{self.port}", "mqtt_topic": TOPIC, "mqtt_tls": True}]})
        # a re-run of init with mqtt enabled adds the broker's secrets and keeps the others
        result = init_cluster(self.cluster, name="mq", **LOOPBACK)
        assert result["secrets"]["mqtt-cert"] == "created" and result["secrets"]["ca"] == "kept"
        self.etc = where / "etc"
        self.pid_file = where / "mosquitto.pid"
        self.files = mqtt.install_broker(self.cluster, switch_passwords={"tasmota_fan": PLUG_PASSWORD},
                                         etc_dir=self.etc, conf_file=where / "conf.d" / "pibake.conf",
                                         bind_address="127.0.0.1")
        # the manager's mosquitto.conf as Debian ships it, with test paths (root here: the tmp dir is 0700)
        (where / "mosquitto.conf").write_text(f"user root\npid_file {self.pid_file}\npersistence false\n"
                                              f"log_dest stderr\ninclude_dir {where / 'conf.d'}\n")
        self.proc = subprocess.Popen([which("mosquitto"), "-c", str(where / "mosquitto.conf")],
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    pytest.fail(f"mosquitto exited: {self.proc.stderr.read()}")
                if time.monotonic() > deadline:
                    pytest.fail("mosquitto did not listen within 10 s")
                time.sleep(0.05)
        self.ca = self.cluster / "secrets" / "ca.crt"
        self.admin = (mqtt.ADMIN_USER, mqtt.admin_password(self.cluster))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    if not (which("mosquitto") and which("mosquitto_passwd")):
        pytest.skip("not installed: mosquitto (Debian package mosquitto)")
    b = Broker(tmp_path_factory.mktemp("mqtt"))
    yield b
    b.stop()


def connect(broker, user=None, password=None, *, tls=True, ca=None, client_id=None):
    """A connected paho client, or the reason the broker refused (a ReasonCode / an exception)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{os.urandom(4).hex()}")
    if user:
        client.username_pw_set(user, password)
    if tls:
        client.tls_set(ca_certs=str(ca or broker.ca))
    result = queue.Queue()
    client.on_connect = lambda c, u, flags, reason, props: result.put(reason)
    client.on_message = lambda c, u, msg: client.box.put((msg.topic, msg.payload.decode(), msg.retain))
    client.box = queue.Queue()
    try:
        client.connect("127.0.0.1", broker.port, keepalive=10)
    except (ssl.SSLError, OSError) as exc:
        return exc
    client.loop_start()
    try:
        reason = result.get(timeout=5)
    except queue.Empty:
        client.loop_stop()
        return "no CONNACK"
    if reason.is_failure:
        client.loop_stop()
        return reason
    return client


def refused(reason):
    """True for a CONNACK that refuses the credentials (paho gives MQTT 3.1.1's 4 and 5 as 0x86 and 0x87)."""
    return getattr(reason, "is_failure", False) and reason.value in (0x86, 0x87)


def subscribe(client, topic):
    done = queue.Queue()
    client.on_subscribe = lambda c, u, mid, reasons, props: done.put(reasons)
    client.subscribe(topic, qos=1)
    return done.get(timeout=5)


def drain(client, seconds=1.0):
    """Every message the client receives within ``seconds``."""
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(client.box.get(timeout=left))
        except queue.Empty:
            break
    return out


def close(client):
    client.disconnect()
    client.loop_stop()


@needs_mosquitto
def test_files_are_private_and_go_to_the_manager(broker):
    from pibake.secrets import manager_bundle

    assert set(mqtt.SECRET_FILES) <= set(manager_bundle(broker.cluster))
    for name in ("mqtt.key", "passwd", "acl"):
        assert (broker.etc / name).stat().st_mode & 0o077 == 0, name
    assert broker.etc.stat().st_mode & 0o777 == 0o700
    assert (broker.cluster / "secrets" / "mqtt-admin-password").stat().st_mode & 0o777 == 0o400
    text = (broker.etc / "passwd").read_text()
    assert broker.admin[1] not in text and PLUG_PASSWORD not in text


@needs_mosquitto
def test_anonymous_and_wrong_passwords_are_refused(broker):
    assert refused(connect(broker))
    assert refused(connect(broker, mqtt.ADMIN_USER, "wrong"))
    assert refused(connect(broker, "red09", "anything"))
    client = connect(broker, *broker.admin)
    assert not isinstance(client, (Exception, str)) and not hasattr(client, "is_failure"), client
    close(client)


@needs_mosquitto
def test_tls_with_the_cluster_ca_is_required(broker, tmp_path):
    plain = connect(broker, *broker.admin, tls=False)  # the listener speaks TLS only
    assert isinstance(plain, (OSError, str)) or getattr(plain, "is_failure", False), plain
    other = tmp_path / "other"
    new_cluster(other, name="other", **LOOPBACK)
    wrong_ca = connect(broker, *broker.admin, ca=other / "secrets" / "ca.crt")
    assert isinstance(wrong_ca, ssl.SSLCertVerificationError), wrong_ca


@pytest.fixture
def registry_app(broker, tmp_path):
    from pibake.registry.app import create_app

    app = create_app(broker.cluster, test_config={"TESTING": True, "PIBAKE_MQTT_ETC_DIR": str(broker.etc),
                                                  "PIBAKE_MQTT_PID_FILE": str(broker.pid_file)},
                     slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False)
    return app


def node_password(app, broker, hostname, index):
    """Enrol ``hostname`` and get its MQTT password from the registry, as the first-boot agent does."""
    from pibake.secrets import load_join_token

    client = app.test_client()
    token = load_join_token(broker.cluster).token
    resp = client.post("/api/v1/enrol", json=enrolment(hostname, index),
                       headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 201, resp.get_json()
    auth = (hostname, resp.get_json()["credential"])
    resp = client.post("/api/v1/mqtt-credential", auth=auth, json={})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["username"] == hostname and body["port"] == broker.port and body["base"] == "pibake"
    return body["password"], auth


@needs_mosquitto
def test_registry_issues_node_passwords_and_the_acl_keeps_nodes_apart(broker, registry_app, caplog):
    caplog.set_level("DEBUG")
    pw1, _ = node_password(registry_app, broker, "red01", 1)
    pw2, auth2 = node_password(registry_app, broker, "red02", 2)
    assert pw1 not in (broker.etc / "passwd").read_text()
    assert pw1 not in caplog.text and pw2 not in caplog.text
    admin = connect(broker, *broker.admin)
    subscribe(admin, "#")
    red01 = connect(broker, "red01", pw1)  # the broker re-read its password file (SIGHUP from the registry)
    assert not getattr(red01, "is_failure", False) and not isinstance(red01, (Exception, str)), red01
    drain(admin, 0.3)
    for topic in ("pibake/red01/state", "homeassistant/sensor/red01/temperature_c/config",  # its own: allowed
                  "pibake/red02/state", "homeassistant/sensor/red02/temperature_c/config",  # another node's
                  f"cmnd/{TOPIC}/POWER", "homeassistant/status", "pibake/red01x/state"):
        red01.publish(topic, "from red01", qos=1).wait_for_publish(5)
    seen = {t for t, _, _ in drain(admin, 1.0)}
    assert seen == {"pibake/red01/state", "homeassistant/sensor/red01/temperature_c/config"}
    close(red01)
    # a removed node's user is gone from the broker at once
    resp = registry_app.test_client().delete("/api/v1/nodes/red02", auth=("admin", admin_password(broker.cluster)))
    assert resp.status_code == 200
    assert "red02:" not in (broker.etc / "passwd").read_text()
    assert refused(connect(broker, "red02", pw2))
    close(admin)


@needs_mosquitto
def test_pending_nodes_get_no_password(broker, tmp_path):
    from pibake.registry.app import create_app
    from pibake.secrets import load_join_token

    app = create_app(broker.cluster, test_config={"TESTING": True, "PIBAKE_MQTT_ETC_DIR": str(broker.etc),
                                                  "PIBAKE_MQTT_PID_FILE": str(broker.pid_file)},
                     slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False,
                     require_approval=True)
    client = app.test_client()
    token = load_join_token(broker.cluster).token
    resp = client.post("/api/v1/enrol", json=enrolment("red07", 7), headers={"Authorization": f"Bearer {token}"})
    resp = client.post("/api/v1/mqtt-credential", auth=("red07", resp.get_json()["credential"]), json={})
    assert resp.status_code == 403
    assert "red07:" not in (broker.etc / "passwd").read_text()


# --------------------------------------------------------------------------- the sensor publisher

PUBLISHER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from sensor_mqtt import MqttPublisher
settings = json.loads(sys.argv[2])
pub = MqttPublisher(settings.pop("node"), settings)
assert pub.wait_connected(10), "not connected"
pub.publish(json.loads(sys.argv[3]))
pub.client.publish("pibake/" + pub.node + "/sync", "1", qos=1).wait_for_publish(5)
print("published", flush=True)
time.sleep(60)
"""


@needs_mosquitto
def test_sensor_publisher_state_discovery_and_last_will(broker, registry_app, tmp_path):
    password, _ = node_password(registry_app, broker, "zero1", 11)
    (tmp_path / "mqtt-password").write_text(password + "\n")
    settings = {"node": "zero1", "interval_s": 60,
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "ca_cert": str(broker.ca), "username": "zero1",
                         "password_file": str(tmp_path / "mqtt-password"), "discovery_prefix": "homeassistant",
                         "base": "pibake"}}
    admin = connect(broker, *broker.admin)
    subscribe(admin, "pibake/zero1/#")
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(FIRSTBOOT), json.dumps(settings),
                             json.dumps(READING)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "published", proc.stderr.read() if proc.poll() is not None else line
        got = {t: p for t, p, _ in drain(admin, 0.5)}
        assert got["pibake/zero1/availability"] == "online"
        state = json.loads(got["pibake/zero1/state"])
        assert state["temperature_c"] == 21.43 and state["place"] == "kitchen" and state["time"] == 1796306400.5
        # the agent dies (power cut, crash): the broker publishes its last will
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        will = [(t, p, r) for t, p, r in drain(admin, 3.0) if t == "pibake/zero1/availability"]
        assert will and will[-1][1] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    close(admin)
    # a late subscriber (Home Assistant starting) gets everything retained: discovery, state, availability
    late = connect(broker, *broker.admin)
    subscribe(late, "homeassistant/sensor/zero1/+/config")
    subscribe(late, "pibake/zero1/+")
    retained = {t: (p, r) for t, p, r in drain(late, 1.0)}
    close(late)
    assert retained["pibake/zero1/availability"] == ("offline", True)
    assert retained["pibake/zero1/state"][1] is True
    configs = {t.split("/")[3]: json.loads(p) for t, (p, r) in retained.items() if t.endswith("/config") and r}
    assert set(configs) == set(READING["metrics"])
    for metric, config in configs.items():
        assert HA_KEYS <= set(config), (metric, HA_KEYS - set(config))
        assert HA_DEVICE_KEYS <= set(config["device"])
        assert config["state_topic"] == "pibake/zero1/state"
        assert config["availability_topic"] == "pibake/zero1/availability"
        assert config["expire_after"] == 180
        assert config["value_template"] == "{{ value_json.%s }}" % metric
    for metric in ("temperature_c", "humidity_pct", "pressure_hpa"):
        assert {"device_class", "unit_of_measurement", "state_class"} <= set(configs[metric])
    assert (configs["temperature_c"]["device_class"], configs["temperature_c"]["unit_of_measurement"]) == \
        ("temperature", "°C")
    assert configs["pressure_hpa"]["unit_of_measurement"] == "hPa"
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)


@needs_mosquitto
def test_sensor_publisher_without_password_does_not_block(tmp_path):
    sys.path.insert(0, str(FIRSTBOOT))
    try:
        from sensor_mqtt import MqttPublisher
    finally:
        sys.path.remove(str(FIRSTBOOT))
    pub = MqttPublisher("zero2", {"mqtt": {"host": "127.0.0.1", "port": free_port(),
                                           "password_file": str(tmp_path / "none")}})
    started = time.monotonic()
    assert pub.publish(READING) is False
    assert time.monotonic() - started < 1
    pub.close()


# --------------------------------------------------------------------------- a Tasmota plug on the same broker


@needs_mosquitto
def test_tasmota_plug_on_the_cluster_broker(broker):
    from pibake.switches import set_credentials
    from pibake.switches.tasmota import TasmotaSwitch
    from tests.switches.fakes import FakeTasmota

    assert f"topic readwrite cmnd/{TOPIC}/#" in (broker.etc / "acl").read_text()
    device = FakeTasmota(topic=TOPIC).start()  # (its HTTP side too, so that stop() returns)
    device.connect_mqtt(broker.port, "tasmota_fan", PLUG_PASSWORD, ca_file=broker.ca)
    try:
        set_credentials(broker.cluster, "fan", mqtt_username="tasmota_fan", mqtt_password=PLUG_PASSWORD)
        from pibake.switches import open_switch

        plug = open_switch(broker.cluster, "fan")
        assert isinstance(plug, TasmotaSwitch)
        assert plug.on().on is True and device.power is True
        assert all(not retained for _, _, retained in device.mqtt_seen)
        # the plug's user may not touch another plug's topics, nor a node's
        other = connect(broker, "tasmota_fan", PLUG_PASSWORD)
        admin = connect(broker, *broker.admin)
        subscribe(admin, "#")
        drain(admin, 0.3)
        for topic in ("cmnd/tasmota_OTHER/POWER", "pibake/red01/state"):
            other.publish(topic, "x", qos=1).wait_for_publish(5)
        assert [t for t, _, _ in drain(admin, 1.0) if t in ("cmnd/tasmota_OTHER/POWER", "pibake/red01/state")] == []
        close(other)
        close(admin)
    finally:
        device.stop()


@needs_mosquitto
@needs_root("needs root (Mosquitto drops to its own user only when started as root)")
def test_broker_as_the_mosquitto_user_reloads_node_passwords(tmp_path):
    """As on the manager: Mosquitto drops root for its own user, so the files pibake writes must be its own
    (also when a node's password arrives later and the broker re-reads the file after SIGHUP)."""
    import pwd
    import shutil
    import tempfile

    from pibake.broker import setup_broker

    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user (Debian package mosquitto)")
    where = Path(tempfile.mkdtemp(prefix="pibake-mqtt-"))  # not under pytest's 0700 tmp: mosquitto must reach it
    where.chmod(0o755)
    proc = None
    try:
        cluster, port = where / "cluster", free_port()
        new_cluster(cluster, name="own", **LOOPBACK, settings={"mqtt": {"enabled": True, "port": port}})
        init_cluster(cluster, name="own", **LOOPBACK)  # adds the broker's secrets
        pid_file = where / "run" / "mosquitto.pid"
        setup_broker(cluster, etc_dir=str(where / "etc"), conf_file=str(where / "conf.d" / "pibake.conf"),
                     pid_file=str(pid_file), bind_address="127.0.0.1")
        (where / "mosquitto.conf").write_text(f"pid_file {pid_file}\npersistence false\nlog_dest stderr\n"
                                              f"include_dir {where / 'conf.d'}\n")
        proc = subprocess.Popen([which("mosquitto"), "-c", str(where / "mosquitto.conf")], stderr=subprocess.PIPE,
                                text=True)
        fake = type("B", (), {"port": port, "ca": cluster / "secrets" / "ca.crt"})
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)
        owner = subprocess.run(["ps", "-o", "user=", "-p", str(proc.pid)], capture_output=True, text=True).stdout
        assert owner.strip() == "mosquitto"
        password = secrets.new_password()
        mqtt.update_password_file(where / "etc", {"red05": mqtt.hash_password(password)})
        assert mqtt.reload_broker(pid_file) == "sighup"
        time.sleep(0.3)
        client = connect(fake, "red05", password)
        assert not getattr(client, "is_failure", False) and not isinstance(client, (Exception, str)), client
        close(client)
        # no pid file (Debian's mosquitto.conf writes none; the lab has no systemd): found by its name
        assert proc.pid in mqtt.processes_named("mosquitto")
        again = secrets.new_password()
        mqtt.update_password_file(where / "etc", {"red05": mqtt.hash_password(again)})
        assert mqtt.reload_broker(where / "no-pid-file") == "sighup"
        time.sleep(0.3)
        client = connect(fake, "red05", again)
        assert not getattr(client, "is_failure", False) and not isinstance(client, (Exception, str)), client
        close(client)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(5)
        shutil.rmtree(where)


# --------------------------------------------------------------------------- the manager's seed, the CLI


def test_manager_seed_installs_and_starts_mosquitto(tmp_path):
    from pibake.bake.seed import MOSQUITTO_COMMAND, MQTT_SETUP_COMMAND
    from pibake.model import MqttSettings
    from tests.bake.seed_fixtures import cloud_init_schema, cluster_for, has_cloud_init, render

    plain = yaml.safe_load(render("manager").user_data)
    assert "mosquitto" not in plain["packages"] and MQTT_SETUP_COMMAND not in plain["runcmd"]
    seed = render("manager", cluster=cluster_for(mqtt=MqttSettings(enabled=True)))
    config = yaml.safe_load(seed.user_data)
    assert "mosquitto" in config["packages"]
    runcmd = config["runcmd"]
    setup = runcmd.index(MQTT_SETUP_COMMAND)
    start = next(i for i, cmd in enumerate(runcmd) if "mosquitto.service" in cmd)
    registry = next(i for i, cmd in enumerate(runcmd) if "pibake-registry.service" in cmd)
    install = next(i for i, cmd in enumerate(runcmd) if "pibake-*.whl" in " ".join(cmd))
    assert install < setup < start < registry  # pibake first; the broker's files before the registry adds users
    assert runcmd[start][-len(MOSQUITTO_COMMAND):] == MOSQUITTO_COMMAND
    worker = yaml.safe_load(render("worker", cluster=cluster_for(mqtt=MqttSettings(enabled=True))).user_data)
    assert "mosquitto" not in worker.get("packages", [])
    if has_cloud_init():
        code, out = cloud_init_schema(seed.user_data, tmp_path)
        assert code == 0, out


def test_every_node_seed_ships_the_publisher_with_mqtt(tmp_path):
    """With mqtt: every role's sensor agent gets sensor_mqtt.py next to it, paho-mqtt and its mqtt block (no
    secret in it); without, none of that."""
    import json

    from pibake.bake.seed import SENSOR_CONFIG, SENSOR_MQTT_PATH
    from pibake.model import MqttSettings
    from tests.bake.seed_fixtures import cloud_init_schema, cluster_for, has_cloud_init, render

    for role in ("worker", "sensor", "manager"):
        plain = yaml.safe_load(render(role).user_data)
        assert "python3-paho-mqtt" not in plain["packages"]
        assert SENSOR_MQTT_PATH not in {f["path"] for f in plain["write_files"]}
        seed = render(role, cluster=cluster_for(mqtt=MqttSettings(enabled=True)))
        config = yaml.safe_load(seed.user_data)
        files = {f["path"]: f for f in config["write_files"]}
        assert "python3-paho-mqtt" in config["packages"], role
        assert "class MqttPublisher" in files[SENSOR_MQTT_PATH]["content"]
        block = json.loads(files[SENSOR_CONFIG]["content"])["mqtt"]
        assert block["username"] == yaml.safe_load(seed.meta_data)["local-hostname"] and block["password_file"] == mqtt.NODE_PASSWORD_FILE
        assert "password" not in block
        if has_cloud_init():
            code, out = cloud_init_schema(seed.user_data, tmp_path)
            assert code == 0, out


@needs_mosquitto
def test_cli_mqtt_setup(broker, tmp_path):
    """docs/commands.md, block cmd-mqtt: `pibake mqtt setup --json` (with this test's paths added)."""
    from click.testing import CliRunner

    from pibake.cli import cli

    text = (Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()
    line = text.split("# doc-test: cmd-mqtt\n", 1)[1].split("\n", 1)[0]
    args = line.split()[1:] + ["--etc-dir", str(broker.etc), "--conf-file", str(tmp_path / "pibake.conf"),
                               "--pid-file", str(broker.pid_file), "--bind", "127.0.0.1"]
    result = CliRunner().invoke(cli, ["--cluster", str(broker.cluster)] + args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reload"] == "sighup" and report["admin_user"] == mqtt.ADMIN_USER
    assert report["plugs_without_password"] == [] or report["plugs_without_password"] == ["tasmota_fan"]
    assert broker.admin[1] not in result.output
    still = connect(broker, *broker.admin)  # the broker re-read its files and still lets the admin in
    assert not getattr(still, "is_failure", False) and not isinstance(still, (Exception, str)), still
    close(still)
    off = tmp_path / "off"
    new_cluster(off, name="off", **LOOPBACK)
    result = CliRunner().invoke(cli, ["--cluster", str(off)] + args)
    assert result.exit_code == 1 and "MQTT is not enabled" in str(result.exception)  # main() prints it


def test_mqtt_secrets_follow_the_ca(tmp_path):
    """Kept on a re-run; re-issued when the CA is rotated (the old certificate would not chain any more)."""
    cluster = tmp_path / "c"
    new_cluster(cluster, name="red", settings={"mqtt": {"enabled": True}})
    first = init_cluster(cluster, name="red", **RED)
    assert (first["secrets"]["mqtt-cert"], first["secrets"]["mqtt-admin"]) == ("created", "created")
    again = init_cluster(cluster, name="red", **RED)
    assert (again["secrets"]["mqtt-cert"], again["secrets"]["mqtt-admin"]) == ("kept", "kept")
    rotated = init_cluster(cluster, name="red", **RED,
                           rotate=("ca",))
    assert (rotated["secrets"]["mqtt-cert"], rotated["secrets"]["mqtt-admin"]) == ("rotated", "kept")
    assert secrets.issued_by(cluster / "secrets" / "mqtt.crt", cluster / "secrets" / "ca.crt")
