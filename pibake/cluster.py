"""cluster.yaml: create, load, validate.

One JSON schema (``CLUSTER_SCHEMA``) describes the file; ``validate_cluster_data`` adds the
checks a schema cannot express (addresses inside the network, real time zones, ssh key
blobs, ...). Every problem is reported at once, each with its path, e.g.
``cluster.yaml: network: 10.1.1.0/33 is not a network; dns[1]: ...``.

``init_cluster`` writes a commented, human-editable cluster.yaml (values reach YAML only
through ``yaml.safe_dump`` of dicts) and the secrets (``pibake.secrets.ensure_secrets``).
It never overwrites secrets unless asked to rotate them, and never silently replaces a
cluster.yaml that says something else than what it was asked for.
"""

import functools
import ipaddress
import logging
import os
import pwd
import re
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from pibake import fields
from pibake import secrets as _secrets
from pibake.errors import ConfigError, SecretsError
from pibake.fields import ssh_key_problem, valid_hostname
from pibake.files import atomic_write
from pibake.model import BOARDS, FAMILIES, SWITCH_DRIVERS, Cluster, MqttSettings, SwitchConfig, Wifi
from pibake.sensors_model import SETTINGS_SCHEMA as SENSOR_SETTINGS_SCHEMA, settings_problems as sensor_settings_problems
from pibake.rules_model import RULES_SCHEMA, rules_problems

LOG = logging.getLogger(__name__)

CLUSTER_FILE = "cluster.yaml"
BACKUP_FILE = "cluster.yaml.bak"
DOC_HINT = "see docs/cluster-yaml.md"

# Images pibake knows by name, with their family: the shipped catalog (bake/catalog.yaml, read
# by pibake.bake.images) is the truth; this table is only the fallback when it cannot be read.
# Anything else must be a path to a local image file together with an explicit ``family``.
IMAGE_CATALOG = {
    "raspios-trixie-lite-arm64": "raspios",
    "ubuntu-24.04-server-arm64-raspi": "ubuntu",
}
DEFAULT_IMAGE = "raspios-trixie-lite-arm64"
IMAGE_SUFFIXES = (".img", ".img.xz", ".img.gz", ".img.zst", ".img.bz2", ".zip", ".raw")

DEFAULT_USER = "pi"
DEFAULT_LOCALE = "C.UTF-8"
DEFAULT_REGISTRY_PORT = 8443

# The order keys are written in, and their comments in the generated file.
_KEY_DOCS = {
    "name": "Cluster name: used as Slurm's ClusterName and in the CA's name. Lower case, no dots.",
    "manager": "Hostname of the manager (runs slurmctld, munge and the pibake registry).",
    "manager_ip": "Static IPv4 address of the manager; must lie inside `network`.",
    "network": "The cluster's IPv4 network in CIDR form. Every node's IP must lie inside it.",
    "gateway": "Default route for the nodes (your home router). Inside `network`.",
    "dns": "DNS servers the nodes use (a list of IP addresses).",
    "user": "The login user created on every node (ssh keys only, no password login).",
    "ssh_keys": "ssh public keys allowed to log in as `user` (one authorized_keys line each).",
    "timezone": "IANA time zone of the nodes, e.g. Europe/Berlin or Etc/UTC.",
    "locale": "System locale of the nodes, e.g. C.UTF-8 or en_US.UTF-8.",
    "wifi": (
        "Optional Wi-Fi: ISO 3166 country code, SSID and the WPA PSK (64 hex digits, derived from the\n"
        "passphrase by `pibake init --wifi-ssid ...`; the passphrase itself is never stored)."
    ),
    "image": (
        "OS image: a catalog name (see `pibake image list`, e.g. raspios-trixie-lite-arm64 or\n"
        "ubuntu-24.04-server-arm64-raspi) or a path to a local image file (then `family` is required)."
    ),
    "family": "Image family: raspios or ubuntu. Implied by a catalog image; required for a local file.",
    "ntp_servers": "Optional NTP servers (names or IPs). Empty: the OS defaults. Pis have no RTC.",
    "registry_port": "TCP port of the pibake registry (HTTPS) on the manager.",
    "registry": (
        "Optional registry settings: require_approval (new nodes wait for an admin), slurm_conf (path),\n"
        "slurm_apply (auto|systemd|service|direct|none), slurm_settings (slurm.conf overrides),\n"
        "slurm_state (ask sinfo), apply_timeout (seconds). See docs/registry.md."
    ),
    "switches": (
        "Optional smart plugs/relays pibake may switch: name, driver (kasa|shelly|tasmota), address,\n"
        "node or thing (what it powers), auto_cycle. Credentials live in secrets/. See docs/switches.md."
    ),
    "mqtt": (
        "Optional MQTT broker (Mosquitto) on the manager for sensor nodes and Home Assistant: enabled,\n"
        "port (8883, TLS), discovery_prefix (homeassistant), base (pibake). See docs/mqtt.md."
    ),
    "sensors": (
        "Optional sensor history settings: raw_days, hourly_days, offline_after_s, pass_every_s and\n"
        "thresholds per node (or *) and metric ({min, max}). See docs/sensors.md."
    ),
    "apt_cache": (
        "true: the manager runs apt-cacher-ng and the other nodes' first-boot apt fetches through it, so each\n"
        "package crosses your internet link once for the whole cluster (direct while it does not answer).\n"
        "See docs/apt-cache.md."
    ),
    "nodes": (
        "Optional per-node settings by hostname: board (zero, zero-w, zero2-w, pi3, pi4, pi5), which picks\n"
        "the image `pibake burn` writes when --board is not given. See docs/cluster-yaml.md."
    ),
    "rules": (
        "Optional rules from a sensor reading to a switch: name, sensor, metric, switch, on_above +\n"
        "off_below (or on_below + off_above), min_on_s, min_off_s, max_age_s. See docs/switches.md."
    ),
}
_WIFI_EXAMPLE = """\
# wifi:
#   country: DE
#   ssid: MyNetwork
#   psk: <64 hex digits, written by pibake init --wifi-ssid MyNetwork --wifi-country DE>
"""

_IPV4 = {"type": "string"}  # the address itself is checked by validate_cluster_data (pibake.fields)

CLUSTER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pibake cluster.yaml",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "manager", "manager_ip", "network"],
    "properties": {
        "name": {"type": "string"},  # these values' rules: pibake.fields (validate_cluster_data)
        "manager": {"type": "string"},
        "manager_ip": _IPV4,
        "network": {"type": "string"},
        "gateway": {"type": ["string", "null"]},
        "dns": {"type": "array", "items": _IPV4, "maxItems": 3},
        "user": {"type": "string"},
        "ssh_keys": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 16384}},
        "timezone": {"type": "string"},
        "locale": {"type": "string"},
        "wifi": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "required": ["country", "ssid", "psk"],
            "properties": {
                "country": {"type": "string"},
                "ssid": {"type": "string"},
                "psk": {"type": "string"},
            },
        },
        "image": {"type": "string", "minLength": 1, "maxLength": 4096},
        "family": {"enum": list(FAMILIES)},
        "ntp_servers": {"type": "array", "items": {"type": "string"}},
        "apt_cache": {"type": "boolean"},
        "registry_port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "registry": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "require_approval": {"type": "boolean"},
                "slurm_conf": {"type": "string", "minLength": 1, "maxLength": 4096},
                "slurm_apply": {"enum": ["auto", "systemd", "service", "direct", "none"]},
                "slurm_settings": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "integer"]},
                },
                "slurm_state": {"type": "boolean"},
                "apply_timeout": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "switches": {
            "type": ["array", "null"],
            "maxItems": 64,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "driver", "address"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 63},
                    "driver": {"enum": list(SWITCH_DRIVERS)},
                    "address": {"type": "string", "minLength": 1, "maxLength": 259},
                    "channel": {"type": "integer", "minimum": 0, "maximum": 31},
                    "node": {"type": "string", "minLength": 1, "maxLength": 63},
                    "thing": {"type": "string", "minLength": 1, "maxLength": 80},
                    "auto_cycle": {"type": "boolean"},
                    "mqtt_broker": {"type": "string", "minLength": 1, "maxLength": 259},
                    "mqtt_topic": {"type": "string", "minLength": 1, "maxLength": 100},
                    "mqtt_tls": {"type": "boolean"},
                    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 120},
                },
            },
        },
        "mqtt": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "discovery_prefix": {"type": "string", "minLength": 1, "maxLength": 100},
                "base": {"type": "string", "minLength": 1, "maxLength": 100},
            },
        },
        "sensors": SENSOR_SETTINGS_SCHEMA,
        "rules": RULES_SCHEMA,
        "nodes": {
            "type": ["object", "null"],
            "maxProperties": 1024,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"board": {"enum": list(BOARDS)}},
            },
        },
    },
}


# --------------------------------------------------------------------------- YAML reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a hand edit that adds `dns:` twice is an error)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path, what=None, error=ConfigError):
    """Parse a YAML file safely; malformed YAML raises ``error`` naming the line and column."""
    path = Path(path)
    what = what or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what}: not UTF-8 text") from None
    except (FileNotFoundError, IsADirectoryError):
        raise
    except OSError as exc:
        raise error(f"{what}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise error(f"{what}: {where}{problem} (the file is not valid YAML)") from None


# --------------------------------------------------------------------------- validation


def _path_str(parts):
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_problem(err):
    path = _path_str(err.absolute_path)
    value = err.instance
    if err.validator == "additionalProperties":
        extra = sorted(set(value) - set(err.schema.get("properties", {})), key=str)
        where = f"{path}: " if path else ""
        known = ", ".join(err.schema.get("properties", {}))
        return path, f"{where}unknown key {', '.join(repr(k) for k in extra)} (known keys: {known})"
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        where = f"{path}." if path else ""
        return path, f"{where}{missing}: missing (this key is required)"
    if err.validator == "type" and isinstance(value, (bool, int, float)):
        wanted = err.schema.get("type")
        if wanted == "string" or (isinstance(wanted, list) and "string" in wanted):
            why = "YAML reads bare no, yes, on, off as booleans" if isinstance(value, bool) else "YAML read a number"
            return path, f"{path}: {value!r} is not text; put the value in quotes ({why})"
    if err.validator == "enum":
        return path, f"{path}: {value!r} is not one of {', '.join(map(str, err.validator_value))}"
    if err.validator == "maxItems":
        return path, f"{path}: at most {err.validator_value} entries"
    return path, f"{path or 'cluster.yaml'}: {err.message}"


def image_catalog():
    """{catalog image name: family}, from the shipped catalog when it can be read: the data file itself
    (package data of pibake.bake; pibake.bake.images, which checks every field, is a layer above this one).
    A fresh dict each call; the file is parsed once per process (~20 ms of YAML, twice per load_cluster)."""
    return dict(_shipped_catalog())


@functools.lru_cache(maxsize=1)
def _shipped_catalog():
    try:
        text = resources.files("pibake.bake").joinpath("catalog.yaml").read_text(encoding="utf-8")
        return {name: entry["family"] for name, entry in yaml.safe_load(text)["images"].items()}
    except Exception as exc:  # noqa: BLE001  the catalog is another module's; fall back, say why
        LOG.debug("image catalog not readable (%s); using the built-in names", exc)
        return dict(IMAGE_CATALOG)


def image_is_path(image):
    """A local image file (a path) rather than a catalog name."""
    return "/" in image or image.startswith(("~", ".")) or image.endswith(IMAGE_SUFFIXES)


def validate_cluster_data(data):
    """Every problem in a cluster.yaml mapping, as a list of 'path: what is wrong' strings."""
    if not isinstance(data, dict):
        return [f"the file must be a mapping of keys to values (got {type(data).__name__})"]
    validator = jsonschema.Draft202012Validator(CLUSTER_SCHEMA)
    problems = {}
    for err in validator.iter_errors(data):
        path, text = _schema_problem(err)
        problems.setdefault(path, text)
    bad = set(problems)
    sem = []

    def ok(key):
        return key in data and data[key] is not None and not any(p == key or p.startswith((key + ".", key + "[")) for p in bad)

    def check(key, field, value):
        """The field's one message (pibake.fields) for a bad value; True when it is valid."""
        problem = field.problem(value)
        if problem:
            sem.append(f"{key}: {problem}")
        return problem is None

    network = None
    if ok("network") and check("network", fields.NETWORK, data["network"]):
        network = ipaddress.IPv4Network(data["network"], strict=True)

    def check_in_network(key, value):
        if not check(key, fields.IPV4, value):
            return
        addr = ipaddress.IPv4Address(value)
        if network is not None:
            if addr not in network:
                sem.append(f"{key}: {addr} is outside the network {network}")
            elif addr == network.network_address:
                sem.append(f"{key}: {addr} is the network address of {network}; use a host address")
            elif addr == network.broadcast_address:
                sem.append(f"{key}: {addr} is the broadcast address of {network}; use a host address")

    if ok("manager_ip"):
        check_in_network("manager_ip", data["manager_ip"])
    if ok("gateway"):
        check_in_network("gateway", data["gateway"])
    for i, server in enumerate(data["dns"] if ok("dns") else ()):
        check(f"dns[{i}]", fields.IPV4, server)
    if ok("name"):
        check("name", fields.CLUSTER_NAME, data["name"])
    if ok("manager"):
        check("manager", fields.HOSTNAME, data["manager"])
    if ok("user"):
        check("user", fields.USERNAME, data["user"])
    if ok("ssh_keys"):
        for i, key in enumerate(data["ssh_keys"]):
            why = ssh_key_problem(key)
            if why:
                sem.append(f"ssh_keys[{i}]: {why}")
    if ok("timezone"):
        check("timezone", fields.TIMEZONE, data["timezone"])
    if ok("locale"):
        check("locale", fields.LOCALE, data["locale"])
    if ok("wifi"):
        wifi = data["wifi"]
        check("wifi.country", fields.COUNTRY, wifi["country"])
        check("wifi.ssid", fields.SSID, wifi["ssid"])
        check("wifi.psk", fields.PSK, wifi["psk"])
    for i, server in enumerate(data["ntp_servers"] if ok("ntp_servers") else ()):
        check(f"ntp_servers[{i}]", fields.HOST, server)
    if ok("image"):
        catalog = image_catalog()
        image = data["image"]
        family = data.get("family")
        if any(ord(c) < 32 for c in image):
            sem.append("image: contains control characters")
        elif image_is_path(image):
            if family is None:
                sem.append(f"family: required for the local image {image} (one of {', '.join(FAMILIES)})")
        elif image not in catalog:
            sem.append(
                f"image: {image!r} is not in the catalog ({', '.join(catalog)}); "
                "for a local file give its path and a family"
            )
        elif family is not None and not bad.intersection({"family"}) and family != catalog[image]:
            sem.append(f"family: {image} is a {catalog[image]} image, not {family}")
    elif "image" not in data and data.get("family") not in (None, "raspios"):
        sem.append(f"family: the default image {DEFAULT_IMAGE} is raspios, not {data.get('family')}")
    if isinstance(data.get("switches"), list) and not any(p == "switches" for p in bad):
        broken = {i for i in range(len(data["switches"])) if any(p.startswith(f"switches[{i}]") for p in bad)}
        sem.extend(switch_problems(data["switches"], data.get("manager"), skip=broken))
    if ok("mqtt"):
        sem.extend(mqtt_problems(data["mqtt"], data.get("registry_port", DEFAULT_REGISTRY_PORT)))
    if ok("sensors"):
        sem.extend(sensor_settings_problems(data["sensors"]))
    if isinstance(data.get("rules"), list) and not any(p in ("rules", "switches") for p in bad):
        broken = {i for i in range(len(data["rules"])) if any(p.startswith(f"rules[{i}]") for p in bad)}
        sem.extend(rules_problems(data["rules"], data.get("switches"), valid_name=valid_hostname, skip=broken))
    if ok("nodes"):
        sem.extend(f"nodes.{name}: {name!r} is not a valid hostname" for name in data["nodes"]
                   if not valid_hostname(str(name)))
    out = [problems[k] for k in sorted(problems)] + sem
    psk = data.get("wifi", {}).get("psk") if isinstance(data.get("wifi"), dict) else None
    # never echo the PSK (or a passphrase put there); a value shorter than any passphrase (8) is no secret, and
    # hiding it would mangle the messages ("4" in "64 hex digits")
    if isinstance(psk, (str, int)) and len(str(psk)) >= 8:
        out = [p.replace(repr(psk), "<hidden>").replace(str(psk), "<hidden>") for p in out]
    return out


MQTT_TOPIC_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def address_problem(address):
    """None if ``address`` is host or host:port (IPv4 or a DNS name, port 1-65535); else why not."""
    if "@" in address or "/" in address:
        return "give host or host:port only (credentials belong in secrets/, see `pibake switch credentials`)"
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, None
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"{port!r} is not a TCP port (1-65535)"
    return fields.HOST.problem(host)


def switch_problems(switches, manager=None, skip=()):
    """The checks on ``switches:`` a schema cannot express, as 'switches[i].key: ...' strings.

    Entries in ``skip`` (indexes the schema already rejected) are not looked at again."""
    out = []
    seen = {}
    for i, entry in enumerate(switches):
        if i in skip:
            continue
        where = f"switches[{i}]"
        name = entry["name"]
        if not valid_hostname(name):
            out.append(f"{where}.name: {name!r} is not a valid switch name (lower case letters, digits and '-')")
        elif name == "log":  # /api/v1/switches/log is the action log
            out.append(f"{where}.name: 'log' is reserved; choose another name")
        elif name in seen:
            out.append(f"{where}.name: {name!r} is already the name of switches[{seen[name]}]")
        else:
            seen[name] = i
        for key in ("address", "mqtt_broker"):
            why = address_problem(entry[key]) if key in entry else None
            if why:
                out.append(f"{where}.{key}: {why}")
        node, thing = entry.get("node"), entry.get("thing")
        if node is not None and thing is not None:
            out.append(f"{where}: give node or thing (what the switch powers), not both")
        elif node is None and thing is None:
            out.append(f"{where}: say what the switch powers: node (a hostname) or thing (e.g. 'network switch')")
        if node is not None and not valid_hostname(node):
            out.append(f"{where}.node: {node!r} is not a valid hostname")
        if entry.get("auto_cycle"):
            if node is None:
                out.append(f"{where}.auto_cycle: only a switch that powers a node may be cycled automatically")
            elif node == manager:
                out.append(f"{where}.auto_cycle: {node} is the manager, which pibake never cycles by itself")
        mqtt = [k for k in ("mqtt_broker", "mqtt_topic", "mqtt_tls") if entry.get(k)]
        if mqtt and entry["driver"] != "tasmota":
            out.append(f"{where}.{mqtt[0]}: MQTT is for the tasmota driver only")
        else:
            for key in ("mqtt_broker", "mqtt_topic"):
                if mqtt and key not in entry:
                    out.append(f"{where}.{key}: missing (MQTT needs both mqtt_broker and mqtt_topic)")
        topic = entry.get("mqtt_topic")
        if topic is not None and not MQTT_TOPIC_RE.match(topic):
            out.append(f"{where}.mqtt_topic: {topic!r} must be the device's topic alone (letters, digits, _ . -)")
    return out


# An MQTT topic prefix: levels of letters, digits, _ and -; no wildcard (+ #), no empty level, no $ at the start.
MQTT_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


def mqtt_problems(mqtt, registry_port=DEFAULT_REGISTRY_PORT):
    """The checks on ``mqtt:`` a schema cannot express, one per field, as 'mqtt.key: ...' strings."""
    out = []
    port = mqtt.get("port")
    if port is not None and port == registry_port:
        out.append(f"mqtt.port: {port} is the registry's port (registry_port); use another, e.g. 8883")
    for key in ("discovery_prefix", "base"):
        value = mqtt.get(key)
        if value is not None and not MQTT_PREFIX_RE.match(value):
            out.append(f"mqtt.{key}: {value!r} is not a topic prefix (levels of letters, digits, _ and - "
                       "separated by /; no + or #, no leading or trailing /)")
    if mqtt.get("base") is not None and mqtt.get("base") == mqtt.get("discovery_prefix", "homeassistant"):
        out.append("mqtt.base: must differ from discovery_prefix (Home Assistant reads that one)")
    return out


def mqtt_from_data(data):
    """``MqttSettings`` of a *validated* cluster.yaml mapping (disabled when ``mqtt:`` is missing)."""
    raw = data.get("mqtt") or {}
    defaults = MqttSettings()
    return MqttSettings(enabled=bool(raw.get("enabled", False)), port=raw.get("port", defaults.port),
                        discovery_prefix=raw.get("discovery_prefix", defaults.discovery_prefix),
                        base=raw.get("base", defaults.base))


def switches_from_data(data):
    """``SwitchConfig`` for each entry of a *validated* ``switches:`` list."""
    return tuple(
        SwitchConfig(
            name=e["name"], driver=e["driver"], address=e["address"], channel=e.get("channel", 0),
            node=e.get("node"), thing=e.get("thing"), auto_cycle=bool(e.get("auto_cycle", False)),
            mqtt_broker=e.get("mqtt_broker"), mqtt_topic=e.get("mqtt_topic"), mqtt_tls=bool(e.get("mqtt_tls")),
            timeout=e.get("timeout"),
        )
        for e in data.get("switches") or ()
    )


_OPTION_OF_KEY = {
    "name": "--name", "manager": "--manager", "manager_ip": "--manager-ip", "network": "--network",
    "gateway": "--gateway", "dns": "--dns", "user": "--user", "ssh_keys": "--ssh-key", "timezone": "--timezone",
    "locale": "--locale", "wifi": "--wifi-*", "image": "--image", "family": "--family",
}


def _as_option_problems(problems, wanted):
    """'dns[0]: ...' -> '--dns: ...' for values the user gave as options."""
    out = []
    for problem in problems:
        key = re.split(r"[.\[:]", problem, maxsplit=1)[0]
        if key in wanted and key in _OPTION_OF_KEY:
            rest = problem[len(key):]
            rest = re.sub(r"^\[\d+\]", "", rest)
            if key == "wifi" and rest.startswith("."):
                sub = rest[1:].split(":", 1)[0]
                out.append(f"--wifi-{sub}{rest[1 + len(sub):]}" if sub in ("country", "ssid") else f"Wi-Fi{rest}")
                continue
            out.append(f"{_OPTION_OF_KEY[key]}{rest}")
        else:
            out.append(problem)
    return out


def _problems_error(where, problems, hint):
    message = "; ".join(f"{where}: {p}" if where else p for p in problems)
    err = ConfigError(f"{message} ({hint})")
    err.problems = list(problems)
    return err


def cluster_from_data(data, directory=None):
    """Build the ``Cluster`` from a *validated* mapping."""
    image = data.get("image", DEFAULT_IMAGE)
    family = data.get("family") or image_catalog().get(image, "raspios")
    if directory is not None and image_is_path(image):
        image = str((Path(directory) / Path(image).expanduser()).resolve())
    wifi = data.get("wifi")
    network = ipaddress.IPv4Network(data["network"])
    gateway = data.get("gateway")
    return Cluster(
        name=data["name"],
        manager=data["manager"],
        manager_ip=str(ipaddress.IPv4Address(data["manager_ip"])),
        network=str(network),
        gateway=gateway,
        dns=tuple(data.get("dns") or ()),
        user=data.get("user", DEFAULT_USER),
        ssh_keys=tuple(k.strip() for k in data.get("ssh_keys") or ()),
        timezone=data.get("timezone", "Etc/UTC"),
        locale=data.get("locale", DEFAULT_LOCALE),
        wifi=Wifi(country=fields.COUNTRY.normalise(wifi["country"]), ssid=wifi["ssid"],
                  psk=fields.PSK.normalise(wifi["psk"])) if wifi else None,
        image=image,
        family=family,
        ntp_servers=tuple(data.get("ntp_servers") or ()),
        registry_port=data.get("registry_port", DEFAULT_REGISTRY_PORT),
        directory=Path(directory) if directory is not None else None,
        switches=switches_from_data(data),
        mqtt=mqtt_from_data(data),
        boards=tuple(sorted((str(name), entry["board"]) for name, entry in (data.get("nodes") or {}).items()
                            if entry and entry.get("board"))),
        apt_cache=bool(data.get("apt_cache", False)),
    )


def load_cluster_data(cluster_dir):
    """The raw mapping of ``cluster_dir``/cluster.yaml, validated; ConfigError lists every problem."""
    path = Path(cluster_dir) / CLUSTER_FILE
    if not path.exists():
        if not Path(cluster_dir).exists():
            raise ConfigError(
                f"no cluster directory {cluster_dir}: run `pibake init` first "
                "(or point --cluster / PIBAKE_CLUSTER at an existing one)"
            )
        raise ConfigError(f"{path} is missing: run `pibake init` first")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a file")
    data = read_yaml(path)
    if data is None:
        raise ConfigError(f"{path} is empty: run `pibake init --force ...` or write it ({DOC_HINT})")
    problems = validate_cluster_data(data)
    if problems:
        raise _problems_error(path, problems, f"edit {path}; {DOC_HINT}")
    return data


def load_cluster(cluster_dir):
    """Read and validate ``cluster_dir``/cluster.yaml; return a ``pibake.model.Cluster``.

    Raises ConfigError naming every problem with its path (``cluster.yaml: dns[1]: ...``).
    """
    data = load_cluster_data(cluster_dir)
    cluster = cluster_from_data(data, Path(cluster_dir))
    LOG.debug("loaded cluster %s from %s", cluster.name, cluster_dir)
    return cluster


# --------------------------------------------------------------------------- writing


def render_cluster_yaml(data):
    """The text of a commented cluster.yaml for ``data``. Each value goes through yaml.safe_dump."""
    out = [
        "# pibake cluster configuration. Written by `pibake init`; edit it by hand as you like,",
        "# `pibake` re-reads and validates it on every command. Reference: docs/cluster-yaml.md",
        "",
    ]
    for key, doc in _KEY_DOCS.items():
        if key not in data:
            if key == "wifi":
                out += [f"# {line}" for line in doc.splitlines()]
                out.append(_WIFI_EXAMPLE.rstrip("\n"))
                out.append("")
            continue
        out += [f"# {line}" for line in doc.splitlines()]
        out.append(yaml.safe_dump({key: data[key]}, default_flow_style=False, sort_keys=False, width=4096).rstrip("\n"))
        out.append("")
    extra = [k for k in data if k not in _KEY_DOCS]
    if extra:  # never silently drop a key
        out.append(yaml.safe_dump({k: data[k] for k in extra}, default_flow_style=False, sort_keys=False).rstrip("\n"))
    text = "\n".join(out).rstrip("\n") + "\n"
    if yaml.safe_load(text) != data:  # the comments must never change what the file says
        raise AssertionError("rendered cluster.yaml does not round-trip")
    return text


def _value_end(node):
    """(line, column) just after a node's last character, ignoring block-end tokens."""
    while isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    return node.end_mark.line, node.end_mark.column


def update_cluster_yaml(text, data):
    """``text`` (a hand-edited cluster.yaml) with its top-level keys set to ``data``, comments kept.

    Changed keys are rewritten in place, new ones appended with their documentation comment, keys
    no longer in ``data`` removed. Falls back to a freshly rendered file when the result would not
    say exactly ``data`` (the check that makes this safe).
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        current = yaml.safe_load(text)
    except yaml.YAMLError:
        return render_cluster_yaml(data)
    if not isinstance(root, yaml.MappingNode) or not isinstance(current, dict):
        return render_cluster_yaml(data)
    lines = text.splitlines()
    spans = {}
    for key_node, value_node in root.value:
        end_line, end_col = _value_end(value_node)
        spans[key_node.value] = (key_node.start_mark.line, end_line + 1 if end_col > 0 else end_line)
    edits = []  # (start, end, new lines), applied bottom-up
    for key, (start, end) in spans.items():
        if key not in data:
            edits.append((start, end, []))
        elif current.get(key) != data[key]:
            fragment = yaml.safe_dump({key: data[key]}, default_flow_style=False, sort_keys=False, width=4096)
            edits.append((start, end, fragment.rstrip("\n").splitlines()))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    for key in data:
        if key not in spans:
            doc = _KEY_DOCS.get(key)
            lines += [""] + ([f"# {line}" for line in doc.splitlines()] if doc else [])
            lines += yaml.safe_dump({key: data[key]}, default_flow_style=False, sort_keys=False,
                                    width=4096).rstrip("\n").splitlines()
    out = "\n".join(lines).rstrip("\n") + "\n"
    try:
        if yaml.safe_load(out) == data:
            return out
    except yaml.YAMLError:
        pass
    LOG.debug("could not edit cluster.yaml in place; writing it afresh")
    return render_cluster_yaml(data)


def _atomic_write(path, text, mode=0o644):
    atomic_write(path, text, mode)


def _home_of_invoking_user():
    """The home of the user who ran pibake (the sudo caller when run with sudo)."""
    sudo_user = os.environ.get("SUDO_USER")
    if os.geteuid() == 0 and sudo_user and sudo_user != "root":
        try:
            return Path(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    return Path.home()


def default_ssh_key_files(home=None):
    """The invoking user's ~/.ssh/*.pub files (sorted)."""
    ssh_dir = Path(home) / ".ssh" if home else _home_of_invoking_user() / ".ssh"
    try:
        return sorted(p for p in ssh_dir.glob("*.pub") if p.is_file())
    except OSError:
        return []


def read_ssh_key_file(path):
    """The public key lines of an ssh .pub / authorized_keys-style file; ConfigError if it is not one."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--ssh-key {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--ssh-key {path}: cannot read it ({type(exc).__name__})") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"--ssh-key {path}: the file holds no key")
    for key in keys:
        why = ssh_key_problem(key)
        if why:
            raise ConfigError(f"--ssh-key {path}: {why}")
    return keys


def host_timezone():
    """The machine's own time zone name, if it can be told; else Etc/UTC."""
    try:
        target = os.readlink("/etc/localtime")
        name = target.split("zoneinfo/", 1)[1]
        if fields.TIMEZONE.valid(name):
            return name
    except (OSError, IndexError):
        pass
    try:
        name = Path("/etc/timezone").read_text().strip()
        if fields.TIMEZONE.valid(name):
            return name
    except OSError:
        pass
    return "Etc/UTC"


def default_cluster_name(manager):
    """'red00' -> 'red': the manager's name without its trailing number."""
    name = re.sub(r"[-0-9]+$", "", manager or "")
    return name if valid_hostname(name) else manager


def _wifi_psk(ssid, password):
    password = password.rstrip("\r\n")
    if fields.PSK.valid(password):  # already a PSK
        return fields.PSK.normalise(password)
    try:
        return _secrets.wpa_psk(ssid, password)
    except SecretsError as exc:
        raise ConfigError(f"Wi-Fi: {exc}") from None


# What a key means when cluster.yaml leaves it out (see cluster_from_data / the model).
_EFFECTIVE_DEFAULTS = {"user": DEFAULT_USER, "locale": DEFAULT_LOCALE, "timezone": "Etc/UTC",
                       "image": DEFAULT_IMAGE, "registry_port": DEFAULT_REGISTRY_PORT}


def _differences(existing, wanted):
    """Compare the asked-for values with cluster.yaml.

    Returns (changes, additions): ``changes`` are keys where the file says something else (readable
    strings, never a PSK); ``additions`` are keys the file leaves unset or empty (gateway, dns,
    ssh_keys, wifi, ...) that may be filled in without --force.
    """
    changes, additions = [], []
    for key, value in wanted.items():
        old = existing.get(key)
        if old is None:
            old = _EFFECTIVE_DEFAULTS.get(key)
        if old is None or old == []:
            if value not in (None, []):
                additions.append(key)
            continue
        if old == value:
            continue
        if key == "wifi":
            changes.append("wifi: different Wi-Fi settings")
        elif key == "ssh_keys":
            changes.append(f"ssh_keys: {len(old)} keys there, a different set of {len(value)} asked")
        else:
            changes.append(f"{key}: {_short(old)} there, {_short(value)} asked")
    return changes, additions


def _short(value):
    if value is None:
        return "not set"
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _apply_defaults(data, manager, network, home, result, key_sources):
    """Fill in the keys a new cluster.yaml gets by default (only those not set yet)."""
    data.setdefault("name", default_cluster_name(manager))
    try:
        net = ipaddress.IPv4Network(network, strict=True)
    except ValueError:
        net = None  # reported by validation
    if data.get("gateway") is None and net is not None and net.num_addresses > 2:
        data["gateway"] = str(next(net.hosts()))
    if not data.get("dns") and data.get("gateway"):
        data["dns"] = [data["gateway"]]
    data.setdefault("user", DEFAULT_USER)
    if "ssh_keys" not in data:
        found = []
        for key_file in default_ssh_key_files(home):
            try:
                keys = read_ssh_key_file(key_file)
            except ConfigError as exc:
                result["warnings"].append(f"skipped {key_file}: {str(exc).split(': ', 1)[-1]}")
                continue
            found += keys
            key_sources.append(str(key_file))
        data["ssh_keys"] = list(dict.fromkeys(found))
        result["ssh_keys_default"] = True
        if not found:
            result["warnings"].append(
                "no ssh public key found (~/.ssh/*.pub): nodes will boot and enrol, but nobody can log in "
                "over ssh (password login is off); add one with --ssh-key FILE --force or in cluster.yaml")
    data.setdefault("timezone", host_timezone())
    data.setdefault("locale", DEFAULT_LOCALE)
    data.setdefault("image", DEFAULT_IMAGE)
    data.setdefault("registry_port", DEFAULT_REGISTRY_PORT)
    return data


def _rotate_names(rotate):
    if rotate is True or rotate == "all":
        return True
    names = [rotate] if isinstance(rotate, str) else list(rotate or ())
    if "all" in names:
        return True
    return tuple(names)


def init_cluster(
    cluster_dir,
    *,
    manager,
    manager_ip,
    network,
    name=None,
    gateway=None,
    dns=(),
    user=None,
    ssh_keys=(),
    ssh_key_files=(),
    timezone=None,
    locale=None,
    wifi_country=None,
    wifi_ssid=None,
    wifi_password=None,
    image=None,
    family=None,
    rotate=(),
    force=False,
    home=None,
):
    """Create or refresh ``cluster_dir``: cluster.yaml and secrets/. Returns a JSON-able dict.

    Options left at None/empty mean "the default" on creation and "keep what is there" on a
    re-run (user defaults to pi, locale to C.UTF-8, timezone to this machine's, gateway to the
    network's first host, dns to the gateway, ssh keys to the invoking user's ~/.ssh/*.pub).
    A re-run asking for different values than cluster.yaml holds raises ConfigError unless
    ``force`` (the old file is kept as cluster.yaml.bak). Secrets are created when missing and
    replaced only when named in ``rotate`` (``True``/"all" for all). The Wi-Fi passphrase is
    turned into a WPA PSK and neither stored nor returned.
    """
    cluster_dir = Path(cluster_dir)
    path = cluster_dir / CLUSTER_FILE
    rotate = _rotate_names(rotate)
    if rotate is not True:
        unknown = sorted(set(rotate) - set(_secrets.SECRET_NAMES))
        if unknown:
            raise ConfigError(
                f"--rotate: unknown secret {', '.join(unknown)}; choose from all, {', '.join(_secrets.SECRET_NAMES)}"
            )
    if cluster_dir.exists() and not cluster_dir.is_dir():
        raise ConfigError(f"{cluster_dir} exists and is not a directory")

    # What the caller asked for explicitly (these must match an existing file).
    wanted = {"manager": manager, "manager_ip": manager_ip, "network": network}
    optional = {"name": name, "gateway": gateway, "user": user, "timezone": timezone, "locale": locale,
                "image": image, "family": family}
    wanted.update({k: v for k, v in optional.items() if v is not None})
    if dns:
        wanted["dns"] = [d.strip() for item in dns for d in str(item).split(",") if d.strip()]
    key_sources = []
    explicit_keys = [k.strip() for k in ssh_keys if k and k.strip()]
    for key_file in ssh_key_files:
        explicit_keys += read_ssh_key_file(key_file)
        key_sources.append(str(Path(key_file).expanduser()))
    if explicit_keys:
        wanted["ssh_keys"] = list(dict.fromkeys(explicit_keys))
    if wifi_ssid is not None or wifi_password is not None or wifi_country is not None:
        missing = [opt for opt, val in (("--wifi-country", wifi_country), ("--wifi-ssid", wifi_ssid),
                                        ("a Wi-Fi password", wifi_password)) if not val]
        if missing:
            raise ConfigError(f"Wi-Fi needs a country, an SSID and a password: missing {', '.join(missing)}")
        wanted["wifi"] = {"country": fields.COUNTRY.normalise(wifi_country),
                          "ssid": wifi_ssid, "psk": _wifi_psk(wifi_ssid, wifi_password)}

    existing = None
    existing_problems = []
    if path.exists():
        try:
            existing = read_yaml(path)
        except ConfigError as exc:
            existing_problems = [str(exc)]
        else:
            if existing is None:
                existing_problems = [f"{path} is empty"]
            else:
                existing_problems = [f"{path}: {p}" for p in validate_cluster_data(existing)]
        if existing_problems and not force:
            raise ConfigError(
                "; ".join(existing_problems)
                + f" (fix {path} by hand, or re-run init with --force to rewrite it; a backup is kept in {BACKUP_FILE})"
            )
        if not isinstance(existing, dict):
            existing = None

    result = {"cluster_dir": str(cluster_dir), "cluster_yaml": str(path), "warnings": []}
    if existing is not None and not existing_problems:
        changes, additions = _differences(existing, wanted)
        if changes and not force:
            problems = validate_cluster_data({**existing, **wanted})
            if problems:  # say what is wrong with the new values first
                raise _problems_error(None, _as_option_problems(problems, wanted), "fix them and run init again")
            raise ConfigError(
                f"{path} already exists with other values ({'; '.join(changes)}): edit {path} by hand, "
                f"or re-run init with --force to replace them (the old file is kept as {BACKUP_FILE})"
            )
        data = {**existing, **wanted}
        status = "updated" if changes or additions else "unchanged"
        if additions:
            result["added"] = additions
    else:
        # No file yet, or a broken one replaced with --force: keep what the broken file says when the
        # options make it valid, else start from the options alone (the old file goes to the backup).
        data = dict(wanted)
        status = "replaced" if path.exists() else "created"
        if existing is not None:
            merged = {**existing, **wanted}
            _apply_defaults(merged, manager, network, home, {"warnings": []}, [])
            if not validate_cluster_data(merged):
                data = {**existing, **wanted}
        _apply_defaults(data, manager, network, home, result, key_sources)
    # Order keys as documented, unknown ones last.
    data = {**{k: data[k] for k in _KEY_DOCS if k in data}, **{k: v for k, v in data.items() if k not in _KEY_DOCS}}

    problems = validate_cluster_data(data)
    if problems:
        raise _problems_error(None, _as_option_problems(problems, wanted), "fix them and run init again")
    if not data.get("ssh_keys"):
        result["warnings"].append(
            "no ssh public key: you will not be able to log in to the nodes with ssh "
            "(pass --ssh-key FILE, or create one with ssh-keygen -t ed25519, then re-run init)"
        )

    # Nothing is written before everything above passed.
    try:
        _write_cluster(cluster_dir, path, data, status, rotate, result)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the cluster directory {cluster_dir}: {exc.strerror or type(exc).__name__}"
            + (f" ({exc.filename})" if getattr(exc, "filename", None) else "")
            + "; choose another --cluster directory or fix its permissions"
        ) from None
    LOG.info("cluster.yaml %s; secrets %s", status, result["secrets"])

    cluster = cluster_from_data(data, cluster_dir)
    result.update(
        {
            "name": cluster.name,
            "manager": cluster.manager,
            "manager_ip": cluster.manager_ip,
            "network": cluster.network,
            "gateway": cluster.gateway,
            "cluster_yaml_status": status,
            "secrets_dir": str(_secrets.secrets_dir(cluster_dir)),
            "ssh_keys": len(cluster.ssh_keys),
            "ssh_key_files": key_sources,
            "wifi": {"country": cluster.wifi.country, "ssid": cluster.wifi.ssid} if cluster.wifi else None,
            "image": cluster.image,
            "family": cluster.family,
        }
    )
    result.setdefault("ssh_keys_default", False)
    return result


def _write_cluster(cluster_dir, path, data, status, rotate, result):
    cluster_dir.mkdir(parents=True, exist_ok=True)
    result["secrets"] = _secrets.ensure_secrets(
        cluster_dir, data["name"], data["manager"], data["manager_ip"], rotate=rotate
    )
    if (data.get("mqtt") or {}).get("enabled"):  # the broker's certificate and admin password (docs/mqtt.md)
        result["secrets"].update(_secrets.ensure_mqtt_secrets(cluster_dir, data["manager"], data["manager_ip"],
                                                     rotate=rotate is True))
    if status != "unchanged":
        if path.exists():
            shutil.copy2(path, cluster_dir / BACKUP_FILE)
            result["backup"] = str(cluster_dir / BACKUP_FILE)
        mode = 0o600 if data.get("wifi") else 0o644  # a WPA PSK is as good as the passphrase
        if status == "updated":  # a valid file, maybe hand-edited: change only what changed
            text = update_cluster_yaml(path.read_text(encoding="utf-8"), data)
        else:
            text = render_cluster_yaml(data)
        _atomic_write(path, text, mode)
