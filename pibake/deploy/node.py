"""What deploy puts on a worker: where the agent, its config and the CA go, which packages a role needs, and
which of those files a node lacks (pure functions of the cluster and the node's facts)."""

import hashlib
import json

from pibake.bake import seed as seed_module  # a module reference: bench/deploy swaps agent_source
from pibake.firstboot.agent import config_without_token
from pibake.layout import (  # noqa: F401 (ROLE_PACKAGES, CREDENTIAL_FILE, NODE_DIRS, TOKEN_FILE: pibake.deploy's names)
    AGENT_CONFIG,
    AGENT_PATH,
    APT_PROXY_CONF,
    APT_PROXY_DETECT,
    CA_PATH,
    CREDENTIAL_FILE,
    NODE_DIRS,
    ROLE_PACKAGES,
    SENSOR_AGENT_PATH,
    SENSOR_CONFIG,
    SENSOR_MQTT_PATH,
    SENSOR_UNIT,
    TIMESYNCD_DROPIN,
    TOKEN_FILE,
    cluster_role_packages,
)
from pibake.model import PlannedNode

# the node contract (paths, packages) is pibake/layout.py's; deploy adds which files it checks and ships
SENSOR_FILES = (SENSOR_AGENT_PATH, SENSOR_CONFIG, SENSOR_UNIT)  # the sensor agent, on every role as the seeds
REMOTE_PYTHON = "/usr/bin/python3"
AGENT_DEADLINE_S = 240  # how long the agent keeps retrying the registry (a busy manager restarts slurmctld)
WORKER_FACT_FILES = ((AGENT_PATH, AGENT_CONFIG, CA_PATH, TIMESYNCD_DROPIN) + SENSOR_FILES + (SENSOR_MQTT_PATH,)
                     + (APT_PROXY_DETECT, APT_PROXY_CONF))

VENV_PIBAKE = "/opt/pibake/bin/pibake"  # what the manager seed's pibake-install puts there
REMOTE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # as cloud-init's runcmd has

AFTER_WRITE = {
    TIMESYNCD_DROPIN: ["systemctl", "try-restart", "systemd-timesyncd"],
    SENSOR_AGENT_PATH: ["systemctl", "try-restart", "pibake-sensor.service"],
    SENSOR_CONFIG: ["systemctl", "try-restart", "pibake-sensor.service"],
    SENSOR_MQTT_PATH: ["systemctl", "try-restart", "pibake-sensor.service"],  # with mqtt: only
    # written last of the three: a new unit is loaded and started (it buffers until the agent has enrolled)
    SENSOR_UNIT: ["sh", "-c", "systemctl daemon-reload && systemctl enable --now pibake-sensor.service"],
}


def agent_source():
    """The first-boot agent's source, as the seeds ship it."""
    return seed_module.agent_source()


def agent_config(cluster, hostname, role="worker"):
    """The agent config deploy ships (no secret in it: the join token goes to its own file)."""
    return {
        "registry_url": cluster.registry_url,
        "ca_cert": CA_PATH,
        "hostname": hostname,
        "role": role,
        "manager": cluster.manager,
        "manager_ip": cluster.manager_ip,
        "credential_file": CREDENTIAL_FILE,
        "join_token_file": TOKEN_FILE,
        "scrub_paths": [],  # deploy never puts the token into a seed or cloud-init's files
        "deadline_s": AGENT_DEADLINE_S,
        "backoff_base_s": 1.0,
        "backoff_max_s": 10.0,
    }


def timesyncd_dropin(cluster):
    """systemd-timesyncd drop-in: time from the manager (the same file a worker's seed writes)."""
    # the seed's template renderer: one template for both paths
    return seed_module.render_template("timesyncd.conf.j2", servers=[cluster.manager_ip],
                               fallback=list(cluster.ntp_servers or ()))


def wanted_files(cluster, hostname, role, facts, agent_bytes, ca_bytes):
    """{path: (bytes, mode)} of what a node must have (pure): the agent, its config, the CA certificate,
    and on a systemd node the timesyncd drop-in (time from the manager) and the sensor agent with its
    settings and unit (the seed's files; nodes without systemd, like lab hosts, do not run it)."""
    config = agent_config(cluster, hostname, role)
    wanted = {
        AGENT_PATH: (agent_bytes, 0o755),
        AGENT_CONFIG: ((json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), 0o600),
        CA_PATH: (ca_bytes, 0o644),
    }
    wanted.update(_from_seed(seed_module.apt_cache_files(cluster, role)))
    if facts.get("systemd"):
        wanted[TIMESYNCD_DROPIN] = (timesyncd_dropin(cluster).encode(), 0o644)
        wanted.update(_from_seed(seed_module.sensor_files(cluster, PlannedNode(hostname, "", role))))
    return wanted


def _from_seed(entries):
    """{path: (bytes, mode)} of the seed's write_files ``entries`` (text files)."""
    return {e["path"]: (e["content"].encode(), int(e["permissions"], 8)) for e in entries}


def role_packages(cluster, role):
    """What a role's seed installs (pibake/layout.py), with the MQTT packages when cluster.yaml has mqtt: on."""
    return cluster_role_packages(cluster, role)


def missing_packages(role, installed, packages=None):
    """The role's packages (or ``packages``) that ``installed`` ({name: dpkg status}) does not list as
    installed."""
    return [p for p in (ROLE_PACKAGES[role] if packages is None else packages) if installed.get(p) != "installed"]


def files_to_ship(wanted, remote_sha256, equivalent=None):
    """Paths of ``wanted`` ({path: (bytes, mode)}) whose sha256 differs from the node's (pure).

    ``equivalent``: {path: set of other sha256 hex digests that count as right}, e.g. the manager's agent
    config as the agent rewrites it once it has enrolled (without the join token).
    A mode change alone is not visible in the facts' checksums: the installer on the node checks modes too
    whenever it runs; a file with the right content is left alone."""
    equivalent = equivalent or {}
    out = []
    for path, (data, _mode) in wanted.items():
        remote = remote_sha256.get(path)
        if remote != hashlib.sha256(data).hexdigest() and remote not in equivalent.get(path, ()):
            out.append(path)
    return out


def manager_config_equivalents(files):
    """{AGENT_CONFIG: {sha256}}: the manager's agent config as the agent leaves it after enrolling (the
    join_token key removed, rewritten with sorted keys), which counts as right (pure)."""
    if AGENT_CONFIG not in files:
        return {}
    try:
        config = json.loads(files[AGENT_CONFIG][0])
    except ValueError:
        return {}
    scrubbed = json.dumps(config_without_token(config), indent=2, sort_keys=True) + "\n"
    return {AGENT_CONFIG: {hashlib.sha256(scrubbed.encode()).hexdigest()}}


def manager_key_authorization(cluster, public_key):
    """The ``authorize`` entry of the files step (pure): the manager's ssh key for the cluster user, as the seeds
    write it (``pibake.bake.seed.manager_key_line``); an older line of the same key or key name is replaced."""
    _kind, blob, *comment = public_key.split()
    return {"user": cluster.user, "line": seed_module.manager_key_line(cluster, public_key), "blob": blob,
            "name": comment[-1] if comment else blob}
