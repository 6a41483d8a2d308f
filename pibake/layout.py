"""The node contract: where pibake puts things on a node and which Debian packages each role needs.

One home for both, read by the seed (bake/seed.py and its templates), deploy (pibake/deploy/node.py), the lab
and the tests. The agents on the nodes import nothing of pibake: they get these paths through their config
files. tests/test_layout.py holds the seed and deploy to the same packages and files per role.
"""

LIB_DIR = "/usr/local/lib/pibake"
ETC_DIR = "/etc/pibake"
SYSTEMD_DIR = "/etc/systemd/system"

AGENT_PATH = f"{LIB_DIR}/agent.py"
AGENT_CONFIG = f"{ETC_DIR}/agent.json"
CA_PATH = f"{ETC_DIR}/ca.crt"
TOKEN_FILE = f"{ETC_DIR}/join-token"
CREDENTIAL_FILE = f"{ETC_DIR}/node-credential"
TIMESYNCD_DROPIN = "/etc/systemd/timesyncd.conf.d/pibake.conf"  # workers and sensors: time from the manager

SENSOR_AGENT_PATH = f"{LIB_DIR}/sensor_agent.py"
SENSOR_MQTT_PATH = f"{LIB_DIR}/sensor_mqtt.py"
SENSOR_CONFIG = f"{ETC_DIR}/sensor.json"
SENSOR_UNIT = f"{SYSTEMD_DIR}/pibake-sensor.service"
SENSOR_BUFFER = "/var/lib/pibake/sensor-buffer.sqlite3"

NODE_DIRS = ((ETC_DIR, 0o700), (LIB_DIR, 0o755))  # secrets under /etc/pibake: root only

# What each role's first boot installs with apt, in install order. Reasons on the lines that need one.
ROLE_PACKAGES = {
    "worker": (
        "slurmd",
        "munge",
        "slurm-client",  # scontrol: the agent confirms that slurmctld has registered this node's slurmd
        "python3-psutil",  # the agent's facts
    ),
    "manager": (
        "slurmctld",
        "slurm-client",
        "munge",
        "chrony",  # the cluster's time server (Pis have no RTC; munge refuses 300 s of skew)
        "python3-venv",
        # pibake's own dependencies, from Debian (the wheel is installed into a venv with --no-deps)
        "python3-flask",
        "python3-flask-httpauth",
        "gunicorn",
        "python3-cryptography",
        "python3-click",
        "python3-jinja2",
        "python3-yaml",
        "python3-jsonschema",
        "python3-requests",
        "python3-psutil",
        "python3-clustershell",
        "python3-rich",
    ),
    "sensor": (
        "python3-psutil",
        # the sensor agent's driver (RPi.bme280) and bus; i2c-tools for `i2cdetect -y 1` when troubleshooting
        "python3-bme280",
        "python3-smbus2",
        "i2c-tools",
    ),
}
MQTT_PUBLISHER_PACKAGE = "python3-paho-mqtt"  # every node's sensor agent publishes when mqtt: is on
MQTT_BROKER_PACKAGE = "mosquitto"  # the manager runs the broker when mqtt: is on (docs/mqtt.md)

# apt_cache: true (docs/apt-cache.md): apt-cacher-ng on the manager; every other node's apt asks
# APT_PROXY_DETECT (named in APT_PROXY_CONF) which proxy to use, the manager's cache or DIRECT.
APT_CACHE_PACKAGE = "apt-cacher-ng"
APT_CACHE_PORT = 3142  # apt-cacher-ng's default port
APT_PROXY_DETECT = f"{LIB_DIR}/pibake-apt-proxy"
APT_PROXY_CONF = "/etc/apt/apt.conf.d/90pibake-proxy"


def role_packages(role, *, mqtt=False, apt_cache=False):
    """The Debian packages ``role``'s first boot installs; ``mqtt``: cluster.yaml has ``mqtt:`` enabled;
    ``apt_cache``: it has ``apt_cache: true``."""
    packages = list(ROLE_PACKAGES[role])
    if mqtt:
        # after psutil, where the publisher's library sat in the templates (the seed's order is kept)
        packages.insert(packages.index("python3-psutil") + 1, MQTT_PUBLISHER_PACKAGE)
        if role == "manager":
            packages.append(MQTT_BROKER_PACKAGE)
    if apt_cache and role == "manager":
        packages.append(APT_CACHE_PACKAGE)
    return tuple(packages)


def cluster_role_packages(cluster, role):
    """``role``'s packages with the options ``cluster`` (a pibake.model.Cluster) has on."""
    return role_packages(role, mqtt=cluster.mqtt.enabled, apt_cache=cluster.apt_cache)
