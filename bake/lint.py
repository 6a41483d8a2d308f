"""Lint a NoCloud seed: cloud-init's own JSON schema plus pibake's checks, every problem with its path.

cloud-init's schema
-------------------
user-data is validated against ``schema-cloud-config-v1.json`` of the *installed* cloud-init package (never a
copy in this repository), the way cloud-init's ``cloudinit.config.schema`` does it: a draft-04 validator with
format checks, whose ``$ref``s (``#/$defs/...``) resolve inside that one file, and cloud-init's ``deprecated``
keyword reported as a warning. The file is found, in this order, at ``$PIBAKE_CLOUD_INIT_SCHEMA`` (only there,
when set), in the ``cloudinit`` package of the usual Python library directories, and through ``dpkg -L
cloud-init``. When none is found, lint says so in a warning and only pibake's checks run.

pibake's checks
---------------
* user-data starts with ``#cloud-config`` and is a YAML mapping; top-level keys cloud-init does not know are
  warnings (cloud-init ignores them silently).
* meta-data has ``instance-id`` and ``local-hostname``; user-data's ``hostname`` equals ``local-hostname``
  (and the expected hostname, when given).
* network-config is netplan ``version: 2`` (top-level or under ``network:``) with the renderer of the image
  family (NetworkManager for Raspberry Pi OS, networkd for Ubuntu), static addresses in CIDR form.
  cloud-init 22.4 has no JSON schema for network-config; the one newer releases ship
  (``schema-network-config-v2.json``) has no ``wifis`` at all (netplan validates those on the node), so lint
  does not use it and checks network-config itself.
* Size. cloud-init itself puts no limit on NoCloud files (checked in 22.4's DataSourceNoCloud: it reads the
  whole file) and FAT32 allows 4 GiB per file; the real limit is the free space of the boot partition, which
  burn checks against the card. A pibake seed is tens of KiB (the agent's source is the bulk), so lint warns
  above ``SIZE_WARN`` (256 KiB) and fails above ``SIZE_MAX`` (1 MiB): something that big was embedded by
  mistake (a wheel, an image), and cloud-init keeps several copies of user-data in memory and under
  /var/lib/cloud on a Pi with as little as 512 MB of RAM.
* A user with a locked password and no ssh key: nobody could log in (warning).

Messages never repeat the content of ``write_files`` (it holds secrets).
"""

import functools
import glob
import ipaddress
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonschema import Draft4Validator, FormatChecker, ValidationError
from jsonschema.exceptions import best_match
from jsonschema.validators import extend

from pibake.errors import CommandError
from pibake.model import Seed
from pibake.run import run, which

LOG = logging.getLogger(__name__)

SCHEMA_NAME = "schema-cloud-config-v1.json"
SCHEMA_ENV = "PIBAKE_CLOUD_INIT_SCHEMA"
SCHEMA_GLOBS = (
    "/usr/lib/python3/dist-packages/cloudinit/config/schemas/" + SCHEMA_NAME,
    "/usr/lib/python3*/site-packages/cloudinit/config/schemas/" + SCHEMA_NAME,
    "/usr/lib/python3*/dist-packages/cloudinit/config/schemas/" + SCHEMA_NAME,
    "/usr/local/lib/python3*/dist-packages/cloudinit/config/schemas/" + SCHEMA_NAME,
)
SIZE_WARN = 256 * 1024
SIZE_MAX = 1024 * 1024
RENDERERS = {"raspios": "NetworkManager", "ubuntu": "networkd"}
# schema errors under these keys are reported without the offending value (it may be a secret)
SENSITIVE_TOP_KEYS = frozenset({"write_files", "chpasswd", "password", "ca_certs", "ca-certs", "ssh_keys",
                                "random_seed", "apt"})
SENSITIVE_KEYS = frozenset({"passwd", "hashed_passwd", "plain_text_passwd", "password", "content"})
NO_SCHEMA_WARNING = ("cloud-init is not installed (its JSON schema was not found): only pibake's own checks ran; "
                     "install cloud-init (apt-get install cloud-init) for the full check")


@dataclass(frozen=True)
class LintProblem:
    file: str  # "user-data", "meta-data", "network-config" or "seed"
    path: str  # dotted path inside the file, "" for the whole file
    message: str

    def __str__(self):
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


@dataclass
class LintReport:
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    schema_file: str | None = None

    @property
    def ok(self):
        return not self.errors

    def error(self, file, path, message):
        self.errors.append(LintProblem(file, path, message))

    def warn(self, file, path, message):
        self.warnings.append(LintProblem(file, path, message))

    def to_dict(self):
        return {"errors": [str(e) for e in self.errors], "warnings": [str(w) for w in self.warnings],
                "schema_file": self.schema_file}


# --------------------------------------------------------------------------- cloud-init's schema


def find_cloud_init_schema():
    """Path of the installed cloud-init's cloud-config JSON schema, or None."""
    override = os.environ.get(SCHEMA_ENV)
    if override:
        return override if os.path.isfile(override) else None
    for pattern in SCHEMA_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path

    if which("dpkg"):
        try:
            listing = run(["dpkg", "-L", "cloud-init"], timeout=20, check=False).stdout
        except CommandError:
            listing = ""
        for line in listing.splitlines():
            if line.endswith("/" + SCHEMA_NAME) and os.path.isfile(line):
                return line
    return None


@functools.lru_cache(maxsize=4)
def _load_schema(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class _Deprecated(Exception):
    """Marker: an error produced by cloud-init's ``deprecated`` schema keyword (a warning, not an error)."""


@functools.lru_cache(maxsize=1)
def _validator_class():
    """A draft-04 validator with cloud-init's extensions (``deprecated``; oneOf/anyOf that pass deprecations)."""
    class DeprecationError(ValidationError, _Deprecated):
        pass

    def deprecated(validator, value, instance, schema):
        if value:
            yield DeprecationError(f"deprecated: {schema.get('description', '').strip()}".strip())

    def _split(errors):
        errs = [e for e in errors if not isinstance(e, _Deprecated)]
        deps = [e for e in errors if isinstance(e, _Deprecated)]
        return errs, deps

    def any_of(validator, subschemas, instance, schema):
        all_errors = []
        for index, sub in enumerate(subschemas):
            errs, deps = _split(list(validator.descend(instance, sub, schema_path=index)))
            if not errs:
                yield from deps
                return
            all_errors.extend(errs)
        yield ValidationError("is not valid under any of the given schemas", context=all_errors)

    def one_of(validator, subschemas, instance, schema):
        all_errors = []
        valid = []
        for index, sub in enumerate(subschemas):
            errs, deps = _split(list(validator.descend(instance, sub, schema_path=index)))
            if errs:
                all_errors.extend(errs)
            else:
                valid.append(deps)
        if not valid:
            yield ValidationError("is not valid under any of the given schemas", context=all_errors)
        elif len(valid) > 1:
            yield ValidationError("is valid under more than one of the given schemas")
        else:
            yield from valid[0]

    validators = dict(Draft4Validator.VALIDATORS)
    validators.update({"deprecated": deprecated, "anyOf": any_of, "oneOf": one_of})
    return extend(Draft4Validator, validators)


def _path(parts):
    return ".".join(str(p) for p in parts)


def _sensitive(parts):
    parts = [str(p) for p in parts]
    return bool(parts) and (parts[0] in SENSITIVE_TOP_KEYS or bool(SENSITIVE_KEYS.intersection(parts)))


def _describe(error, parts):
    """A one-line message for a schema error at ``parts`` that never quotes a sensitive value."""
    if error.context:
        # the branch whose type fits the instance says the most; "is not of type" from the others does not
        relevant = [e for e in error.context if not (e.validator == "type" and not e.relative_path)]
        inner = best_match(relevant or error.context)
        if inner is not None:
            sub = list(inner.relative_path)
            return (f"{_path(sub)}: " if sub else "") + _describe(inner, list(parts) + sub)
    if not _sensitive(parts) or error.validator in ("required", "additionalProperties", "deprecated"):
        return error.message
    # generic wording from the failing keyword, without the instance
    expected = error.validator_value
    if error.validator == "enum":
        return f"must be one of {expected}"
    if error.validator == "type":
        return f"must be of type {expected}"
    return f"fails the schema's {error.validator!r} check"


def schema_check(config, schema, report):
    """Add cloud-init schema errors (and deprecations as warnings) for the parsed user-data ``config``."""
    validator = _validator_class()(schema, format_checker=FormatChecker())
    for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        parts = list(error.absolute_path)
        message = _describe(error, parts)
        if isinstance(error, _Deprecated):
            report.warn("user-data", _path(parts), message)
        else:
            report.error("user-data", _path(parts), message)


def _known_top_level_keys(schema):
    keys = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node and node["$ref"].startswith("#/"):
                target = schema
                for part in node["$ref"][2:].split("/"):
                    target = target.get(part, {})
                walk(target)
            keys.update(node.get("properties", {}))
            for sub in node.get("allOf", []):
                walk(sub)

    for sub in schema.get("allOf", []):
        walk(sub)
    return keys


# --------------------------------------------------------------------------- pibake's checks


def _load(report, file, text):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        report.error(file, where, f"is not valid YAML ({getattr(exc, 'problem', None) or type(exc).__name__})")
        return None


def _login_keys(user):
    """The user's ssh keys a person can log in with: not those restricted to one source address (``from=``, as
    the manager's key is: only the registry's jobs use it)."""
    keys = user.get("ssh_authorized_keys") or []
    return [k for k in keys if not (isinstance(k, str) and k.startswith("from="))]


def _check_user_data(seed, report):
    text = seed.user_data
    if not text.startswith("#cloud-config\n"):
        report.error("user-data", "", "must start with the line '#cloud-config'")
    config = _load(report, "user-data", text)
    if config is None:
        return None
    if not isinstance(config, dict):
        report.error("user-data", "", "must be a YAML mapping")
        return None
    for i, user in enumerate(config.get("users") or []):
        if isinstance(user, dict) and user.get("lock_passwd", True) and not _login_keys(user):
            report.warn("user-data", f"users.{i}",
                        "password locked and no ssh key: nobody can log in (add ssh_keys to cluster.yaml)")
    return config


def _check_meta_data(seed, report):
    meta = _load(report, "meta-data", seed.meta_data)
    if meta is None:
        report.error("meta-data", "", "is empty: it needs instance-id and local-hostname")
        return {}
    if not isinstance(meta, dict):
        report.error("meta-data", "", "must be a YAML mapping")
        return {}
    iid = meta.get("instance-id")
    if not isinstance(iid, str) or not iid:
        report.error("meta-data", "instance-id", "is missing: cloud-init needs it to tell a new seed from an old one")
    elif seed.instance_id and iid != seed.instance_id:
        report.error("meta-data", "instance-id", f"is {iid!r} but the seed says {seed.instance_id!r}")
    if not isinstance(meta.get("local-hostname"), str):
        report.error("meta-data", "local-hostname", "is missing")
    return meta


def _check_network_config(seed, report, family):
    data = _load(report, "network-config", seed.network_config)
    if data is None:
        report.error("network-config", "", "is empty")
        return
    if not isinstance(data, dict):
        report.error("network-config", "", "must be a YAML mapping")
        return
    prefix = "network."
    net = data.get("network")
    if net is None:
        net, prefix = data, ""
    if not isinstance(net, dict):
        report.error("network-config", "network", "must be a mapping")
        return
    if net.get("version") != 2:
        report.error("network-config", prefix + "version", f"must be 2 (netplan v2), not {net.get('version')!r}")
    renderer = net.get("renderer")
    if family is not None:
        expected = RENDERERS.get(family)
        if renderer != expected:
            report.error("network-config", prefix + "renderer",
                         f"must be {expected} for a {family} image, not {renderer!r}")
    elif renderer not in RENDERERS.values():
        report.error("network-config", prefix + "renderer",
                     f"must be one of {', '.join(sorted(RENDERERS.values()))}, not {renderer!r}")
    known = {"version", "renderer", "ethernets", "wifis", "bonds", "bridges", "vlans"}
    for key in net:
        if key not in known:
            report.error("network-config", prefix + str(key), "is not a netplan v2 key")

    for kind in ("ethernets", "wifis"):
        devices = net.get(kind) or {}
        if not isinstance(devices, dict):
            report.error("network-config", prefix + kind, "must be a mapping of device ids")
            continue
        for dev, cfg in devices.items():
            path = f"{prefix}{kind}.{dev}"
            if not isinstance(cfg, dict):
                report.error("network-config", path, "must be a mapping")
                continue
            for i, addr in enumerate(cfg.get("addresses") or []):
                try:
                    ipaddress.ip_interface(addr)
                    if "/" not in str(addr):
                        raise ValueError
                except ValueError:
                    report.error("network-config", f"{path}.addresses.{i}",
                                 f"{addr!r} is not an address with a prefix such as 10.1.1.11/24")
            if kind == "wifis":
                aps = cfg.get("access-points")
                if not isinstance(aps, dict) or not aps:
                    report.error("network-config", f"{path}.access-points", "must name at least one network")


def _seed_role(config):
    """The role the seed's agent config names (None when there is none or it is unreadable)."""
    for entry in config.get("write_files") or ():
        if isinstance(entry, dict) and entry.get("path") == "/etc/pibake/agent.json":
            try:
                return json.loads(entry.get("content") or "{}").get("role")
            except (ValueError, AttributeError):
                return None
    return None


def _check_sensor_wifi(config, seed, report):
    """A sensor node is usually a Pi Zero (W / 2 W): Wi-Fi only. Without Wi-Fi settings it can only join over a
    USB Ethernet adapter, which is rarely what was meant."""
    if _seed_role(config) != "sensor":
        return
    try:
        net = yaml.safe_load(seed.network_config) or {}
    except yaml.YAMLError:
        return  # reported by _check_network_config
    net = net.get("network", net) if isinstance(net, dict) else {}
    if isinstance(net, dict) and not net.get("wifis"):
        report.warn("network-config", "network.wifis",
                    "a sensor node without Wi-Fi settings: a Pi Zero W / Zero 2 W has no Ethernet port, so it "
                    "would never reach the cluster; add them with `pibake init --wifi-ssid NAME --wifi-country CC` "
                    "(cluster.yaml wifi:) and render again, or ignore this for a wired sensor node")


def lint_seed(seed, *, hostname=None, family=None, schema_file="auto"):
    """Return a ``LintReport`` (errors, warnings) for a ``pibake.model.Seed``.

    ``hostname``: the host the seed is for (checked against user-data and meta-data). ``family``: the image
    family (raspios/ubuntu) whose network renderer the seed must use. ``schema_file``: the cloud-config JSON
    schema; "auto" finds the installed cloud-init's (see the module docstring), None skips it with a warning.
    """
    report = LintReport()
    path = find_cloud_init_schema() if schema_file == "auto" else schema_file
    config = _check_user_data(seed, report)
    if path is None:
        report.warn("seed", "", NO_SCHEMA_WARNING)
    elif config is not None:
        schema = _load_schema(str(path))
        report.schema_file = str(path)
        schema_check(config, schema, report)
        known = _known_top_level_keys(schema)
        for key in config:
            if key not in known:
                report.warn("user-data", str(key), "is not a key cloud-init knows: it will be ignored")
    meta = _check_meta_data(seed, report)
    if config is not None:
        name = config.get("hostname")
        if meta.get("local-hostname") is not None and name != meta.get("local-hostname"):
            report.error("user-data", "hostname",
                         f"{name!r} differs from meta-data local-hostname {meta.get('local-hostname')!r}")
        if hostname is not None and name != hostname:
            report.error("user-data", "hostname", f"is {name!r}, expected {hostname!r}")
    _check_network_config(seed, report, family)
    if config is not None:
        _check_sensor_wifi(config, seed, report)

    sizes = {name: len(text.encode("utf-8")) for name, text in seed.files().items()}
    total = sum(sizes.values())
    detail = ", ".join(f"{n} {s // 1024} KiB" for n, s in sizes.items())
    if total > SIZE_MAX:
        report.error("seed", "", f"is {total // 1024} KiB ({detail}); a pibake seed must stay under "
                                 f"{SIZE_MAX // 1024} KiB: something too big was embedded")
    elif total > SIZE_WARN:
        report.warn("seed", "", f"is {total // 1024} KiB ({detail}), unusually large (over {SIZE_WARN // 1024} KiB)")
    for problem in report.errors:
        LOG.debug("lint error: %s", problem)
    return report


def lint_seed_dir(directory, **options):
    """Lint the three files of a seed directory (as written by ``pibake render``)."""
    directory = Path(directory)
    texts = {}
    for name in ("user-data", "meta-data", "network-config"):
        try:
            texts[name] = (directory / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            texts[name] = ""
    meta = yaml.safe_load(texts["meta-data"] or "{}") or {}
    iid = meta.get("instance-id", "") if isinstance(meta, dict) else ""
    seed = Seed(texts["user-data"], texts["meta-data"], texts["network-config"], iid)
    return lint_seed(seed, **options)
