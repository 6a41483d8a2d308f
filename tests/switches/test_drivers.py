"""Each driver against a device nobody here wrote (python-kasa against the npm TP-Link simulator) or against
the documented-answer fakes (Shelly, Tasmota over HTTP and over a real Mosquitto): state, on, off, toggle,
info, power and energy, and every fault: wrong credentials, unreachable, timeout, garbage."""

import socket
import threading
import time

import pytest

from pibake.model import SwitchConfig
from pibake.errors import SwitchError
from pibake.switches.kasa import KasaSwitch
from pibake.switches.shelly import ShellySwitch
from pibake.switches.tasmota import TasmotaSwitch
from tests.fixtures_plugin import LOOPBACK, new_cluster
from tests.switches.conftest import (
    MQTT_PASSWORD, MQTT_USER, free_port, needs_kasa_simulator, needs_mosquitto,
)


def config(driver, address, **kw):
    return SwitchConfig(name="plug1", driver=driver, address=address, thing="lamp", timeout=kw.pop("timeout", 2),
                        **kw)


def exercise(switch):
    """on, off, toggle, each answered with the state read back."""
    assert switch.on().on is True
    assert switch.state().on is True
    assert switch.off().on is False
    assert switch.toggle().on is True
    assert switch.toggle().on is False
    return switch.state()


# --------------------------------------------------------------------------- Kasa (npm simulator)


@needs_kasa_simulator
def test_kasa_against_simulator(kasa_plug):
    plug = KasaSwitch(config("kasa", kasa_plug.address))
    state = exercise(plug)
    assert state.on is False
    on = plug.on()
    assert on.power_w is not None and on.power_w > 0  # the HS110's meter (simulated readings)
    assert on.energy_kwh is not None and on.energy_kwh > 0
    info = plug.info()
    assert info["model"] == "HS110" and info["alias"] == "Rack plug" and info["has_energy_meter"] is True


@needs_kasa_simulator
def test_kasa_plug_that_stops_answering_times_out(kasa_plug):
    plug = KasaSwitch(config("kasa", kasa_plug.address, timeout=1))
    kasa_plug.pause()
    t0 = time.monotonic()
    with pytest.raises(SwitchError, match="no answer within 1 s"):
        plug.state()
    assert time.monotonic() - t0 < 10


@needs_kasa_simulator
def test_kasa_unreachable(kasa_plug):
    address = kasa_plug.address
    kasa_plug.stop()
    with pytest.raises(SwitchError, match="cannot reach the device"):
        KasaSwitch(config("kasa", address, timeout=1)).state()


def _garbage_server():
    """A TCP port on loopback that answers every connection with bytes that are no Kasa reply."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(4096)
            conn.sendall(b"\x00\x00\x00\x10HTTP/1.0 400 Bad")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return server


def test_kasa_garbage_answer():
    server = _garbage_server()
    try:
        with pytest.raises(SwitchError, match="not a kasa reply"):
            KasaSwitch(config("kasa", f"127.0.0.1:{server.getsockname()[1]}", timeout=1)).state()
    finally:
        server.close()


# --------------------------------------------------------------------------- Shelly Gen2


def test_shelly_with_digest_auth(shelly):
    plug = ShellySwitch(config("shelly", shelly.address), {"password": "shelly-pass-1"})
    exercise(plug)
    on = plug.on()
    assert on.power_w == 3.4 and on.energy_kwh == 6.532
    assert plug.info()["model"] == "SNSW-001P16EU" and plug.info()["auth"] is True
    assert any(p.startswith("/rpc/Switch.Set?id=0&on=true") for p in shelly.requests)


@pytest.mark.parametrize("credentials", [{"password": "wrong"}, None])
def test_shelly_wrong_or_missing_credentials(shelly, credentials):
    with pytest.raises(SwitchError, match="refused the credentials"):
        ShellySwitch(config("shelly", shelly.address), credentials).state()
    assert shelly.output is False


@pytest.mark.parametrize("mode, match", [("garbage", "not a shelly reply"), ("hang", "no answer within 1 s")])
def test_shelly_garbage_and_hang(shelly, mode, match):
    shelly.mode = mode
    with pytest.raises(SwitchError, match=match):
        ShellySwitch(config("shelly", shelly.address, timeout=1), {"password": "shelly-pass-1"}).on()


def test_shelly_unreachable_and_missing_channel(shelly):
    with pytest.raises(SwitchError, match="cannot reach the device: connection refused"):
        ShellySwitch(config("shelly", f"127.0.0.1:{free_port()}"), None).state()
    with pytest.raises(SwitchError, match="value 3 not found"):
        ShellySwitch(config("shelly", shelly.address, channel=3), {"password": "shelly-pass-1"}).state()


# --------------------------------------------------------------------------- Tasmota over HTTP


def test_tasmota_http(tasmota):
    plug = TasmotaSwitch(config("tasmota", tasmota.address), {"password": "tasmota-pass-1"})
    exercise(plug)
    on = plug.on()
    assert on.power_w == 5 and on.energy_kwh == 1.234
    assert plug.info() == {"model": "Nous A1T", "name": "Fan", "topic": "tasmota_5A1B2C",
                           "firmware": "13.2.0(tasmota)", "mac": "5C:CF:7F:5A:1B:2C", "transport": "http"}


def test_tasmota_http_faults(tasmota):
    with pytest.raises(SwitchError, match="refused the credentials"):
        TasmotaSwitch(config("tasmota", tasmota.address), {"password": "nope"}).on()
    assert tasmota.power is False
    tasmota.mode = "garbage"
    with pytest.raises(SwitchError, match="not a tasmota reply"):
        TasmotaSwitch(config("tasmota", tasmota.address), {"password": "tasmota-pass-1"}).state()
    with pytest.raises(SwitchError, match="connection refused"):
        TasmotaSwitch(config("tasmota", f"127.0.0.1:{free_port()}")).state()


# --------------------------------------------------------------------------- Tasmota over MQTT (real Mosquitto)


def mqtt_plug(tasmota, port, user=MQTT_USER, password=MQTT_PASSWORD, timeout=2):
    cfg = config("tasmota", "127.0.0.1:1", mqtt_broker=f"127.0.0.1:{port}", mqtt_topic=tasmota.topic,
                 timeout=timeout)
    return TasmotaSwitch(cfg, {"mqtt_username": user, "mqtt_password": password})


@needs_mosquitto
def test_tasmota_mqtt(tasmota, mosquitto):
    tasmota.connect_mqtt(mosquitto, MQTT_USER, MQTT_PASSWORD)
    plug = mqtt_plug(tasmota, mosquitto)
    exercise(plug)
    assert plug.on().power_w == 5
    assert plug.info()["transport"] == "mqtt"
    commands = [(t, p) for t, p, _ in tasmota.mqtt_seen]
    assert ("cmnd/tasmota_5A1B2C/Power1", "ON") in commands and ("cmnd/tasmota_5A1B2C/Power1", "TOGGLE") in commands


@needs_mosquitto
def test_tasmota_mqtt_commands_are_never_retained(tasmota, mosquitto):
    """A late subscriber to cmnd/<topic>/# must receive nothing: a retained OFF would switch the plug off
    again each time it reconnects."""
    import paho.mqtt.client as mqtt

    tasmota.connect_mqtt(mosquitto, MQTT_USER, MQTT_PASSWORD)
    mqtt_plug(tasmota, mosquitto).off()
    late = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.username_pw_set(MQTT_USER, MQTT_PASSWORD)
    client.on_message = lambda c, u, msg: late.append(msg.topic)
    client.on_connect = lambda c, u, f, r, p: c.subscribe("cmnd/#", qos=1)
    client.connect("127.0.0.1", mosquitto)
    client.loop_start()
    time.sleep(1.0)
    client.disconnect()
    client.loop_stop()
    assert tasmota.mqtt_seen and late == []


@needs_mosquitto
def test_tasmota_mqtt_faults(tasmota, mosquitto):
    with pytest.raises(SwitchError, match="MQTT broker .* refused the credentials"):
        mqtt_plug(tasmota, mosquitto, password="wrong").state()
    with pytest.raises(SwitchError, match="no answer within 1 s"):  # nothing subscribed to the topic
        mqtt_plug(tasmota, mosquitto, timeout=1).state()
    tasmota.connect_mqtt(mosquitto, MQTT_USER, MQTT_PASSWORD)
    tasmota.mode = "garbage"
    with pytest.raises(SwitchError, match="not a tasmota reply"):
        mqtt_plug(tasmota, mosquitto).state()
    with pytest.raises(SwitchError, match="cannot reach the device: MQTT broker"):
        mqtt_plug(tasmota, free_port()).state()


@needs_mosquitto
def test_tasmota_mqtt_over_tls_checked_against_the_cluster_ca(tasmota, mosquitto_tls, tmp_path):
    port, cluster = mosquitto_tls
    ca = cluster / "secrets" / "ca.crt"
    tasmota.connect_mqtt(port, MQTT_USER, MQTT_PASSWORD, ca_file=ca)
    cfg = config("tasmota", "127.0.0.1:1", mqtt_broker=f"127.0.0.1:{port}", mqtt_topic=tasmota.topic,
                 mqtt_tls=True)
    creds = {"mqtt_username": MQTT_USER, "mqtt_password": MQTT_PASSWORD}
    assert TasmotaSwitch(cfg, creds, ca_file=ca).on().on is True
    assert tasmota.power is True

    other = tmp_path / "other"  # another cluster's CA does not vouch for this broker
    new_cluster(other, name="other", **LOOPBACK)
    with pytest.raises(SwitchError, match="TLS to the MQTT broker .* failed: self-signed certificate in certificate chain"):
        TasmotaSwitch(cfg, creds, ca_file=other / "secrets" / "ca.crt").state()
    with pytest.raises(SwitchError, match="mqtt_tls needs the cluster CA"):
        TasmotaSwitch(cfg, creds, ca_file=tmp_path / "missing.crt").state()
