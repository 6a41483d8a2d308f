"""One validator per field: hostname, IPv4 address, network, locale, time zone, Wi-Fi settings, user name, ...

Every place that accepts one of these values (cluster.yaml, seed rendering, the registry's REST bodies, the
CLI options) asks the ``Field`` here, so they accept and refuse exactly the same values with one message
(tests/test_fields.py shows it with generated input). A field whose rule is a regular expression publishes it
as ``pattern``, which registry/openapi.json repeats (a test holds the two equal). Rules and why they are what
they are: docs/cluster-yaml.md.
"""

import base64
import ipaddress
import re
import unicodedata
import zoneinfo
from dataclasses import dataclass
from typing import Callable, Optional

from pibake.errors import ConfigError


def anchored(body):
    """A pattern matching exactly ``body``, read alike by Python's ``re.search`` (JSON Schema validators
    use it) and by ECMA-262: Python's ``$`` also matches before a final newline, ``(?!\\n)`` refuses it."""
    return f"^{body}$(?!\\n)"


@dataclass(frozen=True)
class Field:
    """One kind of value: ``accepts(normalise(value))`` decides; ``problem`` says why not, in one message."""

    name: str
    what: str  # completes "<value> is not ..."
    accepts: Callable[[object], bool]
    normalise: Callable[[object], object] = lambda value: value
    pattern: Optional[str] = None  # the rule as a JSON Schema pattern, when it is one
    secret: bool = False  # never echo the value (a PSK is as good as the passphrase)

    def problem(self, value):
        """None when ``value`` is valid, else the field's one message (naming the value unless secret)."""
        if self.accepts(self.normalise(value)):
            return None
        return f"{'<hidden>' if self.secret else show(value)} is not {self.what}"

    def valid(self, value):
        return self.problem(value) is None

    def check(self, value, where):
        """``value`` normalised, or ConfigError ``"<where>: <problem>"``."""
        problem = self.problem(value)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        return self.normalise(value)


def show(value, limit=80):
    """A value for a message: repr (control characters show as escapes), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _text(test):
    """``test`` for strings; anything else (a YAML number, None) is refused."""
    return lambda value: isinstance(value, str) and test(value)


def _regex(pattern, extra=lambda value: True):
    compiled = re.compile(pattern)
    return _text(lambda value: compiled.search(value) is not None and extra(value))


def _lower(value):
    return value.lower() if isinstance(value, str) else value


def _upper(value):
    return value.upper() if isinstance(value, str) else value


# ----------------------------------------------------------------------------- names

# RFC 1123 label in lower case (a hostname, never an FQDN). All digits is refused: Slurm and resolvers read
# such a name as a number/address. "admin" is the registry's administrator account (HTTP Basic user name).
HOSTNAME_PATTERN = anchored(r"(?![0-9]+$)(?!admin$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
HOSTNAME = Field(
    "hostname",
    "a valid hostname (RFC 1123 label: 1-63 lower-case letters, digits and '-', not starting or ending with "
    "'-', not all digits, not 'admin')",
    _regex(HOSTNAME_PATTERN), pattern=HOSTNAME_PATTERN)

CLUSTER_NAME_MAX = 40  # Slurm's ClusterName and the CA's common name carry it
CLUSTER_NAME = Field(
    "cluster name",
    f"a valid cluster name (a hostname of at most {CLUSTER_NAME_MAX} characters: lower-case letters, digits "
    "and '-', not all digits)",
    lambda value: HOSTNAME.valid(value) and len(value) <= CLUSTER_NAME_MAX)

# Debian's adduser NAME_REGEX (lower case, start with a letter or _), 32 characters (utmp).
USERNAME_PATTERN = anchored(r"[a-z_][a-z0-9_-]{0,31}")
RESERVED_USERS = frozenset({"root", "daemon", "bin", "sys", "nobody", "munge", "slurm", "sshd"})
USERNAME = Field(
    "user name",
    "a valid user name (1-32 of a-z 0-9 _ -, starting with a letter or _; not a system account such as "
    f"{', '.join(sorted(RESERVED_USERS))})",
    _regex(USERNAME_PATTERN, lambda value: value not in RESERVED_USERS))

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A DNS name: RFC 1123 labels, at most 253 characters, no trailing dot; the last label is not all digits
# (RFC 3696: no numeric top-level domain), so a mistyped address such as 10.1.1.300 is not taken for a name.
DNS_NAME_PATTERN = anchored(rf"(?=.{{1,253}}$)({_LABEL}\.)*(?![0-9]+$){_LABEL}")


# ----------------------------------------------------------------------------- addresses

def _is_ipv4(value):
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _is_ip(value):
    """IPv4 or IPv6 without a zone (as JSON Schema's ipv4/ipv6 formats read them)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return not getattr(address, "scope_id", None)


# A MAC address as ip(8) and the kernel print it, or with '-' (Windows); stored with ':' in lower case.
MAC_PATTERN = anchored(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}")
MAC = Field("MAC address", "a MAC address (e.g. dc:a6:32:01:02:03)", _regex(MAC_PATTERN),
            normalise=lambda value: value.lower().replace("-", ":") if isinstance(value, str) else value,
            pattern=MAC_PATTERN)

IPV4 = Field("IPv4 address", "an IPv4 address (e.g. 10.1.1.10)", _text(_is_ipv4))
IP_ADDRESS = Field("IP address", "an IPv4 or IPv6 address", _text(_is_ip))

MAX_PREFIX = 30  # a /31 or /32 has no room for a manager and a worker


def _is_network(value):
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError:
        return False
    return network.prefixlen <= MAX_PREFIX


def _network_text(value):
    try:
        return str(ipaddress.IPv4Network(value, strict=True)) if isinstance(value, str) else value
    except ValueError:
        return value


NETWORK = Field(
    "network",
    f"an IPv4 network in CIDR form, host bits clear, /{MAX_PREFIX} or larger (e.g. 10.1.1.0/24)",
    _text(_is_network), normalise=_network_text)

HOST = Field(
    "host", "an IPv4 address or a DNS host name",
    _text(lambda value: _is_ipv4(value) or re.search(DNS_NAME_PATTERN, value) is not None))


# ----------------------------------------------------------------------------- locale and time

# glibc locale names: C, POSIX or language[_TERRITORY], then [.codeset][@modifier] (en_US.UTF-8, sr_RS@latin).
LOCALE_PATTERN = anchored(r"(?=.{1,64}$)(C|POSIX|[a-z]{2,3}(_[A-Z]{2})?)(\.[A-Za-z0-9-]+)?(@[a-z]+)?")
LOCALE = Field("locale", "a locale name (e.g. C.UTF-8, en_US.UTF-8)", _regex(LOCALE_PATTERN),
               pattern=LOCALE_PATTERN)

TIMEZONE_PATTERN = anchored(r"(?=.{1,64}$)[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")


def _known_zone(name):
    """A zone of the IANA database this machine has (the nodes' tzdata has the same names)."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


TIMEZONE = Field("time zone", "a known time zone (e.g. Europe/Berlin, Etc/UTC)",
                 _regex(TIMEZONE_PATTERN, _known_zone))


# ----------------------------------------------------------------------------- Wi-Fi

# ISO 3166-1 alpha-2 (all 249 assigned codes), for the Wi-Fi regulatory country.
ISO3166_ALPHA2 = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS
    BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE
    EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM
    HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC
    LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA
    NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO
    TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW""".split()
)
COUNTRY = Field("country code", "an ISO 3166 country code (e.g. DE, US, GB)",
                lambda value: value in ISO3166_ALPHA2, normalise=_upper)

# The WPA PSK as wpa_supplicant and NetworkManager take it: 64 hex digits (either case; stored in lower case).
PSK_PATTERN = anchored(r"[0-9a-fA-F]{64}")
PSK = Field("WPA PSK", "a WPA PSK: 64 hex digits (`pibake init --wifi-ssid ...` computes it from the passphrase)",
            _regex(PSK_PATTERN), normalise=_lower, pattern=PSK_PATTERN, secret=True)

# Characters that would break a line-oriented file or are not text: controls, surrogates, line separators.
_UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _is_ssid(value):
    if any(unicodedata.category(c) in _UNPRINTABLE for c in value):
        return False
    return 1 <= len(value.encode("utf-8")) <= 32


SSID = Field("SSID", "an SSID (1 to 32 bytes of UTF-8, no control or line-break characters)", _text(_is_ssid))


# ----------------------------------------------------------------------------- ssh public keys

SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def ssh_key_problem(line):
    """None if ``line`` is one OpenSSH public key line (type, base64 blob naming that type, optional printable
    comment); else why not. The one check of ssh keys: its reasons differ because the fixes do."""
    if not isinstance(line, str) or "\n" in line or "\r" in line:
        return "must be one line"
    if "PRIVATE KEY" in line:
        return "is a private key: give the public key (the .pub file), and keep the private key secret"
    fields = line.strip().split(None, 2)
    if len(fields) < 2:
        return "is not an ssh public key (expected e.g. 'ssh-ed25519 AAAA... comment')"
    kind, blob = fields[0], fields[1]
    if kind not in SSH_KEY_TYPES:
        return f"is not an ssh public key: unknown key type {kind[:40]!r} (expected one of {', '.join(SSH_KEY_TYPES)})"
    try:
        raw = base64.b64decode(blob, validate=True)
    except (ValueError, base64.binascii.Error):
        return "is not an ssh public key: the key data is not base64"
    if len(raw) < 4:
        return "is not an ssh public key: the key data is too short"
    n = int.from_bytes(raw[:4], "big")
    if raw[4 : 4 + n] != kind.encode():
        return f"is not an ssh public key: the key data does not match its type {kind}"
    if not line.isprintable():
        return "contains control or line-break characters"
    return None


FIELDS = {field.name: field for field in (HOSTNAME, CLUSTER_NAME, USERNAME, MAC, IPV4, IP_ADDRESS, NETWORK, HOST,
                                          LOCALE, TIMEZONE, COUNTRY, PSK, SSID)}


def valid_hostname(name):
    """True for a node's hostname (``HOSTNAME``)."""
    return HOSTNAME.valid(name)
