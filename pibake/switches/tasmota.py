"""Tasmota relays over HTTP (``/cm?cmnd=Power%20On``) or, with ``mqtt_broker`` and ``mqtt_topic`` set, over
MQTT (``cmnd/<topic>/POWER`` answered on ``stat/<topic>/RESULT``).

Commands are never published retained: a retained ``OFF`` would switch the plug off again every time it
reconnects to the broker. HTTP credentials are Tasmota's web password (``user=admin&password=...`` in the
query, as Tasmota wants it); the URL is therefore never logged. MQTT credentials are the broker's.
"""

import json
import logging
import queue
import ssl
import uuid
from pathlib import Path

import requests

from pibake.errors import SwitchError
from pibake.switches.base import Switch, SwitchState, short

LOG = logging.getLogger(__name__)

TASMOTA_USER = "admin"


class TasmotaSwitch(Switch):
    driver = "tasmota"

    @property
    def _relay(self):
        return f"Power{self.config.channel + 1}"

    def _command(self, command, payload=""):
        """Send one Tasmota command; return its JSON answer (a dict)."""
        if self.config.mqtt_topic:
            return self._mqtt_command(command, payload)
        return self._http_command(command, payload)

    # ------------------------------------------------------------------ HTTP

    def _http_command(self, command, payload):
        params = {"cmnd": f"{command} {payload}".strip()}
        if self.credentials:
            params["user"] = self.credentials.get("username") or TASMOTA_USER
            params["password"] = self.credentials["password"]
        try:
            reply = requests.get(f"http://{self.config.address}/cm", params=params, timeout=self.timeout,
                                 allow_redirects=False)
        except requests.Timeout as exc:
            raise self.timed_out() from exc
        except requests.ConnectionError as exc:
            raise self.unreachable("connection refused" if "refused" in str(exc) else "connection failed") from exc
        except requests.RequestException as exc:
            raise self.garbage(type(exc).__name__) from exc
        if reply.status_code == 401:
            raise self.bad_credentials()
        try:
            body = reply.json()
        except ValueError as exc:
            raise self.garbage(f"HTTP {reply.status_code}: {short(reply.text)!r}") from exc
        if reply.status_code != 200 or not isinstance(body, dict):
            raise self.garbage(f"HTTP {reply.status_code}: {short(body)}")
        if "WARNING" in body and "password" in str(body["WARNING"]).lower():
            raise self.bad_credentials()
        return body

    # ------------------------------------------------------------------ MQTT

    def _mqtt_command(self, command, payload):
        import paho.mqtt.client as mqtt  # only where a Tasmota plug is driven over MQTT

        topic = self.config.mqtt_topic
        word = command.split()[0]
        # Tasmota answers Status N on stat/<topic>/STATUS<N> (older firmware: STATUS for Status 0), every
        # other command on stat/<topic>/RESULT
        if word == "Status":
            number = command.split()[1]
            wanted = {f"STATUS{number}"} | ({"STATUS"} if number == "0" else set())
        else:
            wanted = {"RESULT"}
        answer_topic = f"stat/{topic}/{sorted(wanted)[-1]}"
        host, _, port = self.config.mqtt_broker.rpartition(":")
        if not host:
            host, port = self.config.mqtt_broker, "1883"
        answers = queue.Queue()
        connected = queue.Queue()

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pibake-{uuid.uuid4().hex[:12]}",
                             protocol=mqtt.MQTTv311)
        if self.credentials and self.credentials.get("mqtt_username"):
            client.username_pw_set(self.credentials["mqtt_username"], self.credentials.get("mqtt_password"))
        client.on_connect = lambda c, u, flags, reason, props: connected.put(reason)
        client.on_subscribe = lambda c, u, mid, reasons, props: connected.put("subscribed")
        if self.config.mqtt_tls:
            if not self.ca_file or not Path(self.ca_file).exists():
                raise self._error(f"mqtt_tls needs the cluster CA {self.ca_file}; run `pibake init` first")
            client.tls_set(ca_certs=str(self.ca_file))  # verifies the chain and the broker's name
        client.on_message = lambda c, u, msg: (answers.put(msg.payload)
                                               if msg.topic.rsplit("/", 1)[-1] in wanted else None)
        try:
            client.connect(host, int(port), keepalive=30)
        except ssl.SSLError as exc:
            raise self._error(f"TLS to the MQTT broker {self.config.mqtt_broker} failed: "
                              f"{getattr(exc, 'verify_message', None) or exc.reason or exc} (its certificate must "
                              "be signed by the cluster CA, secrets/ca.crt, for the name or IP in mqtt_broker)") \
                from exc
        except OSError as exc:
            raise self.unreachable(f"MQTT broker {self.config.mqtt_broker}: {exc.strerror or exc}") from exc
        client.loop_start()
        try:
            reason = self._wait(connected, f"MQTT broker {self.config.mqtt_broker} did not accept the connection")
            if getattr(reason, "is_failure", False):
                if reason.value in (4, 5, 0x86, 0x87):  # bad user name or password / not authorised
                    raise self._error(f"the MQTT broker {self.config.mqtt_broker} refused the credentials "
                                      f"(set them with `pibake switch credentials {self.config.name}`)")
                raise self.unreachable(f"MQTT broker {self.config.mqtt_broker}: {reason}")
            client.subscribe(f"stat/{topic}/+", qos=1)
            self._wait(connected, "MQTT broker did not confirm the subscription")
            client.publish(f"cmnd/{topic}/{word}", " ".join(command.split()[1:] + [payload]).strip(),
                           qos=1, retain=False)
            raw = self._wait(answers, None)
        finally:
            client.disconnect()
            client.loop_stop()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise self.garbage(f"{answer_topic}: {short(raw)!r}") from exc
        if not isinstance(body, dict):
            raise self.garbage(f"{answer_topic}: {short(body)}")
        return body

    def _wait(self, box, what):
        try:
            return box.get(timeout=self.timeout)
        except queue.Empty:
            if what is None:
                raise self.timed_out() from None
            raise self.unreachable(what) from None

    def _error(self, text):
        return SwitchError(f"{self._where()}: {text}")

    # ------------------------------------------------------------------ the interface

    def _power_of(self, body):
        keys = [self._relay.upper()] + (["POWER"] if self.config.channel == 0 else [])
        for key in keys:
            if key in body:
                value = body[key]
                if value in ("ON", "OFF"):
                    return value == "ON"
                raise self.garbage(f"{key}={short(value)!r}")
        raise self.garbage(f"no {keys[0]} in {short(body)}")

    def state(self):
        on = self._power_of(self._command(self._relay))
        power = energy = None
        meter = self._command("Status 8").get("StatusSNS", {})  # ENERGY only on plugs with a meter
        reading = meter.get("ENERGY") if isinstance(meter, dict) else None
        if isinstance(reading, dict):
            power, energy = _number(reading.get("Power")), _number(reading.get("Total"))
        return SwitchState(on=on, power_w=power, energy_kwh=energy)

    def turn(self, on):
        self._power_of(self._command(self._relay, "ON" if on else "OFF"))
        return self.state()

    def toggle(self):
        self._power_of(self._command(self._relay, "TOGGLE"))
        return self.state()

    def info(self):
        status = self._command("Status 0")
        device = status.get("Status")
        if not isinstance(device, dict):
            raise self.garbage(f"no Status in {short(status)}")
        return {
            "model": device.get("DeviceName"),
            "name": (device.get("FriendlyName") or [None])[0],
            "topic": device.get("Topic"),
            "firmware": (status.get("StatusFWR") or {}).get("Version"),
            "mac": (status.get("StatusNET") or {}).get("Mac"),
            "transport": "mqtt" if self.config.mqtt_topic else "http",
        }


def _number(value):
    try:
        return None if value is None else round(float(value), 3)
    except (TypeError, ValueError):
        return None
