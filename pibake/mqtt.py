"""MQTT on the manager: Mosquitto's configuration, ACL and password file, and the broker's secrets.

Mosquitto runs on the manager when cluster.yaml says ``mqtt: {enabled: true}``. Everything about it that is
data lives here, as pure functions (``broker_conf``, ``broker_acl``, ``hash_password``, ``set_passwords``);
the I/O is at the end (``install_broker`` and ``reload_broker`` on the manager); the broker's certificate and
admin password are made with the cluster's other secrets (``pibake.secrets.ensure_mqtt_secrets``).

Who may do what (``broker_acl``)::

    pibake_admin          reads everything; writes homeassistant/status and cmnd/# (Home Assistant, pibake)
    <node hostname>       writes pibake/<node>/# and homeassistant/sensor/<node>/# only (a ``pattern`` with %u)
    tasmota_<switch>      a Tasmota plug of ``switches:``: cmnd/<topic>/#, stat/<topic>/#, tele/<topic>/#

A node's user name is its hostname (RFC 1123 label: no ``/ + #``, so %u cannot widen a pattern); the
others contain ``_``, which no hostname has, so no node can take the admin's or a plug's name.

Passwords: the admin's is ``secrets/mqtt-admin-password`` (0400), a node's is made by the registry when the
node asks for it (``pibake.registry.mqtt``) and only its hash is kept, in Mosquitto's own ``$7$`` format
(PBKDF2-SHA512, what ``mosquitto_passwd`` writes), so Mosquitto reads the file as if ``mosquitto_passwd``
had made it.
"""

import base64
import fcntl
import hashlib
import hmac
import logging
import os
import pwd
import signal
from contextlib import contextmanager
from pathlib import Path


from pibake import fields
from pibake import secrets as _secrets
from pibake.cluster import load_cluster
from pibake.errors import CommandError, ConfigError, SecretsError
from pibake.files import atomic_write
from pibake.run import run

LOG = logging.getLogger(__name__)

ADMIN_USER = "pibake_admin"
TASMOTA_USER_PREFIX = "tasmota_"

# On the manager
ETC_DIR = "/etc/mosquitto/pibake"  # cert, key, ACL, password file (owner mosquitto, 0700)
CONF_FILE = "/etc/mosquitto/conf.d/pibake.conf"  # Debian's mosquitto.conf includes conf.d
PID_FILE = "/run/mosquitto/mosquitto.pid"  # Debian's mosquitto.conf writes it
NODE_PASSWORD_FILE = "/etc/pibake/mqtt-password"  # on a node: written by the first-boot agent (0400)

# In the cluster directory (secrets/, 0700)
SECRET_FILES = ("secrets/mqtt.crt", "secrets/mqtt.key", "secrets/mqtt-admin-password")

# mosquitto_passwd's parameters (mosquitto 2.x, src/password_mosq.h): PBKDF2-SHA512, 101 rounds, 12-byte
# salt, 64-byte hash, both standard base64.
PBKDF2_ROUNDS = 101
SALT_BYTES = 12


def load_settings(cluster_dir):
    """The ``MqttSettings`` (pibake.model) of the cluster in ``cluster_dir``; cluster.yaml is validated."""
    return load_cluster(cluster_dir).mqtt


def node_settings(cluster, hostname):
    """The ``mqtt`` block of node ``hostname``'s /etc/pibake/sensor.json (SENSORS_CONTRACT.md), no secret in
    it; None when the cluster has no MQTT."""
    settings = cluster.mqtt
    if not settings.enabled:
        return None
    return {"host": cluster.manager, "port": settings.port, "ca_cert": "/etc/pibake/ca.crt", "username": hostname,
            "password_file": NODE_PASSWORD_FILE, "discovery_prefix": settings.discovery_prefix,
            "base": settings.base}


def valid_node_user(name):
    """True when ``name`` may be an MQTT node user: a hostname, never a reserved (``_``) name."""
    return fields.HOSTNAME.valid(name)


def tasmota_user(switch_name):
    return TASMOTA_USER_PREFIX + switch_name


# --------------------------------------------------------------------------- passwords (pure)


def hash_password(password, salt=None, rounds=PBKDF2_ROUNDS):
    """``password`` as a Mosquitto password-file hash: ``$7$<rounds>$<salt b64>$<hash b64>``."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, rounds)
    return f"$7${rounds}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password, hashed):
    """True when ``password`` matches a ``$7$`` hash (the check Mosquitto makes)."""
    try:
        _, kind, rounds, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        mine = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(rounds))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(mine, base64.b64decode(digest))


def parse_password_file(text):
    """{user: hash} of a Mosquitto password file (``user:hash`` lines; blank lines and # comments skipped)."""
    entries = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            continue
        user, _, hashed = line.partition(":")
        entries[user] = hashed
    return entries


def set_passwords(text, changes):
    """The password file ``text`` with ``changes`` ({user: hash, or None to remove}) applied; other users'
    lines are kept as they are (the registry's node entries survive a redeploy, and the other way round)."""
    entries = parse_password_file(text)
    for user, hashed in changes.items():
        if ":" in user or "\n" in user:
            raise ValueError(f"not an MQTT user name: {user[:40]!r}")
        if hashed is None:
            entries.pop(user, None)
        else:
            entries[user] = hashed
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))


# --------------------------------------------------------------------------- broker configuration (pure)


def tasmota_topics(switches):
    """{broker user: Tasmota topic} of the ``switches:`` driven over MQTT."""
    return {tasmota_user(s.name): s.mqtt_topic for s in switches if s.driver == "tasmota" and s.mqtt_topic}


def broker_acl(settings, switches=()):
    """Mosquitto's acl_file text. Nodes get ``pattern`` lines (%u is the user name = the node's hostname)."""
    prefix, base = settings.discovery_prefix, settings.base
    lines = [
        "# /etc/mosquitto/pibake/acl: written by pibake (pibake.mqtt.broker_acl, install_broker); re-run that",
        "# rather than edit. Anything not allowed here is refused (a refused publish is dropped silently).",
        "",
        f"user {ADMIN_USER}",
        "topic read #",
        "topic read $SYS/#",
        f"topic write {prefix}/status",  # Home Assistant's birth/last-will message
        "topic write cmnd/#",  # switch Tasmota plugs (pibake switch, Home Assistant)
        "",
    ]
    for user, topic in sorted(tasmota_topics(switches).items()):
        lines += [f"user {user}", f"topic readwrite cmnd/{topic}/#", f"topic readwrite stat/{topic}/#",
                  f"topic readwrite tele/{topic}/#", ""]
    lines += [
        "# every node: its own topics only (the user name is the node's hostname)",
        f"pattern write {base}/%u/#",
        f"pattern write {prefix}/sensor/%u/#",
    ]
    return "\n".join(lines) + "\n"


def broker_conf(settings, etc_dir=ETC_DIR, *, bind_address=None):
    """The Mosquitto drop-in (conf.d/pibake.conf): one TLS listener, no anonymous access, password file, ACL."""
    etc = Path(etc_dir)
    listener = f"listener {settings.port}" + (f" {bind_address}" if bind_address else "")
    return "\n".join([
        "# /etc/mosquitto/conf.d/pibake.conf: written by pibake (pibake.mqtt.broker_conf, install_broker);",
        "# re-run that rather than edit. TLS with the cluster CA's certificate, passwords, an ACL.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {etc / 'passwd'}",
        f"acl_file {etc / 'acl'}",
        listener,
        "protocol mqtt",
        f"certfile {etc / 'mqtt.crt'}",
        f"keyfile {etc / 'mqtt.key'}",
        "tls_version tlsv1.2",
        "",
    ])


# --------------------------------------------------------------------------- secrets (machine with the CA key)


def admin_password(cluster_dir):
    path = _secrets.secrets_dir(cluster_dir) / "mqtt-admin-password"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SecretsError(f"{path} is missing: enable mqtt in cluster.yaml and run `pibake init` again (it adds "
                           "missing secrets and keeps the others)") from None


# --------------------------------------------------------------------------- on the manager


def mosquitto_ids():
    try:
        entry = pwd.getpwnam("mosquitto")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return None


def _write(path, data, mode, owner):
    """Write atomically with ``mode``; owned by ``owner`` (uid, gid) when given and we are root."""
    atomic_write(path, data, mode, owner=owner if owner and os.geteuid() == 0 else None)


@contextmanager
def _locked(etc_dir):
    """One writer of the password file at a time (gunicorn workers, install_broker)."""
    fd = os.open(Path(etc_dir) / ".passwd.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def update_password_file(etc_dir, changes):
    """Apply ``changes`` ({user: hash or None}) to ``<etc_dir>/passwd`` under a lock; returns the new text."""
    etc = Path(etc_dir)
    path = etc / "passwd"
    with _locked(etc):
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        new = set_passwords(text, changes)
        _write(path, new, 0o600, mosquitto_ids())
    return new


def install_broker(cluster_dir, *, switch_passwords=None, etc_dir=ETC_DIR, conf_file=CONF_FILE,
                   bind_address=None):
    """Write the broker's files on the manager from the cluster directory: certificate and key, ACL, the
    conf.d drop-in, and the password-file entries of the admin and of the Tasmota plugs (``switch_passwords``:
    {broker user: password}, from the switches' stored credentials); node entries already there are kept.
    Idempotent. Returns the list of paths written. Mosquitto must then be (re)started or reloaded."""
    cluster = load_cluster(cluster_dir)
    settings = cluster.mqtt
    if not settings.enabled:
        raise ConfigError("MQTT is not enabled in cluster.yaml (mqtt: {enabled: true}); see docs/mqtt.md")
    sdir = _secrets.secrets_dir(cluster_dir)
    missing = [rel for rel in SECRET_FILES if not (Path(cluster_dir) / rel).exists()]
    if missing:
        raise SecretsError(f"missing {', '.join(missing)}: run `pibake init` again where the cluster was made "
                           "(it holds the CA key), then deploy the manager again")
    etc = Path(etc_dir)
    etc.mkdir(parents=True, exist_ok=True)
    owner = mosquitto_ids()
    if owner and os.geteuid() == 0:
        os.chown(etc, *owner)
    os.chmod(etc, 0o700)
    written = []
    for name, mode in (("mqtt.crt", 0o444), ("mqtt.key", 0o400)):
        _write(etc / name, (sdir / name).read_bytes(), mode, owner)
        written.append(str(etc / name))
    _write(etc / "acl", broker_acl(settings, cluster.switches), 0o400, owner)
    written.append(str(etc / "acl"))
    passwords = {ADMIN_USER: admin_password(cluster_dir)}
    for user in tasmota_topics(cluster.switches):
        if (switch_passwords or {}).get(user):
            passwords[user] = switch_passwords[user]
        else:
            LOG.warning("no MQTT password for the plug user %s (`pibake switch credentials %s --mqtt-username "
                        "%s`): the plug cannot log in to the broker", user, user[len(TASMOTA_USER_PREFIX):], user)
    try:
        old = parse_password_file((etc / "passwd").read_text())
    except FileNotFoundError:
        old = {}
    # an entry keeps its hash while the password is the same (no needless change on a redeploy)
    update_password_file(etc, {user: hash_password(password) for user, password in passwords.items()
                               if not (old.get(user) and check_password(password, old[user]))})
    written.append(str(etc / "passwd"))
    Path(conf_file).parent.mkdir(parents=True, exist_ok=True)
    _write(conf_file, broker_conf(settings, etc, bind_address=bind_address), 0o644, None)
    written.append(str(conf_file))
    LOG.info("mosquitto configured in %s (port %d)", etc, settings.port)
    return written


def reload_broker(pid_file=PID_FILE):
    """Make a running Mosquitto re-read its password file and ACL (SIGHUP). Returns how, or None when no
    broker runs (it reads the files when it starts)."""
    try:
        pid = int(Path(pid_file).read_text().strip())
    except (FileNotFoundError, ValueError):
        pid = None
    if pid:
        try:
            os.kill(pid, signal.SIGHUP)
            return "sighup"
        except ProcessLookupError:
            LOG.warning("mosquitto's pid file %s names no running process", pid_file)
    if os.path.isdir("/run/systemd/system"):
        try:
            run(["systemctl", "reload", "mosquitto.service"], timeout=30)
            return "systemctl"
        except CommandError as exc:
            LOG.warning("systemctl reload mosquitto failed: %s", str(exc)[-200:])
    # Debian's mosquitto.conf writes no pid file (its unit is Type=notify): without systemd (the lab, a
    # container) the broker is found by its process name
    signalled = False
    for pid in processes_named("mosquitto"):
        try:
            os.kill(pid, signal.SIGHUP)
            signalled = True
        except ProcessLookupError:
            pass
    if signalled:
        return "sighup"
    LOG.warning("mosquitto is not running: it reads the new password file when it starts")
    return None


def processes_named(name, proc="/proc"):
    """Pids of this PID namespace's processes whose command name (``/proc/PID/comm``) is ``name``."""
    pids = []
    for entry in Path(proc).iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def revoke_node_user(cluster_dir, hostname, etc_dir=ETC_DIR, pid_file=PID_FILE):
    """Remove node ``hostname``'s broker user when the cluster has MQTT (the registry removed the node).
    Returns True when the password file was changed. Never raises for a broker that is not set up here."""
    if not load_cluster(cluster_dir).mqtt.enabled:
        return False
    try:
        text = (Path(etc_dir) / "passwd").read_text()
    except FileNotFoundError:
        return False
    if hostname not in parse_password_file(text):
        return False
    update_password_file(etc_dir, {hostname: None})
    reload_broker(pid_file)
    LOG.info("MQTT user %s removed", hostname)
    return True
