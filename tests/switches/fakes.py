"""Shelly Gen2 and Tasmota devices for the tests, on loopback: no emulator of either exists, so these answer
exactly as the vendors' documentation shows (the request/response examples of the Shelly Gen2 API docs,
"Switch", "Shelly" and "Authentication" pages; Tasmota's "Commands" page, HTTP and MQTT sections).

The Shelly digest check is written here from RFC 7616 (SHA-256, qop=auth) and is itself tested against two
independent clients, curl --digest and requests' HTTPDigestAuth (tests/switches/test_fakes.py).
``mode`` turns a device bad: "garbage" answers HTML, "hang" answers after a long delay.
"""

import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

HANG_S = 30


def _sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def parse_digest_header(value):
    """{'username': ..., 'realm': ..., ...} of an ``Authorization: Digest ...`` header."""
    if not value or not value.startswith("Digest "):
        return None
    fields, rest = {}, value[len("Digest "):]
    while rest:
        key, _, rest = rest.strip().partition("=")
        if rest.startswith('"'):
            val, _, rest = rest[1:].partition('"')
        else:
            val, _, rest = rest.partition(",")
            val = val.strip()
        fields[key.strip()] = val
        rest = rest.lstrip(", ")
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class FakeDevice:
    """An HTTP device on 127.0.0.1:<free port>, started/stopped by the tests."""

    def __init__(self):
        self.mode = "ok"
        self.requests = []
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        device = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802
                device.requests.append(self.path)
                if device.mode == "hang":
                    time.sleep(HANG_S)
                if device.mode == "garbage":
                    return self._send(200, "<html><body>Router login</body></html>", "text/html")
                status, body, headers = device.answer(self)
                return self._send(status, json.dumps(body), "application/json", headers)

            def _send(self, status, text, ctype, headers=()):
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


class FakeShelly(FakeDevice):
    """A Shelly Plus 1PM (Gen2): one switch with a power meter, optional password (digest SHA-256)."""

    device_id = "shellyplus1pm-a8032ab12345"

    def __init__(self, password=None):
        super().__init__()
        self.password = password
        self.output = False
        self.apower = 0.0
        self.energy_wh = 6532.1
        self.nonces = set()

    def _authorised(self, request):
        if self.password is None:
            return True
        fields = parse_digest_header(request.headers.get("Authorization"))
        if not fields or fields.get("nonce") not in self.nonces or fields.get("algorithm") != "SHA-256":
            return False
        if fields.get("username") != "admin" or fields.get("realm") != self.device_id:
            return False
        ha1 = _sha256(f"admin:{self.device_id}:{self.password}")
        ha2 = _sha256(f"GET:{fields.get('uri')}")
        if fields.get("uri") != request.path:
            return False
        expected = _sha256(f"{ha1}:{fields['nonce']}:{fields.get('nc')}:{fields.get('cnonce')}:auth:{ha2}")
        return fields.get("qop") == "auth" and secrets.compare_digest(expected, fields.get("response", ""))

    def answer(self, request):
        if not self._authorised(request):
            nonce = secrets.token_hex(8)
            self.nonces.add(nonce)
            challenge = f'Digest qop="auth", realm="{self.device_id}", nonce="{nonce}", algorithm=SHA-256'
            return 401, {"code": 401, "message": "unauthorized"}, [("WWW-Authenticate", challenge)]
        url = urlparse(request.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        method = url.path.removeprefix("/rpc/")
        if method == "Shelly.GetDeviceInfo":
            return 200, {"name": None, "id": self.device_id, "mac": "A8032AB12345", "slot": 0,
                         "model": "SNSW-001P16EU", "gen": 2, "fw_id": "20231107-164738/1.0.8-g8c7bb8d",
                         "ver": "1.0.8", "app": "Plus1PM", "auth_en": self.password is not None,
                         "auth_domain": self.device_id if self.password else None}, []
        if query.get("id", "0") != "0":
            return 500, {"code": -105, "message": f"Argument 'id', value {query.get('id')} not found!"}, []
        if method == "Switch.GetStatus":
            return 200, {"id": 0, "source": "http", "output": self.output,
                         "apower": self.apower, "voltage": 237.5, "current": round(self.apower / 237.5, 3),
                         "aenergy": {"total": self.energy_wh, "by_minute": [0.0, 0.0, 0.0], "minute_ts": 1700000000},
                         "temperature": {"tC": 41.2, "tF": 106.2}}, []
        if method in ("Switch.Set", "Switch.Toggle"):
            was_on = self.output
            self.output = (query.get("on") == "true") if method == "Switch.Set" else not self.output
            self.apower = 3.4 if self.output else 0.0
            return 200, {"was_on": was_on}, []
        return 404, {"code": 404, "message": f"No handler for {method}"}, []


class FakeTasmota(FakeDevice):
    """A Tasmota plug (e.g. a Sonoff S31 or Nous A1T: one relay and an energy meter), web password optional,
    and optionally on an MQTT broker under ``topic``."""

    def __init__(self, password=None, topic="tasmota_5A1B2C", meter=True):
        super().__init__()
        self.password = password
        self.topic = topic
        self.meter = meter
        self.power = False
        self.mqtt = None
        self.mqtt_seen = []

    def command(self, text):
        """Tasmota's answer to one command line, e.g. 'Power1 ON', 'Status 8'."""
        word, _, arg = text.strip().partition(" ")
        word = word.upper()
        if word in ("POWER", "POWER1"):
            arg = arg.strip().upper()
            if arg in ("ON", "1"):
                self.power = True
            elif arg in ("OFF", "0"):
                self.power = False
            elif arg in ("TOGGLE", "2"):
                self.power = not self.power
            return "RESULT", {"POWER": "ON" if self.power else "OFF"}
        if word == "STATUS" and arg.strip() == "8":
            sns = {"Time": "2024-01-01T12:00:00"}
            if self.meter:
                sns["ENERGY"] = {"TotalStartTime": "2023-11-01T10:00:00", "Total": 1.234, "Yesterday": 0.05,
                                 "Today": 0.01, "Power": 5 if self.power else 0, "ApparentPower": 7,
                                 "ReactivePower": 4, "Factor": 0.7, "Voltage": 231, "Current": 0.03}
            return "STATUS8", {"StatusSNS": sns}
        if word == "STATUS" and arg.strip() == "0":
            return "STATUS0", {"Status": {"Module": 1, "DeviceName": "Nous A1T", "FriendlyName": ["Fan"],
                                         "Topic": self.topic, "Power": int(self.power)},
                              "StatusFWR": {"Version": "13.2.0(tasmota)"},
                              "StatusNET": {"Hostname": "fan-1234", "Mac": "5C:CF:7F:5A:1B:2C"}}
        return "RESULT", {"Command": "Unknown"}

    def answer(self, request):
        query = {k: v[0] for k, v in parse_qs(urlparse(request.path).query).items()}
        if self.password is not None and (query.get("user") != "admin" or query.get("password") != self.password):
            return 401, {"WARNING": "Need user=<username>&password=<password>"}, []
        return 200, self.command(query.get("cmnd", ""))[1], []

    def connect_mqtt(self, port, username, password, ca_file=None):
        """Join the broker as the device (over TLS with ``ca_file``): answer cmnd/<topic>/# on stat/<topic>/..."""
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"DVES_{self.topic}")
        client.username_pw_set(username, password)
        if ca_file:
            client.tls_set(ca_certs=str(ca_file))
        ready = threading.Event()

        def on_connect(c, userdata, flags, reason, props):
            c.subscribe(f"cmnd/{self.topic}/#", qos=1)

        def on_message(c, userdata, msg):
            self.mqtt_seen.append((msg.topic, msg.payload.decode(), msg.retain))
            if self.mode == "hang":
                return
            word = msg.topic.rsplit("/", 1)[1]
            kind, body = self.command(f"{word} {msg.payload.decode()}")
            payload = "not json {" if self.mode == "garbage" else json.dumps(body)
            c.publish(f"stat/{self.topic}/{kind}", payload, qos=1)

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: ready.set()
        client.on_message = on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the fake Tasmota could not subscribe on the broker")
        self.mqtt = client
        return self

    def stop(self):
        if self.mqtt is not None:
            self.mqtt.disconnect()
            self.mqtt.loop_stop()
        super().stop()
