"""The real registry app served over TLS (the cluster's own certificate) on a free loopback port, in a thread,
with every exchange recorded at the WSGI boundary: what a client put on the wire (method, path, headers,
body) and what the app answered. Used by the client and contract tests (tests/test_registry_client.py,
tests/test_registry_contract.py, tests/lab/test_lab_programs.py)."""

import io
import threading
from dataclasses import dataclass, field

from werkzeug.serving import make_server
from werkzeug.wrappers import Request

from pibake.cluster import init_cluster
from pibake.registry.app import create_app
from pibake.secrets import admin_password, load_join_token, secrets_dir


@dataclass
class Exchange:
    method: str
    path: str  # below /api/v1, without the query
    query: str
    headers: dict
    body: bytes
    status: int = 0
    response: bytes = b""


@dataclass
class LiveRegistry:
    cluster_dir: object
    base: str
    ca: str
    password: str
    token: str
    exchanges: list = field(default_factory=list)


class _Recorder:
    def __init__(self, app, exchanges):
        self.app, self.exchanges = app, exchanges

    def __call__(self, environ, start_response):
        request = Request(environ)
        body = request.get_data()
        environ["wsgi.input"] = io.BytesIO(body)  # the app reads the same bytes again
        environ["CONTENT_LENGTH"] = str(len(body))
        path = request.path[len("/api/v1"):] if request.path.startswith("/api/v1") else request.path
        exchange = Exchange(request.method, path, request.query_string.decode(), dict(request.headers), body)
        self.exchanges.append(exchange)

        def recording_start(status, headers, exc_info=None):
            exchange.status = int(status.split()[0])
            return start_response(status, headers, exc_info)
        chunks = list(self.app(environ, recording_start))
        exchange.response = b"".join(chunks)
        return chunks


def serve(tmp_path, name="contract"):
    """A started registry for a fresh cluster in ``tmp_path``; returns (LiveRegistry, stop)."""
    cluster_dir = tmp_path / "cluster"
    init_cluster(cluster_dir, manager="localhost", manager_ip="127.0.0.1", network="127.0.0.0/8", name=name)
    app = create_app(cluster_dir, slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False)
    exchanges = []
    sdir = secrets_dir(cluster_dir)
    server = make_server("127.0.0.1", 0, _Recorder(app, exchanges), threaded=True,
                         ssl_context=(str(sdir / "registry.crt"), str(sdir / "registry.key")))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    live = LiveRegistry(cluster_dir, f"https://127.0.0.1:{server.server_port}", str(sdir / "ca.crt"),
                        admin_password(cluster_dir), load_join_token(cluster_dir).token, exchanges)

    def stop():
        server.shutdown()
        server.server_close()
    return live, stop
