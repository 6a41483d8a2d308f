"""The registry's side of MQTT: each node's broker password.

``POST /api/v1/mqtt-credential`` (the node's own credential, HTTP Basic; accepted nodes only) makes a new
random password for the node's broker user (its hostname), writes its ``$7$`` hash into Mosquitto's password
file (``pibake.mqtt.update_password_file``: other users' lines are kept), makes a running Mosquitto re-read
it (SIGHUP) and answers with the password once: the registry keeps only the hash. A node asks again whenever
it has no password file (a new card, a re-enrolment), which replaces its old password. Removing a node (REST,
page or CLI: ``RegistryService.remove``) removes its broker user (``pibake.mqtt.revoke_node_user``).

Where the broker's files are on the manager: ``app.config["PIBAKE_MQTT_ETC_DIR"]`` (default
``/etc/mosquitto/pibake``) and ``app.config["PIBAKE_MQTT_PID_FILE"]`` (default Mosquitto's pid file).
"""

import logging

from flask import Blueprint, current_app, jsonify

from pibake import mqtt
from pibake.errors import RegistryError
from pibake.secrets import new_password
from pibake.registry.auth import basic_auth, registry

LOG = logging.getLogger(__name__)

bp = Blueprint("mqtt", __name__, url_prefix="/api/v1")


@bp.errorhandler(RegistryError)
def registry_error_response(err):
    return jsonify(error=err.message), err.status


def _paths(app=None):
    config = (app or current_app).config
    return config.get("PIBAKE_MQTT_ETC_DIR", mqtt.ETC_DIR), config.get("PIBAKE_MQTT_PID_FILE", mqtt.PID_FILE)


def issue_password(cluster, hostname, etc_dir=mqtt.ETC_DIR, pid_file=mqtt.PID_FILE):
    """A new broker password for node ``hostname`` of ``cluster`` (``pibake.model.Cluster``, e.g.
    ``RegistryService.cluster_config()``): its hash goes into the password file, the broker reloads.
    Returns (password, MqttSettings). RegistryError(404) when MQTT is off."""
    if not cluster.mqtt.enabled:
        raise RegistryError(404, "MQTT is not enabled on this cluster (cluster.yaml mqtt: enabled: true)")
    if not mqtt.valid_node_user(hostname):
        raise RegistryError(400, "this node's name cannot be an MQTT user name")
    password = new_password()
    mqtt.update_password_file(etc_dir, {hostname: mqtt.hash_password(password)})
    how = mqtt.reload_broker(pid_file)
    LOG.info("new MQTT password for %s (broker reload: %s)", hostname, how or "not running")
    return password, cluster.mqtt


@bp.post("/mqtt-credential")
@basic_auth.login_required(role="node")
def mqtt_credential():
    user = basic_auth.current_user()
    if user["status"] == "pending":
        raise RegistryError(403, f"{user['name']} is pending approval; an admin must accept it first")
    reg = registry()
    etc_dir, pid_file = _paths()
    cluster = reg.cluster_config()
    password, settings = issue_password(cluster, user["name"], etc_dir, pid_file)
    return jsonify(username=user["name"], password=password, host=cluster.manager, port=settings.port,
                   base=settings.base, discovery_prefix=settings.discovery_prefix)


def init_app(app):
    """Register the endpoint; tell the registry where the broker's files are (``PIBAKE_MQTT_*`` config)."""
    app.register_blueprint(bp)
    app.extensions["pibake_registry"].mqtt_paths = _paths(app)
