"""Cluster secrets: CA, registry server certificate, join token, munge key, admin credential, manager ssh key.

Layout under ``<cluster>/secrets/`` (directory 0700)::

    ca.key            0400  CA private key (ECDSA P-256)
    ca.crt            0444  CA certificate (public; shipped in every seed)
    registry.key      0400  registry TLS key
    registry.crt      0444  registry TLS certificate, SAN = manager name + IP
    join-token.json   0400  {"token", "created", "expires"}
    munge.key         0400  1024 random bytes
    admin-password    0400  the registry admin password (user "admin")
    manager-ssh.key   0400  the manager's ssh identity (ed25519, OpenSSH format): the registry's verify and
                            deploy jobs log in to the nodes with it
    manager-ssh.key.pub 0444  its public key; every node's seed (and `pibake deploy`) authorizes it for the
                            cluster user, only from the manager's IP (``bake.seed.manager_key_line``)

The join token has the k3s-like form ``K10<sha256 of the CA cert DER>::<id>.<secret>``:
a node can check the registry's CA against the hash *before* it sends anything.
Nothing here logs a secret or puts one in an error message.
"""

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets as _random
import string
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pibake.errors import SecretsError
from pibake.files import atomic_write
from pibake.model import SeedSecrets

LOG = logging.getLogger(__name__)

SECRET_NAMES = ("ca", "registry-cert", "join-token", "munge-key", "admin", "manager-ssh-key")
MANAGER_SSH_KEY = "manager-ssh.key"
ADMIN_USER = "admin"
DEFAULT_TOKEN_TTL = dt.timedelta(days=7)
MUNGE_KEY_BYTES = 1024
TOKEN_RE = re.compile(r"^K10(?P<ca_hash>[0-9a-f]{64})::(?P<id>[a-z0-9]{6})\.(?P<secret>[a-z0-9]{32})$")

# Pis have no RTC: on first boot the clock may sit at the image's build date until NTP
# answers. Certificates are therefore valid from a fixed date in the past, not from "now".
NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
_ALNUM = string.ascii_lowercase + string.digits


def secrets_dir(cluster_dir):
    return Path(cluster_dir) / "secrets"


@dataclass(frozen=True)
class JoinToken:
    token: str
    created: dt.datetime
    expires: dt.datetime

    def expired(self, now=None):
        now = now or dt.datetime.now(dt.timezone.utc)
        return now >= self.expires


# --------------------------------------------------------------------------- files


def write_private(path, data, mode=0o400):
    """Write ``data`` atomically with ``mode``; the file never exists with looser permissions."""
    atomic_write(path, data, mode)


def _ensure_dir(cluster_dir):
    sdir = secrets_dir(cluster_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sdir, 0o700)
    return sdir


# --------------------------------------------------------------------------- CA + certs


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_ca(cluster_name):
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pibake CA {cluster_name}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert, manager, manager_ip, extra_names=()):
    key = _new_key()
    sans = [x509.DNSName(manager)]
    ips = [manager_ip]
    for extra in extra_names:
        try:
            ips.append(str(ipaddress.ip_address(extra)))
        except ValueError:
            sans.append(x509.DNSName(extra))
    for ip in dict.fromkeys(ips):
        sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, manager)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def ca_fingerprint(ca_cert_pem):
    """sha256 (hex) of the CA certificate in DER form: what the join token pins."""
    if isinstance(ca_cert_pem, str):
        ca_cert_pem = ca_cert_pem.encode()
    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --------------------------------------------------------------------------- join token


def make_join_token(ca_cert_pem):
    """A fresh join token string pinned to ``ca_cert_pem``."""
    token_id = "".join(_random.choice(_ALNUM) for _ in range(6))
    secret = "".join(_random.choice(_ALNUM) for _ in range(32))
    return f"K10{ca_fingerprint(ca_cert_pem)}::{token_id}.{secret}"


def parse_join_token(token):
    """Split a token into (ca_hash, token_id, secret). Raises SecretsError without echoing it."""
    m = TOKEN_RE.match(token.strip() if isinstance(token, str) else "")
    if not m:
        raise SecretsError(
            "the join token is malformed: expected K10<64 hex>::<6 chars>.<32 chars> "
            "(get the current one with `pibake token show`)"
        )
    return m.group("ca_hash"), m.group("id"), m.group("secret")


def _write_join_token(cluster_dir, ca_pem, ttl):
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    record = {
        "token": make_join_token(ca_pem),
        "created": now.isoformat(),
        "expires": (now + ttl).isoformat(),
    }
    write_private(secrets_dir(cluster_dir) / "join-token.json", json.dumps(record, indent=2) + "\n")


def load_join_token(cluster_dir):
    path = secrets_dir(cluster_dir) / "join-token.json"
    try:
        record = json.loads(path.read_text())
        return JoinToken(
            token=record["token"],
            created=dt.datetime.fromisoformat(record["created"]),
            expires=dt.datetime.fromisoformat(record["expires"]),
        )
    except FileNotFoundError:
        raise SecretsError(f"{path} is missing: run `pibake init` first") from None
    except (ValueError, KeyError) as exc:
        raise SecretsError(f"{path} is damaged ({type(exc).__name__}); run `pibake token rotate`") from None


def rotate_join_token(cluster_dir, ttl=DEFAULT_TOKEN_TTL):
    """Replace the join token with a new one valid for ``ttl``. Returns the new JoinToken."""
    ca_pem = (secrets_dir(cluster_dir) / "ca.crt").read_text()
    _write_join_token(cluster_dir, ca_pem, ttl)
    LOG.info("join token rotated; valid for %s", ttl)
    return load_join_token(cluster_dir)


def check_join_token(cluster_dir, presented, now=None):
    """True when ``presented`` is the current, unexpired join token (constant-time compare)."""
    current = load_join_token(cluster_dir)
    if not isinstance(presented, str):
        return False
    same = hmac.compare_digest(presented.strip().encode(), current.token.encode())
    return same and not current.expired(now)


# --------------------------------------------------------------------------- Wi-Fi


def wpa_psk(ssid, passphrase):
    """The WPA2 pre-shared key (64 hex digits) for ``ssid`` and ``passphrase`` (IEEE 802.11i)."""
    if not 8 <= len(passphrase) <= 63:
        raise SecretsError("a WPA passphrase has 8 to 63 characters")
    if not 1 <= len(ssid.encode()) <= 32:
        raise SecretsError("an SSID has 1 to 32 bytes")
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


# --------------------------------------------------------------------------- the manager's ssh identity


def _make_manager_ssh_key(cluster_name):
    """(private key in OpenSSH format, public key line) of a new ed25519 key named pibake-manager@<cluster>."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + f" pibake-manager@{cluster_name}\n"


def manager_ssh_key_path(cluster_dir):
    """The manager's private ssh key (on the manager: what the registry's jobs log in to nodes with)."""
    return secrets_dir(cluster_dir) / MANAGER_SSH_KEY


def manager_ssh_public_key(cluster_dir):
    """The manager's public ssh key line (``ssh-ed25519 AAAA... pibake-manager@<cluster>``)."""
    path = secrets_dir(cluster_dir) / f"{MANAGER_SSH_KEY}.pub"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SecretsError(f"{path} is missing: run `pibake init` again with this cluster's options (it adds "
                           "missing secrets and keeps the others)") from None


# --------------------------------------------------------------------------- all of them


def ensure_secrets(cluster_dir, cluster_name, manager, manager_ip, *, rotate=(), extra_names=()):
    """Create every missing secret; replace those named in ``rotate`` (or all with ``rotate=True``).

    Existing secrets are never overwritten unless asked. Returns {name: "created"|"kept"|"rotated"}.
    Rotating the CA also re-issues the registry certificate and the join token (both depend on it).
    """
    if rotate is True:
        rotate = set(SECRET_NAMES)
    rotate = set(rotate)
    unknown = rotate - set(SECRET_NAMES)
    if unknown:
        raise SecretsError(f"unknown secret(s) to rotate: {', '.join(sorted(unknown))}; "
                           f"choose from {', '.join(SECRET_NAMES)}")
    if "ca" in rotate:
        rotate |= {"registry-cert", "join-token"}
    sdir = _ensure_dir(cluster_dir)
    result = {}

    def status(name, exists):
        if name in rotate:
            return "rotated" if exists else "created"
        return "kept" if exists else "created"

    # CA
    ca_key_path, ca_crt_path = sdir / "ca.key", sdir / "ca.crt"
    result["ca"] = status("ca", ca_key_path.exists() and ca_crt_path.exists())
    if result["ca"] != "kept":
        ca_key, ca_cert = _make_ca(cluster_name)
        write_private(ca_key_path, key_pem(ca_key))
        write_private(ca_crt_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o444)
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_pem = ca_crt_path.read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)

    # registry server cert; re-issued too when the manager's name or IP changed
    reg_key_path, reg_crt_path = sdir / "registry.key", sdir / "registry.crt"
    exists = reg_key_path.exists() and reg_crt_path.exists()
    if exists and "registry-cert" not in rotate and not cert_names_match(reg_crt_path, manager, manager_ip):
        rotate.add("registry-cert")
    result["registry-cert"] = status("registry-cert", exists)
    if result["registry-cert"] != "kept":
        key, cert = make_server_cert(ca_key, ca_cert, manager, manager_ip, extra_names)
        write_private(reg_key_path, key_pem(key))
        write_private(reg_crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o444)

    # join token
    tok_path = sdir / "join-token.json"
    result["join-token"] = status("join-token", tok_path.exists())
    if result["join-token"] != "kept":
        _write_join_token(cluster_dir, ca_pem.decode(), DEFAULT_TOKEN_TTL)

    # munge key
    munge_path = sdir / "munge.key"
    result["munge-key"] = status("munge-key", munge_path.exists())
    if result["munge-key"] != "kept":
        write_private(munge_path, os.urandom(MUNGE_KEY_BYTES))

    # admin credential
    admin_path = sdir / "admin-password"
    result["admin"] = status("admin", admin_path.exists())
    if result["admin"] != "kept":
        write_private(admin_path, new_password() + "\n")

    # the manager's ssh identity (a cluster made before it existed gets it on its next `pibake init`)
    key_path, pub_path = sdir / MANAGER_SSH_KEY, sdir / f"{MANAGER_SSH_KEY}.pub"
    result["manager-ssh-key"] = status("manager-ssh-key", key_path.exists() and pub_path.exists())
    if result["manager-ssh-key"] != "kept":
        private, public = _make_manager_ssh_key(cluster_name)
        write_private(key_path, private)
        write_private(pub_path, public, 0o444)

    for name, what in result.items():
        LOG.info("secret %s: %s", name, what)
    return result


def cert_names_match(cert_path, manager, manager_ip):
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return manager in san.get_values_for_type(x509.DNSName) and ipaddress.ip_address(
        manager_ip
    ) in san.get_values_for_type(x509.IPAddress)


def admin_password(cluster_dir):
    path = secrets_dir(cluster_dir) / "admin-password"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SecretsError(f"{path} is missing: run `pibake init` first") from None


def munge_key(cluster_dir):
    path = secrets_dir(cluster_dir) / "munge.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SecretsError(f"{path} is missing: run `pibake init` first") from None


def munge_key_b64(cluster_dir):
    return base64.b64encode(munge_key(cluster_dir)).decode()


def ca_cert_pem(cluster_dir):
    path = secrets_dir(cluster_dir) / "ca.crt"
    try:
        return path.read_text()
    except FileNotFoundError:
        raise SecretsError(f"{path} is missing: run `pibake init` first") from None


def seed_secrets(cluster_dir, now=None):
    """What a seed carries: the current join token, the CA certificate, the manager's public ssh key.

    Refuses an expired token: a card burned with it could never enrol.
    """
    token = load_join_token(cluster_dir)
    if token.expired(now):
        raise SecretsError(
            f"the join token expired at {token.expires.isoformat()}; "
            "run `pibake token rotate` before burning or deploying"
        )
    return SeedSecrets(join_token=token.token, ca_cert_pem=ca_cert_pem(cluster_dir),
                       manager_ssh_key=manager_ssh_public_key(cluster_dir))


def check_permissions(cluster_dir):
    """Raise SecretsError listing every secret whose permissions are looser than they must be."""
    sdir = secrets_dir(cluster_dir)
    problems = []
    if sdir.exists() and sdir.stat().st_mode & 0o077:
        problems.append(f"{sdir} is {oct(sdir.stat().st_mode & 0o777)}, must be 0700")
    for name in ("ca.key", "registry.key", "join-token.json", "munge.key", "admin-password", MANAGER_SSH_KEY,
                 "mqtt.key", "mqtt-admin-password"):
        path = sdir / name
        if path.exists() and path.stat().st_mode & 0o077:
            problems.append(f"{path} is {oct(path.stat().st_mode & 0o777)}, must be 0400")
    if problems:
        raise SecretsError("unsafe permissions: " + "; ".join(problems) + " (fix with chmod)")


# Files of the cluster directory that the manager needs to run the registry. The CA *key* is
# not among them: it stays on the machine that ran `pibake init`.
MANAGER_BUNDLE_FILES = (
    "cluster.yaml",
    "secrets/ca.crt",
    "secrets/registry.crt",
    "secrets/registry.key",
    "secrets/join-token.json",
    "secrets/munge.key",
    "secrets/admin-password",
    f"secrets/{MANAGER_SSH_KEY}",  # the registry's jobs ssh to the nodes with it
    f"secrets/{MANAGER_SSH_KEY}.pub",  # deploy jobs authorize it on the nodes they set up
)


# Shipped to the manager when they exist: the MQTT broker's certificate, key and admin password
# (made by `pibake init` when cluster.yaml enables mqtt; pibake.mqtt).
MANAGER_BUNDLE_OPTIONAL = ("secrets/mqtt.crt", "secrets/mqtt.key", "secrets/mqtt-admin-password")


def manager_bundle(cluster_dir):
    """{relative path: bytes} of what the manager's registry needs from the cluster directory."""
    bundle = {rel: (Path(cluster_dir) / rel).read_bytes() for rel in MANAGER_BUNDLE_OPTIONAL
              if (Path(cluster_dir) / rel).exists()}
    for rel in MANAGER_BUNDLE_FILES:
        path = Path(cluster_dir) / rel
        try:
            bundle[rel] = path.read_bytes()
        except FileNotFoundError:
            raise SecretsError(f"{path} is missing: run `pibake init` (again, with this cluster's options: it adds "
                               "missing secrets and keeps the others)") from None
    return bundle


def new_password():
    """A random password (24 bytes, URL-safe base64): the admin's and the MQTT broker's users'."""
    return _random.token_urlsafe(24)


def ensure_mqtt_secrets(cluster_dir, manager, manager_ip, *, rotate=False):
    """Create the broker's certificate (issued by the cluster CA, SAN = manager name + IP) and key, and the
    admin password, when missing (or ``rotate``). Returns {name: "created"|"kept"|"rotated"}."""
    sdir = secrets_dir(cluster_dir)
    ca_key_path, ca_crt_path = sdir / "ca.key", sdir / "ca.crt"
    key_path, crt_path, admin_path = sdir / "mqtt.key", sdir / "mqtt.crt", sdir / "mqtt-admin-password"
    result = {}
    exists = key_path.exists() and crt_path.exists()
    if exists and not rotate and issued_by(crt_path, ca_crt_path) \
            and cert_names_match(crt_path, manager, manager_ip):
        result["mqtt-cert"] = "kept"
    else:
        if not ca_key_path.exists():
            raise SecretsError(f"{ca_key_path} is missing: the MQTT broker's certificate is issued by the cluster "
                               "CA; run this where `pibake init` made the cluster")
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_crt_path.read_bytes())
        key, cert = make_server_cert(ca_key, ca_cert, manager, manager_ip)
        write_private(key_path, key_pem(key))
        write_private(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o444)
        result["mqtt-cert"] = "rotated" if exists else "created"
    if admin_path.exists() and not rotate:
        result["mqtt-admin"] = "kept"
    else:
        result["mqtt-admin"] = "rotated" if admin_path.exists() else "created"
        write_private(admin_path, new_password() + "\n")
    for name, what in result.items():
        LOG.info("secret %s: %s", name, what)
    return result


def issued_by(cert_path, ca_path):
    """True when the certificate at ``cert_path`` is signed by the CA at ``ca_path`` (a rotated CA: re-issue)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(Path(ca_path).read_bytes()))
    except (ValueError, TypeError, OSError, InvalidSignature):
        return False
    return True
