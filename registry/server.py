"""Serve the registry app under gunicorn with TLS (``pibake registry serve``).

gunicorn's master runs in the foreground, logs to stderr, and stops cleanly on SIGTERM/SIGINT.
Workers are threaded (``gthread``): an enrolment waits while slurmctld restarts, and other requests
must still be answered meanwhile.
"""

import json
import logging
import os
import threading
from pathlib import Path

from gunicorn.app.base import BaseApplication
from gunicorn.config import KNOWN_SETTINGS

from pibake.errors import ConfigError, PibakeError
from pibake.files import atomic_write, file_stamp
from pibake.registry.app import create_app
from pibake.secrets import secrets_dir

LOG = logging.getLogger(__name__)
_SETTINGS = {s.name for s in KNOWN_SETTINGS}
# Seconds an idle client connection stays open: a node's agent and `pibake deploy` make several requests in
# a row (enrol, munge key, slurm.conf, status); each new connection costs the registry a TLS handshake.
KEEPALIVE_S = 30


LOGCONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": []},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False, "qualname": "gunicorn.error"},
        "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False,
                            "qualname": "gunicorn.access"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"},
        "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"},
    },
    "formatters": {
        "generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(message)s",
                    "datefmt": "[%Y-%m-%d %H:%M:%S %z]", "class": "logging.Formatter"},
        "access": {"format": "%(message)s", "class": "logging.Formatter"},
    },
}


class RegistryServer(BaseApplication):
    """A gunicorn application around an already created Flask app."""

    def __init__(self, app, options):
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application


def parse_bind(bind, default_port):
    """``IP:PORT``, ``[v6]:PORT``, ``IP`` or ``:PORT`` -> gunicorn bind string. Raises ConfigError."""
    if not bind:
        return f"0.0.0.0:{default_port}"
    host, sep, port = bind.rpartition(":")
    if not sep or "]" in port:
        host, port = bind, str(default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--bind {bind}: the port must be a number from 1 to 65535")
    return f"{host or '0.0.0.0'}:{port}"


def gunicorn_options(cluster_dir, bind, *, workers=2, threads=32, timeout=120):
    sdir = secrets_dir(cluster_dir)
    cert, key = sdir / "registry.crt", sdir / "registry.key"
    for path in (cert, key):
        if not Path(path).exists():
            raise ConfigError(f"{path} is missing: run `pibake init` (or copy the manager bundle) first")
    opts = {
        "bind": [bind],
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "certfile": str(cert),
        "keyfile": str(key),
        # Everything to stderr (gunicorn's "-" access log is stdout; /dev/stderr cannot be opened when
        # stderr is the journal's socket under systemd): gunicorn's own loggers, configured here.
        "logconfig_dict": LOGCONFIG,
        "loglevel": "info",
        "timeout": timeout,
        "graceful_timeout": 10,
        "proc_name": "pibake-registry",
        "forwarded_allow_ips": "",
        "keepalive": KEEPALIVE_S,
    }
    if "ssl_context" in _SETTINGS:  # gunicorn >= 21 (Debian bookworm has 20.1: a context per connection there)
        opts["ssl_context"] = shared_ssl_context
    if "control_socket_disable" in _SETTINGS:  # gunicorn >= 24: one shared ~/.gunicorn socket would clash
        opts["control_socket_disable"] = True
    return opts


_SSL_CONTEXTS = {}  # (pid, certfile stamp, keyfile stamp) -> the SSLContext of this worker
_SSL_LOCK = threading.Lock()


def shared_ssl_context(conf, default_ssl_context_factory):
    """gunicorn's ``ssl_context`` hook: one context per worker process instead of one per connection
    (gunicorn's gthread worker calls it for every connection, and each new context loads the certificate
    and key again). The context is gunicorn's own, unchanged (same certificate, minimum TLS version and
    ciphers); a new one is made when the certificate or key file changes (a rotated CA)."""
    key = (os.getpid(), file_stamp(conf.certfile), file_stamp(conf.keyfile))
    with _SSL_LOCK:
        context = _SSL_CONTEXTS.get(key)
        if context is None:
            _SSL_CONTEXTS.clear()
            context = _SSL_CONTEXTS[key] = default_ssl_context_factory()
        return context


SERVE_OPTIONS_FILE = "registry-serve.json"


def remember_serve_options(cluster_dir, reg):
    """Record where the running registry writes slurm.conf and how it applies it, so that
    `pibake registry accept/remove` on the manager act on the same file the same way."""
    path = Path(cluster_dir) / SERVE_OPTIONS_FILE
    options = {"slurm_conf": str(reg.applier.conf_path), "slurm_apply": reg.applier.mode,
               "slurm_settings": reg.slurm_settings}
    atomic_write(path, json.dumps(options, indent=2, sort_keys=True) + "\n")


def served_options(cluster_dir):
    """The options the last `registry serve` of this cluster ran with ({} when none)."""
    try:
        data = json.loads((Path(cluster_dir) / SERVE_OPTIONS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in ("slurm_conf", "slurm_apply", "slurm_settings")}


def serve(cluster_dir, *, bind=None, workers=2, threads=32, **options):
    """Run the registry until SIGTERM. ``options`` are RegistryService options (None = from cluster.yaml).

    ``threads`` per worker: an enrolment waiting for the slurm.conf apply that will cover it holds a
    thread, so more threads let one apply cover more enrolments of a burst (bench/registry: 2 x 32 needed
    about a third of the applies of 2 x 8 at 50 concurrent enrolments, and less CPU per enrolment).
    """
    app = create_app(cluster_dir, **{k: v for k, v in options.items() if v not in (None, False)})
    reg = app.extensions["pibake_registry"]
    bind = parse_bind(bind, reg.cluster.get("registry_port", 8443))
    opts = gunicorn_options(cluster_dir, bind, workers=workers, threads=threads,
                            timeout=int(reg.applier.timeout) * 2 + 30)
    remember_serve_options(cluster_dir, reg)
    try:
        result = reg.apply_slurm()
        LOG.info("slurm.conf at start: %s", result["action"])
    except PibakeError as err:
        LOG.warning("slurm.conf not applied at start (%s); will retry on the next enrolment", err)
    LOG.info("registry for cluster %s listening on https://%s (%s)", reg.cluster["name"], bind,
             "approval required" if reg.require_approval else "open enrolment with the join token")
    RegistryServer(app, opts).run()
