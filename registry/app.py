"""Flask app factory for the registry.

    app = create_app("cluster", require_approval=True, slurm_conf="/tmp/x/slurm.conf", slurm_apply="none")

Options are those of ``pibake.registry.service.RegistryService``. Served by ``pibake registry serve`` under
gunicorn with TLS; Flask's own server is for tests only.
"""

import hashlib
import hmac
import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from pibake.registry import api, mqtt, sensors_api, sensors_web, web
from pibake.registry.service import RegistryService
from pibake.secrets import admin_password

LOG = logging.getLogger(__name__)

MAX_BODY = 256 * 1024


def create_app(cluster_dir, *, test_config=None, job_functions=None, job_workers=None, **options):
    """A Flask app for the cluster in ``cluster_dir``. ``test_config`` updates ``app.config``.

    ``job_functions``/``job_workers``: what the REST jobs run ({kind: function(cluster_dir, params,
    progress)}, default ``pibake.jobs.FUNCTIONS``: verify and deploy) and how many at once (default 2).
    """
    # the jobs run orchestration (verify, deploy, recover), reached only through pibake.api and only when an app
    # is made: importing the registry loads none of it (tests/test_layers.py)
    from pibake.api import DEFAULT_JOB_WORKERS as DEFAULT_WORKERS, JobRunner  # layer: the registry reaches orchestration only through pibake.api, when an app runs jobs
    from pibake.api import MANAGER_JOB_FUNCTIONS as MANAGER_FUNCTIONS  # layer: as above

    app = Flask(__name__, static_folder=None)
    reg = RegistryService(cluster_dir, **options)
    # The session key derives from the admin password: stable across gunicorn workers and restarts,
    # and every browser session ends when the admin password is rotated.
    app.config.update(
        SECRET_KEY=hmac.new(admin_password(cluster_dir).encode(), b"pibake-registry-session",
                            hashlib.sha256).hexdigest(),
        MAX_CONTENT_LENGTH=MAX_BODY,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=True,  # served over TLS only (gunicorn with the cluster's certificate)
        SESSION_COOKIE_NAME="pibake_session",
        JSON_SORT_KEYS=False,
    )
    if test_config:
        app.config.update(test_config)
    app.extensions["pibake_registry"] = reg
    app.extensions["pibake_jobs"] = JobRunner(cluster_dir, functions=MANAGER_FUNCTIONS if job_functions is None
                                              else job_functions,
                                              workers=job_workers or DEFAULT_WORKERS)

    app.register_blueprint(api.bp)
    app.register_blueprint(sensors_api.bp)
    app.register_blueprint(web.bp)
    mqtt.init_app(app)
    app.register_blueprint(sensors_web.bp)

    @app.errorhandler(HTTPException)
    def _http_error(err):
        if request.path.startswith("/api/"):
            return api.http_error_response(err)
        return err

    @app.errorhandler(Exception)
    def _unexpected(err):  # a bug: log it (no request data), answer without details
        LOG.exception("internal error on %s %s", request.method, request.path)
        return jsonify(error="internal error in the registry; see its log"), 500

    return app
