"""Render a node's cloud-init NoCloud seed (user-data, meta-data, network-config). Pure: data in, three texts out.

The role templates (templates/*.yaml.j2) get user values only through ``tojson``; the rendered YAML is parsed,
``write_files`` is added in Python and the whole is dumped again, so no YAML is pasted together from strings.
Every value is validated first (``validate_seed_inputs``). The node's paths and each role's packages come from
pibake/layout.py. What a seed installs, how runcmd starts the agent, and how the manager card's secrets are
scrubbed after first boot: docs/internals.md#seeds-pibakebakeseed.
"""

import base64
import importlib.resources
import ipaddress
import json
import logging
import os
import re
import uuid
from pathlib import Path

import jinja2
import yaml
from pibake.bake.golden import baked_packages
from pibake.bake.lint import lint_seed

from pibake import fields
from pibake.cluster import load_cluster
from pibake.errors import SeedError
from pibake.fields import show as _show
from pibake.fields import ssh_key_problem, valid_hostname
from pibake.files import atomic_write
from pibake.layout import (
    APT_CACHE_PORT,
    APT_PROXY_CONF,
    APT_PROXY_DETECT,
    AGENT_CONFIG,
    AGENT_PATH,
    CA_PATH,
    CREDENTIAL_FILE,
    LIB_DIR,
    SENSOR_AGENT_PATH,
    SENSOR_BUFFER,
    SENSOR_CONFIG,
    SENSOR_MQTT_PATH,
    SENSOR_UNIT,
    SYSTEMD_DIR,
    TIMESYNCD_DROPIN,
    cluster_role_packages,
)
from pibake.model import FAMILIES, ROLES, Seed
from pibake.mqtt import node_settings as mqtt_node_settings
from pibake.plan import record_plan, resolve_plan
from pibake.secrets import manager_bundle, seed_secrets

LOG = logging.getLogger(__name__)

# --------------------------------------------------------------------------- paths on the node
# (the node contract's paths and packages: pibake/layout.py)

BOOT_DIR = "/boot/firmware"  # Raspberry Pi OS trixie and Ubuntu 24.04 both mount the FAT boot partition here
SEED_FILE = f"{BOOT_DIR}/user-data"
WHEEL_GLOB = f"{BOOT_DIR}/pibake/pibake-*.whl"
MANAGER_ROOT = "/var/lib/pibake"
MANAGER_CLUSTER_DIR = f"{MANAGER_ROOT}/cluster"
AGENT_COMMAND = ["/usr/bin/python3", AGENT_PATH, "--config", AGENT_CONFIG]
SENSOR_COMMAND = ["/usr/bin/python3", SENSOR_AGENT_PATH, "--config", SENSOR_CONFIG]
I2C_BUS = 1  # the Pi's GPIO header I2C (pins 3 SDA, 5 SCL): /dev/i2c-1
# config.txt lines `pibake burn` makes sure of on the card's FAT partition, per role (pibake.bake.bootpart):
# the firmware switches I2C on at boot, no runtime raspi-config call needed
ROLE_BOOT_CONFIG = {"sensor": ("dtparam=i2c_arm=on",)}
REGISTRY_COMMAND = ["/opt/pibake/bin/pibake", "--cluster", MANAGER_CLUSTER_DIR, "registry", "serve"]
# With mqtt enabled (docs/mqtt.md): the broker's files from the cluster bundle, then Mosquitto (its Debian unit;
# without systemd the same program in the foreground, detached by pibake-start)
MQTT_SETUP_COMMAND = ["/opt/pibake/bin/pibake", "--cluster", MANAGER_CLUSTER_DIR, "mqtt", "setup"]
MOSQUITTO_COMMAND = ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"]
# The manager's switch loops (pibake.switches.loop): the automatic recovery policy, which logs in to the nodes
# with the manager's ssh identity (as the registry's jobs) and keeps the host keys it meets in the cluster
# directory (the unit cannot write root's home), and the sensor -> switch rules.
_PIBAKE = "/opt/pibake/bin/pibake"
SWITCH_LOOPS = {
    "auto": {
        "command": [_PIBAKE, "--cluster", MANAGER_CLUSTER_DIR, "switch", "auto",
                    "--identity", f"{MANAGER_CLUSTER_DIR}/secrets/manager-ssh.key",
                    "--known-hosts", f"{MANAGER_CLUSTER_DIR}/switches/known_hosts"],
        "description": "automatic recovery of hung nodes through their plugs (switches with auto_cycle)",
        "what": "Recovers a hung node (ssh and Slurm both find it down) by cycling its plug, within a limit per hour.",
        "needs": "switch with auto_cycle: true",
        "timeout_stop_s": 900,  # a recovery waits up to 600 s for the node to come back idle
    },
    "rules": {
        "command": [_PIBAKE, "--cluster", MANAGER_CLUSTER_DIR, "switch", "rules"],
        "description": "rules from sensor readings to switches (rules: in cluster.yaml)",
        "what": "Switches plugs from sensor readings (rules: in cluster.yaml), with hysteresis and minimum times.",
        "needs": "rules:",
        "timeout_stop_s": 120,
    },
}

SCRIPTS = {  # name in templates -> (path on the node, template)
    "start": (f"{LIB_DIR}/pibake-start", "pibake-start.sh.j2"),
    "hosts_entry": (f"{LIB_DIR}/pibake-hosts-entry", "hosts-entry.sh.j2"),
    "scrub": (f"{LIB_DIR}/pibake-scrub-seed", "scrub-seed.py.j2"),
    "install_pibake": (f"{LIB_DIR}/pibake-install", "install-pibake.sh.j2"),
}
ROLE_SCRIPTS = {
    "manager": ("start", "hosts_entry", "scrub", "install_pibake"),
    "worker": ("start", "hosts_entry", "scrub"),
    "sensor": ("start", "hosts_entry", "scrub"),
}
ROLE_GROUPS = {
    "manager": ["adm", "sudo"],
    "worker": ["adm", "sudo"],
    # cloud-init creates a group that does not exist yet (Ubuntu has no gpio/i2c/spi groups)
    "sensor": ["adm", "sudo", "dialout", "gpio", "i2c", "spi"],
}
# Modes of the manager bundle files on the manager (same as in the cluster directory; cluster.yaml may hold
# the Wi-Fi PSK, so it is private too).
BUNDLE_MODES = {
    "cluster.yaml": "0600",
    "secrets/ca.crt": "0444",
    "secrets/registry.crt": "0444",
    "secrets/manager-ssh.key.pub": "0444",
}
BUNDLE_DEFAULT_MODE = "0400"
PUBLIC_BUNDLE_FILES = ("secrets/ca.crt", "secrets/registry.crt", "secrets/manager-ssh.key.pub")

RENDERERS = {"raspios": "NetworkManager", "ubuntu": "networkd"}
# Raspberry Pi OS ships sshd disabled; Ubuntu 24.04 runs it through ssh.socket (starting ssh.service next to
# it would only fail on the busy port), so only Raspberry Pi OS gets `pibake-start ssh.service`.
LOGIN_UNITS = {"raspios": ["ssh.service"], "ubuntu": []}
WIRED_NIC = "eth0"  # the Pi's on-board Ethernet is eth0 on Raspberry Pi OS and on Ubuntu for Pi
WIFI_NIC = "wlan0"

def seed_packages(cluster, role, preinstalled=()):
    """What first boot must still install: the role's packages less those the image already holds (a golden
    image from ``pibake image bake``: ``pibake.bake.golden``)."""
    have = set(preinstalled)
    return [name for name in cluster_role_packages(cluster, role) if name not in have]


TOP_LEVEL_KEYS = {  # what each role's user-data holds, in order; tests hold the seed to exactly these
    "worker": ("hostname", "manage_etc_hosts", "users", "ssh_pwauth", "disable_root", "timezone", "locale",
               "package_update", "package_upgrade", "packages", "runcmd", "write_files"),
}
TOP_LEVEL_KEYS["manager"] = TOP_LEVEL_KEYS["worker"][:-3] + ("bootcmd",) + TOP_LEVEL_KEYS["worker"][-3:]
TOP_LEVEL_KEYS["sensor"] = TOP_LEVEL_KEYS["manager"]

HEADER = "#cloud-config\n"


# --------------------------------------------------------------------------- validation

# Checks of every value that reaches a seed file. cluster.yaml loading validates the same things with the same
# validators (pibake.fields); they run again here because render_seed takes any Cluster/PlannedNode, including
# ones built in code.
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_seed_inputs(cluster, node, seed_secrets, instance_id=None):
    """Check every value that will reach a seed file; raise SeedError listing every problem with its path.

    Error messages never contain a secret (join token, PSK, CA certificate).
    """
    problems = []

    def bad(path, message):
        problems.append(f"{path}: {message}")

    def check(path, field, value):
        """The field's one message (pibake.fields) for a bad value; True when it is valid."""
        problem = field.problem(value)
        if problem:
            bad(path, problem)
        return problem is None

    # node
    check("hostname", fields.HOSTNAME, node.hostname)
    if node.role not in ROLES:
        bad("role", f"{_show(node.role)} is not a role; choose one of {', '.join(ROLES)}")
    network = None
    if check("cluster.network", fields.NETWORK, cluster.network):
        network = ipaddress.IPv4Network(cluster.network, strict=True)
    if check("ip", fields.IPV4, node.ip) and network is not None and ipaddress.IPv4Address(node.ip) not in network:
        bad("ip", f"{node.ip} is outside the cluster network {network}")

    # the manager's seed must be the manager named in cluster.yaml (the registry certificate names it)
    if node.role == "manager" and (node.hostname, node.ip) != (cluster.manager, cluster.manager_ip):
        bad("role", f"the manager seed is for {cluster.manager} ({cluster.manager_ip}) as cluster.yaml says, not "
                    f"{_show(node.hostname)} ({_show(node.ip)}); change manager/manager_ip there first")
    elif node.role != "manager" and node.hostname == cluster.manager:
        bad("hostname", f"{node.hostname} is the cluster's manager; render it with role manager")
    elif node.role != "manager" and node.ip == cluster.manager_ip:
        bad("ip", f"{node.ip} is the manager's address")

    # cluster
    check("cluster.manager", fields.HOSTNAME, cluster.manager)
    check("cluster.manager_ip", fields.IPV4, cluster.manager_ip)
    if cluster.gateway is not None:
        check("cluster.gateway", fields.IPV4, cluster.gateway)
    for i, server in enumerate(cluster.dns or ()):
        check(f"cluster.dns[{i}]", fields.IPV4, server)
    for i, server in enumerate(cluster.ntp_servers or ()):
        check(f"cluster.ntp_servers[{i}]", fields.HOST, server)
    check("cluster.user", fields.USERNAME, cluster.user)
    for i, key in enumerate(cluster.ssh_keys or ()):
        problem = ssh_key_problem(key)
        if problem:
            bad(f"cluster.ssh_keys[{i}]", f"{_show(key, 40)} {problem}")
    check("cluster.timezone", fields.TIMEZONE, cluster.timezone)
    check("cluster.locale", fields.LOCALE, cluster.locale)
    if cluster.family not in FAMILIES:
        bad("cluster.family", f"{_show(cluster.family)} is not an image family; choose one of {', '.join(FAMILIES)}")
    if not isinstance(cluster.registry_port, int) or isinstance(cluster.registry_port, bool) \
            or not 1 <= cluster.registry_port <= 65535:
        bad("cluster.registry_port", f"{_show(cluster.registry_port)} is not a TCP port (1-65535)")
    wifi = cluster.wifi
    if wifi is not None:
        check("cluster.wifi.country", fields.COUNTRY, wifi.country)
        check("cluster.wifi.ssid", fields.SSID, wifi.ssid)
        check("cluster.wifi.psk", fields.PSK, wifi.psk)

    # secrets: checked for shape only, never echoed
    token = getattr(seed_secrets, "join_token", None)
    if not isinstance(token, str) or not token.startswith("K10") or not token.isprintable() or " " in token:
        bad("join_token", "is missing or malformed (run `pibake token rotate`)")
    manager_key = getattr(seed_secrets, "manager_ssh_key", None)
    if manager_key is not None and ssh_key_problem(manager_key):
        bad("manager_ssh_key", "is not one ssh public key line (check secrets/manager-ssh.key.pub)")
    pem = getattr(seed_secrets, "ca_cert_pem", None)
    if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
        bad("ca_cert_pem", "is not a PEM certificate (check secrets/ca.crt)")
    if instance_id is not None and (not isinstance(instance_id, str) or not INSTANCE_ID_RE.fullmatch(instance_id)):
        bad("instance_id", f"{_show(instance_id)} is not an instance id: 1-128 of A-Z a-z 0-9 . _ -")

    if problems:
        where = node.hostname if valid_hostname(node.hostname) else "seed"
        raise SeedError(f"{where}: cannot render: " + "; ".join(problems))


# --------------------------------------------------------------------------- templates + YAML


_ENV = None
_JSON_ESCAPE = re.compile(r"\\(?:u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|.)", re.IGNORECASE)


def yaml_tojson(value):
    """``value`` as JSON that YAML reads back exactly: the ``tojson`` filter of pibake's templates.

    JSON is YAML, with one exception: JSON spells a character beyond U+FFFF as a surrogate pair
    (``\\ud83d\\ude00``) and YAML reads those as two lone surrogates. Such pairs become YAML's ``\\UXXXXXXXX``.
    The output is ASCII only, so no raw line separator (U+2028, NEL) can reach the YAML parser.
    """

    def fix(match):
        if match.group(1) is None:
            return match.group(0)
        high, low = int(match.group(1), 16), int(match.group(2), 16)
        return "\\U%08X" % (0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))

    return _JSON_ESCAPE.sub(fix, json.dumps(value, ensure_ascii=True))


def template_env():
    """The Jinja2 environment of pibake's templates (package pibake.templates)."""
    global _ENV  # pylint: disable=global-statement
    if _ENV is None:
        _ENV = jinja2.Environment(
            loader=jinja2.PackageLoader("pibake.templates", ""),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        _ENV.filters["tojson"] = yaml_tojson
    return _ENV


def render_template(name, **context):
    return template_env().get_template(name).render(**context)


class _SeedDumper(yaml.SafeDumper):
    """safe_dump, with file contents (multi-line strings) as readable literal blocks where YAML allows."""


def _represent_str(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_SeedDumper.add_representer(str, _represent_str)


def dump_yaml(data):
    """YAML text for ``data`` (plain dicts/lists/str/int/bool only: a SafeDumper refuses anything else)."""
    return yaml.dump(data, Dumper=_SeedDumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=4096)


def agent_source():
    """The agent's source file, shipped verbatim to every node."""
    return importlib.resources.files("pibake.firstboot").joinpath("agent.py").read_text(encoding="utf-8")


# cloud-init (22.4 and 25.1 alike) raises KeyError on per-interface `nameservers` under netplan `wifis`
# (network_state._handle_individual_nameserver: wifis are not in its interface table), which would break the
# whole network config on the Pi. So a sensor on Wi-Fi gets its DNS servers from this bootcmd instead, written
# where the image's network stack reads them, every boot (bootcmd runs before write_files and before packages
# are installed, which needs DNS). $PIBAKE_ROOT is for tests.
WIFI_DNS_SCRIPT = r"""set -eu
family=$1
shift
[ $# -gt 0 ] || exit 0
root=${PIBAKE_ROOT:-}
note="# written by pibake's seed (sensor on Wi-Fi): DNS for the static wlan0 address"
if [ "$family" = raspios ]; then
    mkdir -p "$root/etc/NetworkManager/conf.d"
    servers=$(printf '%s,' "$@")
    printf '%s\n[global-dns-domain-*]\nservers=%s\n' "$note" "${servers%,}" \
        >"$root/etc/NetworkManager/conf.d/90-pibake-dns.conf"
    nmcli general reload conf >/dev/null 2>&1 || true
else
    mkdir -p "$root/etc/systemd/resolved.conf.d"
    printf '%s\n[Resolve]\nDNS=%s\n' "$note" "$*" >"$root/etc/systemd/resolved.conf.d/90-pibake-dns.conf"
    systemctl try-reload-or-restart systemd-resolved.service >/dev/null 2>&1 || true
fi
"""


def wifi_dns_command(cluster, node):
    """The sensor seed's bootcmd entry: DNS servers for a static wlan0 (none when the node is wired)."""
    servers = list(cluster.dns or ()) if node.role == "sensor" and cluster.wifi is not None else []
    return ["sh", "-c", WIFI_DNS_SCRIPT, "pibake-wifi-dns", cluster.family, *servers]


def firstboot_source(name):
    """A file of pibake.firstboot (the node-side programs), shipped verbatim."""
    return importlib.resources.files("pibake.firstboot").joinpath(name).read_text(encoding="utf-8")


def sensor_agent_source():
    """The sensor agent's source file, shipped verbatim to every node."""
    return firstboot_source("sensor_agent.py")


def sensor_settings(cluster, node):
    """The sensor agent's settings (written to /etc/pibake/sensor.json; keys: firstboot/sensor_agent.py DEFAULTS).

    Every role reports its SoC and Wi-Fi; only a sensor node reads the I2C bus. The user tunes the interval,
    offsets and place label in that file on the node (or `pibake sensors mark` for the place).
    """
    return {
        "interval_s": 60,
        "offsets": {},
        "bus": I2C_BUS if node.role == "sensor" else None,
        "address": None,
        "buffer": SENSOR_BUFFER,
        "buffer_max": 100000,
        "place": None,
        "wifi_interface": WIFI_NIC,
        "scan_every_s": 300,
        "mqtt": mqtt_node_settings(cluster, node.hostname),
        "sim_bus": None,
        "agent_config": AGENT_CONFIG,
    }


def sensor_files(cluster, node):
    """The sensor agent's files on ``node`` (write_files entries: path, owner, permissions, content), for the seed
    and for anything else that installs the agent (deploy): the agent, its settings, its unit, and on a sensor
    node the i2c-dev module load. Start it with ``pibake-start pibake-sensor.service -- SENSOR_COMMAND``."""
    files = [
        _text_file(SENSOR_AGENT_PATH, sensor_agent_source(), "0755"),
        _text_file(SENSOR_CONFIG, json.dumps(sensor_settings(cluster, node), indent=2) + "\n", "0600"),
        _text_file(SENSOR_UNIT,
                   render_template("pibake-sensor.service.j2", sensor_command=SENSOR_COMMAND), "0644"),
    ]
    if cluster.mqtt.enabled:  # the publisher the agent imports from its own directory (docs/mqtt.md)
        files.append(_text_file(SENSOR_MQTT_PATH, firstboot_source("sensor_mqtt.py"), "0644"))
    if node.role == "sensor":
        files.append(_text_file("/etc/modules-load.d/pibake-i2c.conf",
                                "# written by pibake's seed: /dev/i2c-N for the sensor agent\ni2c-dev\n", "0644"))
    return files


def _text_file(path, content, permissions):
    return {"path": path, "owner": "root:root", "permissions": permissions, "content": content}


def _binary_file(path, data, permissions):
    return {"path": path, "owner": "root:root", "permissions": permissions, "encoding": "b64",
            "content": base64.b64encode(data).decode("ascii")}


def agent_config(cluster, node):
    """The agent's config (written to /etc/pibake/agent.json): see firstboot/agent.py."""
    return {
        "registry_url": cluster.registry_url,
        "join_token": None,  # filled in by the caller: kept out of anything that might be logged
        "ca_cert": CA_PATH,
        "hostname": node.hostname,
        "role": node.role,
        "manager": cluster.manager,
        "manager_ip": cluster.manager_ip,
        "credential_file": CREDENTIAL_FILE,
        "boot_dir": BOOT_DIR,
    }


def secret_paths(role, bundle_paths=()):
    """Paths whose write_files entries pibake-scrub-seed removes from the card after first boot."""
    paths = [AGENT_CONFIG]
    if role == "manager":
        paths += [f"{MANAGER_CLUSTER_DIR}/{rel}" for rel in bundle_paths if rel not in PUBLIC_BUNDLE_FILES]
    return paths


def manager_key_line(cluster, public_key):
    """The authorized_keys line of the manager's ssh key on a node: usable only from the manager's IP, and
    ``restrict`` (no port, agent or X11 forwarding, no pty, no ~/.ssh/rc): the registry's verify and deploy jobs
    run commands over plain sessions and need nothing else."""
    return f'from="{cluster.manager_ip}",restrict {public_key}'


def authorized_keys(cluster, node, seed_secrets):
    """The cluster user's ssh keys on ``node``: cluster.yaml's ``ssh_keys``, and on every node but the manager
    itself the manager's key (``manager_key_line``), so the registry's jobs reach the nodes."""
    keys = list(cluster.ssh_keys or ())
    manager_key = getattr(seed_secrets, "manager_ssh_key", None)
    if manager_key and node.role != "manager":
        keys.append(manager_key_line(cluster, manager_key))
    return keys


def apt_cache_files(cluster, role):
    """With ``apt_cache: true``, a node's apt asks the manager's apt-cacher-ng first (docs/apt-cache.md):
    the write_files entries of the proxy-detect program and the apt.conf line naming it; none for the manager
    (it runs the cache) or without apt_cache."""
    if not cluster.apt_cache or role == "manager":
        return []
    detect = render_template("pibake-apt-proxy.sh.j2", manager_ip=cluster.manager_ip, port=APT_CACHE_PORT)
    return [_text_file(APT_PROXY_DETECT, detect, "0755"),
            _text_file(APT_PROXY_CONF, render_template("apt-proxy.conf.j2", detect=APT_PROXY_DETECT), "0644")]


def _write_files(cluster, node, seed_secrets, bundle):
    config = agent_config(cluster, node)
    config["join_token"] = seed_secrets.join_token
    files = [
        _text_file(AGENT_PATH, agent_source(), "0755"),
        _text_file(AGENT_CONFIG, json.dumps(config, indent=2) + "\n", "0600"),
        _text_file(CA_PATH, seed_secrets.ca_cert_pem, "0644"),
        _text_file(f"{SYSTEMD_DIR}/pibake-agent.service",
                   render_template("pibake-agent.service.j2", agent_path=AGENT_PATH, agent_config=AGENT_CONFIG),
                   "0644"),
    ]
    files += sensor_files(cluster, node)
    files += apt_cache_files(cluster, node.role)
    for name in ROLE_SCRIPTS[node.role]:
        path, template = SCRIPTS[name]
        files.append(_text_file(path, render_template(template), "0755"))
    if node.role == "manager":
        servers = list(cluster.ntp_servers or ())
        files.append(_text_file("/etc/chrony/conf.d/pibake.conf",
                                render_template("chrony.conf.j2", network=cluster.network, servers=servers), "0644"))
        files.append(_text_file(f"{SYSTEMD_DIR}/pibake-registry.service",
                                render_template("pibake-registry.service.j2", registry_command=REGISTRY_COMMAND),
                                "0644"))
        for loop, unit in SWITCH_LOOPS.items():
            files.append(_text_file(f"{SYSTEMD_DIR}/pibake-switch-{loop}.service",
                                    render_template("pibake-switch.service.j2", switch_loop=loop,
                                                    cluster_dir=MANAGER_CLUSTER_DIR, **unit), "0644"))
        for rel in sorted(bundle):
            files.append(_binary_file(f"{MANAGER_CLUSTER_DIR}/{rel}", bundle[rel],
                                      BUNDLE_MODES.get(rel, BUNDLE_DEFAULT_MODE)))
    else:
        files.append(_text_file(TIMESYNCD_DROPIN,
                                render_template("timesyncd.conf.j2", servers=[cluster.manager_ip],
                                        fallback=list(cluster.ntp_servers or ())), "0644"))
    return files


def render_user_data(cluster, node, seed_secrets, bundle=None, preinstalled=()):
    """The #cloud-config text for ``node``'s role. ``preinstalled``: packages the image already holds (a
    baked image): they are left out, and with nothing left to install so are ``packages`` and the
    ``apt-get update`` of ``package_update``: first boot runs no apt at all."""
    bundle = bundle or {}
    packages = seed_packages(cluster, node.role, preinstalled)
    context = {
        "packages": packages,
        "cluster": cluster,
        "node": node,
        "user_groups": ROLE_GROUPS[node.role],
        "authorized_keys": authorized_keys(cluster, node, seed_secrets),
        "login_units": LOGIN_UNITS[cluster.family],
        "scripts": {name: path for name, (path, _) in SCRIPTS.items()},
        "seed_file": SEED_FILE,
        "secret_paths": secret_paths(node.role, bundle),
        "agent_command": AGENT_COMMAND,
        "sensor_command": SENSOR_COMMAND,
        "wifi_dns_command": wifi_dns_command(cluster, node),
        "registry_command": REGISTRY_COMMAND,
        "switch_loops": {loop: unit["command"] for loop, unit in SWITCH_LOOPS.items()},
        "mqtt_enabled": node.role == "manager" and cluster.mqtt.enabled,
        "mqtt_setup_command": MQTT_SETUP_COMMAND,
        "mosquitto_command": MOSQUITTO_COMMAND,
        "wheel_glob": WHEEL_GLOB,
        "manager_root": MANAGER_ROOT,
        "manager_cluster_dir": MANAGER_CLUSTER_DIR,
    }
    config = yaml.safe_load(render_template(f"{node.role}.yaml.j2", **context))
    if not isinstance(config, dict) or "write_files" in config:
        raise AssertionError(f"template {node.role}.yaml.j2 must be a mapping without write_files")
    if not packages:
        config["package_update"] = False
        del config["packages"]
    config["write_files"] = _write_files(cluster, node, seed_secrets, bundle)
    comment = (f"# pibake seed, role {node.role}: generated by `pibake render` (pibake.bake.seed); "
               "re-render rather than edit.\n")
    return HEADER + comment + dump_yaml(config)


def render_meta_data(node, instance_id):
    return dump_yaml({"instance-id": instance_id, "local-hostname": node.hostname})


def network_config_data(cluster, node):
    """The netplan v2 network config (a dict) for ``node``."""
    network = ipaddress.IPv4Network(cluster.network)
    wired = {"dhcp4": False, "dhcp6": False, "addresses": [f"{node.ip}/{network.prefixlen}"]}
    if cluster.gateway:
        # 0.0.0.0/0 rather than `default`: netplan takes both, cloud-init before 23.x only the former
        wired["routes"] = [{"to": "0.0.0.0/0", "via": cluster.gateway}]
    if cluster.dns:
        wired["nameservers"] = {"addresses": list(cluster.dns)}
    net = {"version": 2, "renderer": RENDERERS[cluster.family], "ethernets": {WIRED_NIC: wired}}
    if cluster.wifi is not None and node.role == "sensor":
        # a sensor node is a Wi-Fi-only board (Pi Zero W / Zero 2 W): its planned address goes on wlan0
        del net["ethernets"]
        wired.pop("nameservers", None)  # cloud-init cannot take them here: see WIFI_DNS_SCRIPT
        net["wifis"] = {
            WIFI_NIC: {
                **wired,
                # without a regulatory domain Raspberry Pi OS keeps the Wi-Fi radio blocked (rfkill)
                "regulatory-domain": fields.COUNTRY.normalise(cluster.wifi.country),
                "access-points": {cluster.wifi.ssid: {"password": fields.PSK.normalise(cluster.wifi.psk)}},
            }
        }
    elif cluster.wifi is not None:
        wired["optional"] = True  # boot does not wait for a cable that may not be plugged in
        net["wifis"] = {
            WIFI_NIC: {
                "dhcp4": True,
                "optional": True,
                # without a regulatory domain Raspberry Pi OS keeps the Wi-Fi radio blocked (rfkill)
                "regulatory-domain": fields.COUNTRY.normalise(cluster.wifi.country),
                "access-points": {cluster.wifi.ssid: {"password": fields.PSK.normalise(cluster.wifi.psk)}},
            }
        }
    return {"network": net}


def render_network_config(cluster, node):
    return "# pibake network-config (netplan v2), generated by `pibake render`\n" + dump_yaml(
        network_config_data(cluster, node))


def new_instance_id():
    return f"pibake-{uuid.uuid4()}"


def render_seed(cluster, node, seed_secrets, *, instance_id=None, manager_bundle=None, preinstalled=()):
    """Return a ``pibake.model.Seed`` for ``node`` (a PlannedNode) in ``cluster``. Pure.

    ``seed_secrets`` is a ``SeedSecrets`` (join token + CA cert). A manager's seed also needs
    ``manager_bundle`` ({relative path: bytes}, from ``pibake.secrets.manager_bundle``). ``instance_id``
    defaults to a fresh ``pibake-<uuid4>``, so every render is a new cloud-init instance.
    ``preinstalled``: packages the image already holds (``render_user_data``).
    Raises SeedError (naming every bad value, never a secret) when an input cannot go into a seed.
    """
    validate_seed_inputs(cluster, node, seed_secrets, instance_id)
    if node.role == "manager":
        if not manager_bundle:
            raise SeedError(f"{node.hostname}: a manager seed needs the cluster bundle "
                            "(pibake.secrets.manager_bundle(cluster_dir))")
        bad = [rel for rel in manager_bundle if not _bundle_path_ok(rel)]
        if bad:
            raise SeedError(f"{node.hostname}: bundle paths must be relative paths inside the cluster "
                            f"directory: {', '.join(_show(b) for b in bad)}")
    elif manager_bundle:
        raise SeedError(f"{node.hostname}: only the manager's seed may carry the cluster bundle "
                        f"(role is {node.role})")
    if instance_id is None:
        instance_id = new_instance_id()
    LOG.debug("rendering %s seed for %s (%s)", node.role, node.hostname, instance_id)
    return Seed(
        user_data=render_user_data(cluster, node, seed_secrets, manager_bundle, preinstalled),
        meta_data=render_meta_data(node, instance_id),
        network_config=render_network_config(cluster, node),
        instance_id=instance_id,
    )


def _bundle_path_ok(rel):
    return (isinstance(rel, str) and re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", rel) is not None
            and ".." not in rel.split("/"))


# --------------------------------------------------------------------------- I/O: render + lint + write


def render_checked(cluster, cluster_dir, nodes, *, family, instance_ids=None, baked=None):
    """Render and lint the seed of every node in ``nodes`` with the cluster's secrets.

    ``baked``: the bake marker of the image (``pibake.bake.golden.read_marker``); nodes of its role get seeds
    without the packages it holds. Returns [(node, seed, LintReport)]. Raises SeedError naming each failing host when any seed has lint
    errors: callers write nothing unless every seed passed. Used by ``render_seeds`` and by burn/reseed.
    """
    secrets = seed_secrets(cluster_dir)
    bundle = manager_bundle(cluster_dir) if any(n.role == "manager" for n in nodes) else None
    rendered, failures = [], []
    for i, node in enumerate(nodes):
        iid = instance_ids[i] if instance_ids else None
        seed = render_seed(cluster, node, secrets, instance_id=iid,
                           manager_bundle=bundle if node.role == "manager" else None,
                           preinstalled=baked_packages(baked, node.role))
        report = lint_seed(seed, hostname=node.hostname, family=family)
        if report.errors:
            more = len(report.errors) - 1
            failures.append(f"{node.hostname}: {report.errors[0]}" + (f" (and {more} more)" if more else ""))
        rendered.append((node, seed, report))
    if failures:
        raise SeedError("seed lint failed, nothing written: " + "; ".join(failures))
    return rendered


def render_seeds(cluster_dir, out_dir, *, hostnames=None, ips=None, role=None, inventory=None,
                 instance_ids=None, record=True):
    """Plan, render and lint the seeds of one or more nodes, then write them to ``out_dir/<hostname>/``.

    Nodes come from ``hostnames`` + ``ips`` (hostlists such as ``red[01-03]`` / ``10.1.1.[11-13]``) or from
    a cloudmesh ``inventory`` file (``pibake.plan.resolve_plan``). Every seed is linted before anything is
    written: one bad seed and nothing is written (SeedError naming the host and the key). Then the plan is
    recorded in the cluster's plan.yaml (``record=False`` skips that) and the seeds are written: files 0600
    (they carry the join token; the manager's also the cluster's secrets) in 0700 directories, each file
    atomically. Returns a JSON-able list, one dict per node: hostname, ip, role, instance_id, paths,
    warnings. Nothing secret is in it.
    """
    cluster = load_cluster(cluster_dir)
    if inventory is None and not hostnames and not ips:
        raise SeedError("say which nodes: --hostname HOSTLIST and --ip IPLIST, or --inventory FILE")
    nodes = resolve_plan(cluster, hostnames=hostnames, ips=ips, role=role, inventory=inventory)
    if instance_ids is not None and len(instance_ids) != len(nodes):
        raise SeedError(f"{len(instance_ids)} instance ids given for {len(nodes)} nodes")
    rendered = render_checked(cluster, cluster_dir, nodes, family=cluster.family, instance_ids=instance_ids)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SeedError(f"--out {out}: exists and is not a directory")
    if record:
        record_plan(cluster_dir, nodes)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for node, seed, report in rendered:
        host_dir = out / node.hostname
        host_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(host_dir, 0o700)
        paths = {}
        for name, text in seed.files().items():
            atomic_write(host_dir / name, text, 0o600)
            paths[name] = str(host_dir / name)
        LOG.info("wrote the %s seed of %s to %s", node.role, node.hostname, host_dir)
        results.append({
            "hostname": node.hostname,
            "ip": node.ip,
            "role": node.role,
            "instance_id": seed.instance_id,
            "paths": paths,
            "warnings": [str(w) for w in report.warnings],
        })
    return results
