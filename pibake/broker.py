"""The MQTT broker on the manager, set up from the cluster directory (``pibake mqtt setup``).

The data and the file writing are ``pibake.mqtt``'s; this adds what lives above the core: the Tasmota plugs'
broker passwords from their stored switch credentials (``pibake.switches``), and the reload.
"""

import logging
import os
from pathlib import Path

from pibake import mqtt
from pibake.cluster import load_cluster
from pibake.switches import load_credentials

LOG = logging.getLogger(__name__)


def plug_passwords(cluster_dir, cluster):
    """{broker user: password} of the Tasmota plugs whose stored MQTT user is their broker user."""
    out = {}
    for user in mqtt.tasmota_topics(cluster.switches):
        creds = load_credentials(cluster_dir, user[len(mqtt.TASMOTA_USER_PREFIX):]) or {}
        if creds.get("mqtt_username") == user and creds.get("mqtt_password"):
            out[user] = creds["mqtt_password"]
    return out


def setup_broker(cluster_dir, *, etc_dir=mqtt.ETC_DIR, conf_file=mqtt.CONF_FILE, pid_file=mqtt.PID_FILE,
                 bind_address=None, reload=True):
    """Write Mosquitto's files for the cluster (idempotent) and make a running broker re-read them.
    Returns a JSON-able report (no secret in it)."""
    cluster = load_cluster(cluster_dir)
    plugs = plug_passwords(cluster_dir, cluster)
    files = mqtt.install_broker(cluster_dir, switch_passwords=plugs, etc_dir=etc_dir, conf_file=conf_file,
                                bind_address=bind_address)
    # Debian's mosquitto.conf writes a pid file: its directory comes from the systemd unit, so make it for a
    # broker started without systemd (a lab manager) too
    run_dir = Path(pid_file).parent
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        ids = mqtt.mosquitto_ids()
        if ids and os.geteuid() == 0:
            os.chown(run_dir, *ids)
    users = mqtt.parse_password_file((Path(etc_dir) / "passwd").read_text(encoding="utf-8"))
    return {
        "port": cluster.mqtt.port,
        "files": files,
        "admin_user": mqtt.ADMIN_USER,
        "plug_users": sorted(plugs),
        "plugs_without_password": sorted(set(mqtt.tasmota_topics(cluster.switches)) - set(plugs)),
        "node_users": sorted(u for u in users if mqtt.valid_node_user(u)),
        "reload": (mqtt.reload_broker(pid_file) or "not running") if reload else "skipped",
    }
