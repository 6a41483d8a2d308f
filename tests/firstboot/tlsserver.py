"""A tiny scripted HTTPS server on 127.0.0.1 for the agent's pinning and retry tests."""

import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedServer:
    """Answers each request with the next (status, body) of ``script`` (the last one repeats).

    ``requests`` records (method, path, authorization scheme or None, JSON body); ``connections``
    counts accepted TCP connections, including those whose TLS handshake failed.
    """

    def __init__(self, certfile, keyfile, script, keepalive_then_drop=False, drop_handshakes=0):
        """``keepalive_then_drop``: answer as HTTP/1.1 without "Connection: close" (the client may keep the
        connection) but close it right after each answer, as a server whose keep-alive timed out does.
        ``drop_handshakes``: close the first n connections before the TLS handshake (an overloaded server)."""
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keepalive_then_drop else "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                auth = self.headers.get("Authorization")
                outer.requests.append((self.command, self.path, auth.split()[0] if auth else None,
                                       json.loads(raw) if raw else None))
                status, body = outer.script[0] if len(outer.script) == 1 else outer.script.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if keepalive_then_drop:
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = _answer

        self.serving = TlsServing(certfile, keyfile, Handler, drop=lambda n: n <= drop_handshakes)
        self.port, self.url = self.serving.port, self.serving.url

    @property
    def connections(self):
        return self.serving.httpd.connections

    def __enter__(self):
        self.serving.__enter__()
        return self

    def __exit__(self, *exc):
        self.serving.__exit__(*exc)


class TlsServer(ThreadingHTTPServer):
    """A threading HTTP server that wraps each accepted connection in TLS (a failed handshake drops it).
    ``connections`` counts accepted TCP connections; ``drop(n)`` true closes the n-th before its handshake."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, ctx, drop=None):
        self.ctx, self.drop, self.connections = ctx, drop or (lambda n: False), 0
        super().__init__(address, handler)

    def get_request(self):
        sock, addr = super().get_request()
        self.connections += 1
        return sock, addr

    def finish_request(self, request, client_address):
        if self.drop(self.connections):
            request.close()
            return
        try:
            request = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        super().finish_request(request, client_address)


class TlsServing:
    """``handler`` served over TLS with ``certfile``/``keyfile`` on 127.0.0.1 (``port`` 0: any) while in a
    ``with`` block; ``url`` is where."""

    def __init__(self, certfile, keyfile, handler, port=0, drop=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile, keyfile)
        self.httpd = TlsServer(("127.0.0.1", port), handler, ctx, drop)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port():
    """A loopback port nobody listens on (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
