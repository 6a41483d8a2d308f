"""MQTT for the sensor agent: live state, availability and Home Assistant discovery (stdlib + paho-mqtt 2.x).

Installed next to the sensor agent as one file; the agent does::

    from sensor_mqtt import MqttPublisher
    publisher = MqttPublisher("red-zero", settings)   # settings: sensor.json, or its "mqtt" block
    publisher.publish(reading)                          # one reading dict (SENSORS_CONTRACT.md), never blocks
    publisher.close()

Topics (``base`` and ``discovery_prefix`` from the settings, defaults ``pibake`` and ``homeassistant``)::

    pibake/<node>/state                                 retained JSON: the latest metrics, time, place
    pibake/<node>/availability                          retained "online"; "offline" as the last will
    homeassistant/sensor/<node>/<metric>/config         retained discovery message, one per metric seen

The connection is TLS, checked against the cluster CA, with the node's own user (its hostname) and the
password the first-boot agent stored (/etc/pibake/mqtt-password). paho's network thread connects and
reconnects in the background; ``publish`` only queues (bounded), so a broker that is down never holds up the
agent's HTTPS path, which remains the record of every reading (see docs/mqtt.md).
"""

import json
import logging
import ssl
import threading

import paho.mqtt.client as mqtt

if not hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 1.x (Debian bookworm's python3-paho-mqtt 1.6.1)
    raise ImportError("sensor_mqtt needs paho-mqtt 2.x (Debian trixie's python3-paho-mqtt, or pip paho-mqtt>=2)")

LOG = logging.getLogger("pibake.sensor_mqtt")

MANUFACTURER = "pibake"
MAX_QUEUED = 1000  # messages kept while the broker is away; older live state is worth little
DEFAULT_INTERVAL_S = 60

# metric -> (name, device_class, unit_of_measurement, state_class, entity_category), names as in
# SENSORS_CONTRACT.md; device classes and units as Home Assistant's sensor integration lists them.
METRICS = {
    "temperature_c": ("Temperature", "temperature", "°C", "measurement", None),
    "humidity_pct": ("Humidity", "humidity", "%", "measurement", None),
    "pressure_hpa": ("Pressure", "atmospheric_pressure", "hPa", "measurement", None),
    "gas_ohm": ("Gas resistance", None, "Ω", "measurement", None),
    "wifi_signal_dbm": ("Wi-Fi signal", "signal_strength", "dBm", "measurement", "diagnostic"),
    "wifi_quality_pct": ("Wi-Fi quality", None, "%", "measurement", "diagnostic"),
    "wifi_bitrate_mbps": ("Wi-Fi bit rate", "data_rate", "Mbit/s", "measurement", "diagnostic"),
    "soc_temperature_c": ("SoC temperature", "temperature", "°C", "measurement", "diagnostic"),
    "throttled": ("Throttled flags", None, None, None, "diagnostic"),
}


def _mqtt_settings(settings):
    """The ``mqtt`` block, whether given sensor.json as a whole or the block itself."""
    block = settings.get("mqtt") if isinstance(settings.get("mqtt"), dict) else settings
    return dict(block)


def topics(node, base="pibake", discovery_prefix="homeassistant"):
    return {"state": f"{base}/{node}/state", "availability": f"{base}/{node}/availability",
            "discovery": f"{discovery_prefix}/sensor/{node}/{{metric}}/config"}


def state_payload(reading):
    """The retained state: the reading's metrics plus its time and place (one JSON object)."""
    state = dict(reading.get("metrics") or {})
    state["time"] = reading.get("time")
    state["place"] = reading.get("place")
    return state


def discovery_config(node, metric, *, base="pibake", expire_after=DEFAULT_INTERVAL_S * 3, model="sensor node"):
    """Home Assistant's MQTT discovery message for ``metric`` of ``node`` (a dict)."""
    name, device_class, unit, state_class, category = METRICS[metric]
    t = topics(node, base)
    config = {
        "name": name,
        "unique_id": f"pibake_{node}_{metric}",
        "object_id": f"{node}_{metric}",
        "state_topic": t["state"],
        "value_template": f"{{{{ value_json.{metric} }}}}",
        "availability_topic": t["availability"],
        "payload_available": "online",
        "payload_not_available": "offline",
        "expire_after": int(expire_after),
        "device": {"identifiers": [f"pibake_{node}"], "name": node, "model": model,
                   "manufacturer": MANUFACTURER},
        "origin": {"name": "pibake"},
    }
    for key, value in (("device_class", device_class), ("unit_of_measurement", unit),
                       ("state_class", state_class), ("entity_category", category)):
        if value is not None:
            config[key] = value
    return config


class MqttPublisher:
    """Publishes one node's readings to the cluster's broker (see the module docstring)."""

    def __init__(self, node, settings):
        block = _mqtt_settings(settings)
        self.node = node
        self.host, self.port = block.get("host"), int(block.get("port") or 8883)
        self.ca_cert = block.get("ca_cert") or "/etc/pibake/ca.crt"
        self.username = block.get("username") or node
        self.password_file = block.get("password_file") or "/etc/pibake/mqtt-password"
        self.base = block.get("base") or "pibake"
        self.prefix = block.get("discovery_prefix") or "homeassistant"
        interval = settings.get("interval_s") or block.get("interval_s") or DEFAULT_INTERVAL_S
        # Home Assistant shows a value as unavailable when no new one came for three intervals
        self.expire_after = max(int(block.get("expire_after") or 3 * float(interval)), 30)
        self.model = block.get("model") or "sensor node"
        self.topics = topics(node, self.base, self.prefix)
        self._lock = threading.Lock()
        self._announced = set()  # metrics whose discovery message went out on this connection
        self._connected = threading.Event()
        self.client = None
        self._start()

    # ------------------------------------------------------------------ connection

    def _password(self):
        try:
            with open(self.password_file, encoding="utf-8") as fh:
                return fh.readline().strip() or None
        except OSError:
            return None

    def _start(self):
        """Start the background connection once the password is there (the first-boot agent writes it)."""
        if self.client is not None:
            return True
        password = self._password()
        if not password or not self.host:
            LOG.warning("MQTT not started: %s", "no broker host in the settings" if not self.host
                        else f"no password in {self.password_file} yet")
            return False
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pibake-{self.node}",
                             protocol=mqtt.MQTTv311)
        client.username_pw_set(self.username, password)
        client.tls_set(ca_certs=self.ca_cert, cert_reqs=ssl.CERT_REQUIRED)  # and the broker's name is checked
        client.will_set(self.topics["availability"], "offline", qos=1, retain=True)
        client.max_queued_messages_set(MAX_QUEUED)
        client.reconnect_delay_set(min_delay=1, max_delay=120)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.connect_async(self.host, self.port, keepalive=60)
        client.loop_start()
        self.client = client
        return True

    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            LOG.warning("MQTT broker %s:%s refused the connection: %s", self.host, self.port, reason)
            return
        LOG.info("MQTT connected to %s:%s as %s", self.host, self.port, self.username)
        with self._lock:
            self._announced.clear()  # the broker may have lost retained messages: announce again
        client.publish(self.topics["availability"], "online", qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        self._connected.clear()
        if reason.is_failure:
            LOG.warning("MQTT connection to %s:%s lost: %s", self.host, self.port, reason)

    def wait_connected(self, timeout):
        """True once connected (tests and diagnostics; the agent never waits)."""
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------ the interface

    def publish(self, reading):
        """Queue ``reading``'s discovery messages (new metrics) and its state; never raises, never blocks."""
        try:
            if not self._start():
                return False
            metrics = [m for m in (reading.get("metrics") or {}) if m in METRICS]
            with self._lock:
                new = [m for m in metrics if m not in self._announced]
                self._announced.update(new)
            for metric in new:
                config = discovery_config(self.node, metric, base=self.base, expire_after=self.expire_after,
                                          model=self.model)
                self.client.publish(self.topics["discovery"].format(metric=metric), json.dumps(config), qos=1,
                                    retain=True)
            info = self.client.publish(self.topics["state"], json.dumps(state_payload(reading)), qos=1,
                                       retain=True)
            return info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN
        except (ValueError, TypeError, OSError) as exc:  # a bad reading or a broken socket: the HTTPS path goes on
            LOG.warning("MQTT publish failed: %s", exc)
            return False

    def close(self):
        """Say "offline" (retained), then disconnect cleanly (a clean disconnect sends no last will)."""
        if self.client is None:
            return
        try:
            if self._connected.is_set():
                self.client.publish(self.topics["availability"], "offline", qos=1, retain=True).wait_for_publish(5)
            self.client.disconnect()
        except (ValueError, RuntimeError, OSError) as exc:
            LOG.warning("MQTT close: %s", exc)
        finally:
            self.client.loop_stop()
            self.client = None
