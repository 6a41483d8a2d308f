"""A small HTTPS server speaking the registry's POST /api/v1/readings contract (notes: SENSORS_CONTRACT), for the
sensor agent's buffer tests: real TLS with the cluster's registry certificate, HTTP Basic node credentials, and
the readings kept in a real SQLite table unique on (node, seq), as the registry stores them. ``mode`` scripts
failures: "ok", "down" (503), "store_then_drop" (stores the batch, then closes the connection without an answer:
what the agent sees when it or the network dies mid-send), "refuse" (422)."""

import base64
import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler

from tests.firstboot.tlsserver import TlsServing


class ReadingsServer:
    def __init__(self, certfile, keyfile, credentials, port=0):
        self.credentials = dict(credentials)  # hostname -> credential
        self.mode = "ok"
        self.posts = []  # (node, [seq...]) per authenticated request
        self.requests = 0  # every request, authenticated or not
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.execute("CREATE TABLE readings (node TEXT, seq INTEGER, body TEXT, UNIQUE (node, seq))")
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests += 1
                node = outer.authenticate(self.headers.get("Authorization"))
                if self.path != "/api/v1/readings":
                    return self._reply(404, {"error": "not found"})
                if node is None:
                    return self._reply(401, {"error": "node credential required"})
                readings = json.loads(raw)["readings"]
                outer.posts.append((node, [r["seq"] for r in readings]))
                if outer.mode == "down":
                    return self._reply(503, {"error": "registry restarting"})
                if outer.mode == "refuse":
                    return self._reply(422, {"error": "readings[0].metrics.humidity_pct: 140 is outside 0..100"})
                accepted, duplicates = outer.store(node, readings)
                if outer.mode == "store_then_drop":
                    self.close_connection = True
                    self.connection.close()
                    return None
                return self._reply(200, {"accepted": accepted, "duplicates": duplicates,
                                         "last_seq": outer.last_seq(node)})

        self.serving = TlsServing(certfile, keyfile, Handler, port=port)
        self.port, self.url = self.serving.port, self.serving.url

    def authenticate(self, header):
        if not header or not header.startswith("Basic "):
            return None
        node, _, credential = base64.b64decode(header[6:]).decode().partition(":")
        return node if self.credentials.get(node) == credential else None

    def store(self, node, readings):
        with self.lock, self.db:
            before = self.db.total_changes
            self.db.executemany("INSERT OR IGNORE INTO readings VALUES (?, ?, ?)",
                                [(node, r["seq"], json.dumps(r)) for r in readings])
            accepted = self.db.total_changes - before
        return accepted, len(readings) - accepted

    def last_seq(self, node):
        with self.lock:
            return self.db.execute("SELECT MAX(seq) FROM readings WHERE node = ?", (node,)).fetchone()[0]

    def stored(self, node):
        with self.lock:
            return [json.loads(b) for (b,) in
                    self.db.execute("SELECT body FROM readings WHERE node = ? ORDER BY seq", (node,))]

    def __enter__(self):
        self.serving.__enter__()
        return self

    def __exit__(self, *exc):
        self.serving.__exit__(*exc)
