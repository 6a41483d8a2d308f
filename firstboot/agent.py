"""pibake first-boot agent: enrol this machine with the registry and make it a Slurm node.

Contract with the seed (templates/) and the registry:

* installed by cloud-init ``write_files`` at ``/usr/local/lib/pibake/agent.py`` (0755) and run as
  ``python3 /usr/local/lib/pibake/agent.py --config /etc/pibake/agent.json``; also run by
  ``pibake agent run --config FILE``;
* config JSON (0600)::

    {"registry_url": "https://red00:8443", "join_token": "K10...", "ca_cert": "/etc/pibake/ca.crt",
     "hostname": "red01", "role": "worker", "manager": "red00", "manager_ip": "10.1.1.10",
     "credential_file": "/etc/pibake/node-credential", "boot_dir": "/boot/firmware"}

* stdlib + psutil only (HTTPS with http.client + ssl): cloud-init ships this one file to a bare Pi.

Optional config keys (defaults in ``DEFAULTS``):

``join_token_file``   a file holding the join token instead of (or besides) ``join_token``.
``state_file``        JSON the agent keeps between boots (conf server, pinned CA hash; no secret), 0600.
``deadline_s``        how long to keep retrying an unreachable registry or a 5xx (default 900 s: a
                      worker often boots before the manager).
``backoff_base_s``, ``backoff_max_s``   exponential backoff with full jitter between attempts.
``request_timeout_s`` one HTTP request; ``enrol_timeout_s`` the enrolment request (the registry
                      answers once slurmctld runs with the new node: allow for a restart).
``munge_key_file``, ``slurmd_defaults_file``, ``hosts_file``, ``systemd_dropin_dir``   where things go.
``scrub_paths``       files (glob patterns) from which the join token is removed after enrolment.
``services``          "auto" (systemd when it is PID 1, else `service`/direct start), "systemd",
                      "sysv" or "none" (write files only).
``slurmctld_port``    the manager's slurmctld port, when the registry names no conf server (6817).
``mqtt_password_file`` where the node's MQTT broker password goes (0400) when the cluster has MQTT: the
                      agent asks the registry for one (POST /mqtt-credential) when the file is missing or
                      the node just enrolled, unless the munge key answer says ``"mqtt": false`` (an
                      older registry does not say: it asks); a 404 (no MQTT) is fine (docs/mqtt.md).

What the agent removes after a successful enrolment (and only then):

1. the ``join_token`` key of this config file (rewritten atomically, 0600, other keys kept);
2. the file named by ``join_token_file``, if any;
3. every occurrence of the token text in the files matched by ``scrub_paths`` (default: the boot
   partition's ``user-data``, cloud-init's cached copies of it under /var/lib/cloud/instances/*/ and
   /run/cloud-init/instance-data-sensitive.json). Each occurrence is overwritten in place by a marker of
   the same length made of letters, digits and dashes (``pibake-join-token-removed-...``): this keeps
   any YAML scalar (plain, quoted or block), JSON string or pickle length prefix valid, without the
   agent having to parse YAML. The seed must therefore carry the token as text (not b64/gzip).

On later boots the agent uses its per-node credential; it re-enrols only if the registry rejects the
credential and a join token is still present. Exit codes: 0 ready, 1 refused or failed, 2 bad config,
75 the registry stayed unreachable (or the node stayed pending) until the deadline.
"""

import argparse
import base64
import binascii
import errno
import glob
import hashlib
import http.client
import json
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse

import psutil

AGENT_VERSION = "0.1.0"
LOG = logging.getLogger("pibake.firstboot.agent" if __name__ == "__main__" else __name__)

DEFAULTS = {
    "role": "worker",
    "ca_cert": "/etc/pibake/ca.crt",
    "credential_file": "/etc/pibake/node-credential",
    "state_file": "/etc/pibake/agent-state.json",
    "boot_dir": "/boot/firmware",
    "deadline_s": 900,
    "backoff_base_s": 2.0,
    "backoff_max_s": 60.0,
    "request_timeout_s": 15.0,
    "enrol_timeout_s": 180.0,  # an enrolment waits while the manager restarts slurmctld with the new node
    "munge_key_file": "/etc/munge/munge.key",
    "slurmd_defaults_file": "/etc/default/slurmd",
    "hosts_file": "/etc/hosts",
    "systemd_dropin_dir": "/etc/systemd/system/slurmd.service.d",
    "scrub_paths": None,  # None: DEFAULT_SCRUB_PATHS with boot_dir filled in
    "services": "auto",
    "slurmctld_port": 6817,
    "mqtt_password_file": "/etc/pibake/mqtt-password",  # the node's MQTT broker password (docs/mqtt.md)
}
DEFAULT_SCRUB_PATHS = (
    "{boot_dir}/user-data",
    "/var/lib/cloud/instances/*/user-data.txt",
    "/var/lib/cloud/instances/*/user-data.txt.i",
    "/var/lib/cloud/instances/*/cloud-config.txt",
    "/var/lib/cloud/instances/*/obj.pkl",
    "/run/cloud-init/instance-data-sensitive.json",
)
TOKEN_RE = re.compile(r"^K10(?P<ca_hash>[0-9a-f]{64})::(?P<id>[a-z0-9]{6})\.(?P<secret>[a-z0-9]{32})$")
TOKEN_MARKER = "pibake-join-token-removed-after-enrolment-"
SLURMD_DROPIN = (
    "# Written by the pibake agent: slurmd runs configless (--conf-server in /etc/default/slurmd),\n"
    "# so there is no /etc/slurm/slurm.conf for the packaged unit's condition to find; and slurmd exits\n"
    "# when the controller is not reachable yet (manager still booting, slurmctld restarting): retry.\n"
    "[Unit]\nConditionPathExists=\nStartLimitIntervalSec=0\n\n[Service]\nRestart=on-failure\nRestartSec=5\n"
)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_TEMPFAIL = 0, 1, 2, 75
# After starting slurmd the agent waits until slurmctld lists this node as registered by that very slurmd
# (``scontrol show node``; see ``Services.confirm_slurmd``), at most this long (and never past the deadline).
SLURMD_REGISTER_TIMEOUT_S = 120
SLURMD_REGISTER_POLL_S = 0.2


class AgentError(Exception):
    """A failure the agent cannot fix by retrying: the message says what is wrong and what to do."""

    exit_code = EXIT_FAILED


class AgentConfigError(AgentError):
    exit_code = EXIT_CONFIG


class RegistryUnreachable(AgentError):
    """The registry did not answer usefully before the deadline."""

    exit_code = EXIT_TEMPFAIL


class Refused(AgentError):
    """The registry answered with a final 4xx."""

    def __init__(self, what, status, error):
        self.status = status
        self.error = error
        super().__init__(f"{what} refused by the registry (HTTP {status}): {error}")


# =========================================================================== facts
# Each fact: a small reader (the I/O) and a pure parser tested on recorded fixtures.


def parse_device_tree_model(raw):
    """``/proc/device-tree/model`` content (bytes, NUL-terminated) -> model string or None."""
    if isinstance(raw, str):
        raw = raw.encode()
    text = raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    return text or None


def parse_cpuinfo_model(text):
    """The ``Model`` line Raspberry Pi kernels add to /proc/cpuinfo, else None."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Model" and value.strip():
            return value.strip()
    return None


def parse_cpuinfo_count(text):
    """Number of ``processor`` entries in /proc/cpuinfo (0 when there are none)."""
    return sum(1 for line in text.splitlines() if line.partition(":")[0].strip() == "processor")


def parse_meminfo_mb(text):
    """MemTotal of /proc/meminfo in MiB, or None."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                kb = int(parts[1])
                unit = parts[2].lower() if len(parts) > 2 else "kb"
                return kb // 1024 if unit == "kb" else kb // (1024 * 1024)
    return None


def parse_slurmd_c(text):
    """``slurmd -C`` output -> {"NodeName": str, "CPUs": int, ..., "UpTime": str}.

    The first line holds the node's topology as key=value pairs; the second ``UpTime=...``.
    Numeric values become ints. Raises ValueError when there is no NodeName line.
    """
    facts = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or "=" not in line:
            continue
        for word in line.split():
            key, sep, value = word.partition("=")
            if not sep:
                continue
            facts[key] = int(value) if value.isdigit() else value
    if "NodeName" not in facts:
        raise ValueError("no NodeName= line in `slurmd -C` output")
    return facts


def parse_os_release(text):
    """/etc/os-release -> dict (shell-style quoting, comments and blank lines ignored)."""
    result = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = re.sub(r'\\([\\$"`])', r"\1", value)
        result[key] = value
    return result


def parse_default_route_iface(text):
    """/proc/net/route -> name of the interface of the default route (lowest metric), or None."""
    best = None
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        iface, dest, flags, metric, mask = cols[0], cols[1], cols[3], cols[6], cols[7]
        try:
            up = int(flags, 16) & 0x1
            metric = int(metric)
        except ValueError:
            continue
        if dest == "00000000" and mask == "00000000" and up:
            if best is None or metric < best[0]:
                best = (metric, iface)
    return best[1] if best else None


def parse_addresses(addrs):
    """{iface: [(family, address), ...]} -> (ips, {iface: mac}).

    ``family`` is "inet", "inet6" or "link" (see ``_psutil_addresses``). IPs: IPv4 first, then global
    IPv6, loopback and link-local left out; MACs: non-zero link-layer addresses.
    """
    v4, v6, macs = [], [], {}
    for iface in sorted(addrs):
        for family, address in addrs[iface]:
            if not address:
                continue
            if family == "inet" and not address.startswith("127."):
                v4.append(address)
            elif family == "inet6":
                addr = address.split("%", 1)[0]
                if addr != "::1" and not addr.lower().startswith("fe80"):
                    v6.append(addr)
            elif family == "link" and address not in ("00:00:00:00:00:00", ""):
                macs.setdefault(iface, address.lower())
    return list(dict.fromkeys(v4 + v6)), macs


def choose_mac(macs, default_iface, ifaces_with_ipv4):
    """The MAC of the default-route NIC; else of the first NIC with an IPv4 address; else any."""
    if default_iface in macs:
        return macs[default_iface]
    for iface in ifaces_with_ipv4:
        if iface in macs:
            return macs[iface]
    return macs[sorted(macs)[0]] if macs else None


def _read(path, binary=False):
    try:
        with open(path, "rb" if binary else "r", **({} if binary else {"encoding": "utf-8", "errors": "replace"})) as fh:
            return fh.read()
    except OSError:
        return None


def _psutil_addresses():
    kinds = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", psutil.AF_LINK: "link"}
    return {
        iface: [(kinds[a.family], a.address) for a in entries if a.family in kinds]
        for iface, entries in psutil.net_if_addrs().items()
    }


def fact_hostname():
    return socket.gethostname().split(".", 1)[0]


def fact_network():
    """(ips, mac) of this machine."""
    addrs = _psutil_addresses()
    ips, macs = parse_addresses(addrs)
    default_iface = parse_default_route_iface(_read("/proc/net/route") or "")
    with_v4 = [i for i in sorted(addrs) if any(f == "inet" and not a.startswith("127.") for f, a in addrs[i])]
    return ips, choose_mac(macs, default_iface, with_v4)


def fact_model():
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        raw = _read(path, binary=True)
        if raw:
            model = parse_device_tree_model(raw)
            if model:
                return model
    model = parse_cpuinfo_model(_read("/proc/cpuinfo") or "")
    if model:
        return model
    product = (_read("/sys/class/dmi/id/product_name") or "").strip()
    return product or f"unknown {os.uname().machine}"


def fact_cpus():
    return parse_cpuinfo_count(_read("/proc/cpuinfo") or "") or psutil.cpu_count() or os.cpu_count() or 1


def fact_memory_mb():
    return parse_meminfo_mb(_read("/proc/meminfo") or "") or psutil.virtual_memory().total // (1024 * 1024)


def fact_slurmd_c():
    """(raw output, parsed dict) of ``slurmd -C``; (None, None) when slurmd is not installed."""
    exe = _which("slurmd")
    if not exe:
        return None, None
    proc = subprocess.run([exe, "-C"], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise AgentError(f"`slurmd -C` failed (exit {proc.returncode}): {_last_line(proc.stderr)}")
    return proc.stdout, parse_slurmd_c(proc.stdout)


def fact_os_release():
    text = _read("/etc/os-release") or _read("/usr/lib/os-release") or ""
    return parse_os_release(text)


def collect_facts(config):
    """Everything the enrolment sends, as the JSON body of POST /enrol (no secret in it)."""
    hostname = fact_hostname()
    wanted = config.get("hostname")
    if wanted and wanted != hostname:
        LOG.warning("config says hostname %s but this machine is %s: enrolling as %s (slurmd uses it)",
                    wanted, hostname, hostname)
    ips, mac = fact_network()
    raw, parsed = fact_slurmd_c()
    return {
        "hostname": hostname,
        "mac": mac,
        "ips": ips,
        "role": config.get("role", "worker"),
        "model": fact_model(),
        "cpus": fact_cpus(),
        "memory_mb": fact_memory_mb(),
        "slurmd_c": raw,
        "slurmd_c_parsed": parsed,
        "os_release": fact_os_release(),
        "agent_version": AGENT_VERSION,
    }


# =========================================================================== pinning


_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----\s+.+?\s+-----END CERTIFICATE-----", re.S)


def ca_sha256(pem_text):
    """sha256 (hex) of the DER form of the first certificate in ``pem_text``."""
    m = _PEM_RE.search(pem_text or "")
    if not m:
        raise ValueError("no PEM certificate found")
    try:
        der = ssl.PEM_cert_to_DER_cert(m.group(0))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"unreadable PEM certificate ({exc})") from None
    return hashlib.sha256(der).hexdigest()


def token_ca_hash(token):
    """The CA hash a join token pins. Raises AgentConfigError (never echoing the token)."""
    m = TOKEN_RE.match(token.strip() if isinstance(token, str) else "")
    if not m:
        raise AgentConfigError(
            "the join token is malformed: expected K10<64 hex>::<6 chars>.<32 chars> "
            "(get the current one with `pibake token show`)"
        )
    return m.group("ca_hash")


def check_pin(ca_pem, token, ca_path="the CA certificate"):
    """Raise AgentError unless the CA certificate hashes to the value pinned in the join token."""
    pinned = token_ca_hash(token)
    try:
        actual = ca_sha256(ca_pem)
    except ValueError as exc:
        raise AgentConfigError(f"{ca_path}: {exc}; the seed must carry the cluster's CA certificate") from None
    if actual != pinned:
        raise AgentError(
            f"CA pin mismatch: {ca_path} has sha256 {actual[:16]}... but the join token pins "
            f"{pinned[:16]}...; the CA certificate and the join token are from different clusters "
            "(re-seed the card or fix the config). Nothing was sent to the registry."
        )
    return actual


# =========================================================================== registry client


class AgentRegistryClient:
    """The registry's REST API (v1) over TLS pinned to one CA file, with retries up to a deadline."""

    def __init__(self, url, ca_file, *, deadline, backoff_base=2.0, backoff_max=60.0, timeout=15.0,
                 once=False, sleep=time.sleep, rand=random.random, clock=time.monotonic):
        self.base = url.rstrip("/") + "/api/v1"
        self.url = url
        self.ca_file = ca_file
        self.deadline = deadline
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.once = once
        self.sleep, self.rand, self.clock = sleep, rand, clock
        self.http = _Https(self.base, ca_file)

    def call(self, method, path, what, *, auth=None, body=None, ok=(200, 201), retry_status=(), timeout=None):
        """Send one request, retrying connection errors and 5xx (and ``retry_status``) with
        exponential backoff and full jitter until the deadline. Returns the response on ``ok``;
        raises Refused on another status, RegistryUnreachable at the deadline, AgentError on TLS."""
        headers = {}
        if isinstance(auth, str):  # a bearer token
            headers["Authorization"] = f"Bearer {auth}"
        elif auth:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self.http.request(method, path, body, headers, timeout or self.timeout)
            except ssl.SSLCertVerificationError as exc:
                raise AgentError(
                    f"TLS check of {self.url} failed: its certificate does not chain to the pinned CA "
                    f"({self.ca_file}) or does not name this address ({_ssl_reason(exc)}); "
                    "no credentials were sent"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                problem = f"cannot reach the registry at {self.url} ({_conn_reason(exc)})"
            else:
                if resp.status_code in ok:
                    return resp
                if resp.status_code >= 500 or resp.status_code == 429 or resp.status_code in retry_status:
                    problem = f"{what}: the registry answered HTTP {resp.status_code} ({error_text(resp)})"
                else:
                    raise Refused(what, resp.status_code, error_text(resp))
            remaining = self.deadline - self.clock()
            if self.once or remaining <= 0:
                raise RegistryUnreachable(f"{problem}; gave up after {attempt} attempt(s)"
                                          + ("" if self.once else " at the deadline"))
            delay = min(remaining, self.rand() * min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
            LOG.warning("%s; attempt %d, retrying in %.1f s (%.0f s left before the deadline)",
                        problem, attempt, delay, remaining)
            self.sleep(delay)


class Response:
    """What the registry answered: ``status_code``, ``reason``, ``content`` (bytes), ``text``, ``json()``."""

    def __init__(self, status_code, reason, content):
        self.status_code, self.reason, self.content = status_code, reason, content

    @property
    def text(self):
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)  # ValueError when it is not JSON


class _Https:
    """HTTPS to the registry with the standard library (http.client + ssl): only the pinned CA file is trusted
    (no system CAs, no proxies from the environment), the certificate must name the host, one keep-alive
    connection reused across requests. (``requests`` cost ~70 ms of CPU per agent run just to import.)"""

    def __init__(self, base, ca_file):
        parts = urllib.parse.urlsplit(base)
        self.host, self.port, self.prefix = parts.hostname, parts.port or 443, parts.path.rstrip("/")
        self.ca_file = ca_file
        self.context = None
        self.conn = None

    def _connect(self, timeout):
        if self.context is None:
            try:
                self.context = ssl.create_default_context(cafile=self.ca_file)  # that file only
            except (OSError, ValueError) as exc:
                raise AgentError(f"{self.ca_file}: cannot load the pinned CA certificate ({exc})") from None
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout)

    def request(self, method, path, body, headers, timeout):
        headers = {"User-Agent": f"pibake-agent/{AGENT_VERSION}", "Accept": "application/json", **headers}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for reuse in (True, False):
            if self.conn is None or not reuse:
                self.close()
                self.conn = self._connect(timeout)
            self.conn.timeout = timeout
            fresh = self.conn.sock is None  # connects (TLS handshake) in request()
            try:
                self.conn.request(method, self.prefix + path, body=data, headers=headers)
                resp = self.conn.getresponse()
                content = resp.read()
            except ssl.SSLCertVerificationError:
                self.close()
                raise
            except (OSError, http.client.HTTPException):  # ssl.SSLError is an OSError
                self.close()
                if reuse and not fresh:
                    continue  # a kept-alive connection the server had closed meanwhile: once more, new one
                raise
            except BaseException:
                self.close()
                raise
            if resp.will_close:
                self.close()
            return Response(resp.status, resp.reason, content)
        raise http.client.RemoteDisconnected("the registry closed the connection")

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


def error_text(resp):
    """The registry's one-line ``{"error": ...}`` message, else the start of the body."""
    try:
        data = resp.json()
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except ValueError:
        pass
    text = (resp.text or "").strip().splitlines()
    return text[0][:200] if text else resp.reason or "no message"


def _ssl_reason(exc):
    text = str(exc)
    m = re.search(r"certificate verify failed: ([^(')\"]+)", text)
    if m:
        return "certificate verify failed: " + m.group(1).strip()
    m = re.search(r"hostname '?[^ ']*'? doesn't match[^\"')]*", text)
    return m.group(0) if m else "TLS handshake failed"


def _conn_reason(exc):
    text = str(exc)
    for pat in (r"Connection refused", r"No route to host", r"Name or service not known",
                r"Temporary failure in name resolution", r"timed out", r"Network is unreachable",
                r"Connection reset by peer", r"RemoteDisconnected"):
        if re.search(pat, text):
            return pat.lower()
    return type(exc).__name__


# =========================================================================== pure file edits


def set_shell_var(text, name, value):
    """Set ``name="value"`` in a shell-style defaults file: replace the first assignment, drop other
    (uncommented) assignments of the same name, or append. Comments and other lines are kept."""
    line_re = re.compile(rf"^\s*(export\s+)?{re.escape(name)}=")
    wanted = f'{name}="{value}"'
    out, done = [], False
    for line in text.splitlines():
        if line_re.match(line):
            if not done:
                out.append(wanted)
                done = True
            continue
        out.append(line)
    if not done:
        out.append(wanted)
    return "\n".join(out) + "\n"


def ensure_hosts_entry(text, name, ip):
    """/etc/hosts with ``ip name``: unchanged when a line already maps ``name`` to ``ip``; otherwise
    ``name`` is taken off lines that map it elsewhere (a line left without names goes) and
    ``ip name`` is appended."""
    lines = text.splitlines()
    for line in lines:
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == ip and name in words[1:]:
            return text if text.endswith("\n") or not text else text + "\n"
    out = []
    for line in lines:
        body, hash_, comment = line.partition("#")
        words = body.split()
        if len(words) >= 2 and name in words[1:]:
            names = [w for w in words[1:] if w != name]
            if not names:
                continue
            line = " ".join([words[0]] + names) + (f" #{comment}" if hash_ else "")
        out.append(line)
    out.append(f"{ip} {name}")
    return "\n".join(out) + "\n"


def scrub_token(data, token):
    """``data`` (bytes) with every occurrence of ``token`` replaced by a same-length inert marker.
    Returns (new bytes, number of occurrences)."""
    needle = token.encode()
    count = data.count(needle)
    if not count:
        return data, 0
    marker = (TOKEN_MARKER * (len(needle) // len(TOKEN_MARKER) + 1))[: len(needle)].encode()
    return data.replace(needle, marker), count


def config_without_token(config):
    return {k: v for k, v in config.items() if k != "join_token"}


# =========================================================================== file I/O


def _user_exists(user):
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def _owner_ids(user):
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise AgentError(f"there is no user {user!r}: is the {user} package installed?") from None
    return pw.pw_uid, pw.pw_gid


def write_file(path, data, mode=0o644, owner=None):
    """Write ``data`` atomically when content, mode or owner differ. Returns True when it changed."""
    if isinstance(data, str):
        data = data.encode()
    uid_gid = _owner_ids(owner) if owner else None
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            same = fh.read() == data
        if same and (st.st_mode & 0o7777) == mode and (uid_gid is None or (st.st_uid, st.st_gid) == uid_gid):
            return False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.pibake-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if uid_gid:
        os.chown(tmp, *uid_gid)
    os.chmod(tmp, mode)
    _replace(tmp, path)
    return True


def _replace(tmp, path):
    """Rename ``tmp`` over ``path``; when ``path`` is a mount point (a bind-mounted /etc/hosts in a
    container or lab host: EBUSY) copy the content in place instead, keeping the target's mode/owner
    set from ``tmp``."""
    try:
        os.replace(tmp, path)
        return
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV):
            os.unlink(tmp)
            raise
    try:
        st = os.stat(tmp)
        with open(tmp, "rb") as src:
            data = src.read()
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, st.st_mode & 0o7777)
    finally:
        os.unlink(tmp)


def _rewrite_same_meta(path, data):
    """Replace ``path``'s content atomically, keeping its mode (works on vfat too)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o600
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.pibake-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.chmod(tmp, mode)
    except OSError:
        pass
    _replace(tmp, path)


def load_config(path):
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise AgentConfigError(f"{path}: no such config file") from None
    except (OSError, ValueError) as exc:
        raise AgentConfigError(f"{path}: not a readable JSON config ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise AgentConfigError(f"{path}: the config must be a JSON object")
    config = dict(DEFAULTS)
    config.update(raw)
    problems = []
    if not str(config.get("registry_url", "")).startswith("https://"):
        problems.append("registry_url must be an https:// URL")
    if config.get("role") not in ("worker", "sensor", "manager"):
        problems.append("role must be worker, sensor or manager")
    for key in ("deadline_s", "backoff_base_s", "backoff_max_s", "request_timeout_s", "enrol_timeout_s"):
        if not isinstance(config.get(key), (int, float)) or config[key] < 0:
            problems.append(f"{key} must be a number >= 0")
    if config.get("services") not in ("auto", "systemd", "sysv", "none"):
        problems.append("services must be auto, systemd, sysv or none")
    if problems:
        raise AgentConfigError(f"{path}: " + "; ".join(problems))
    return raw, config


def _load_token(config):
    token = (config.get("join_token") or "").strip()
    if not token and config.get("join_token_file"):
        token = (_read(config["join_token_file"]) or "").strip()
    return token or None


def _load_state(path):
    text = _read(path)
    try:
        state = json.loads(text) if text else {}
    except ValueError:
        LOG.warning("%s is damaged; starting from an empty state", path)
        state = {}
    return state if isinstance(state, dict) else {}


# =========================================================================== slurmd registration (pure)


def parse_scontrol_node(text):
    """``scontrol show node NAME -o`` (one line of Key=Value words) -> {key: value}."""
    fields = {}
    for word in (text or "").split():
        key, sep, value = word.partition("=")
        if sep and key and key not in fields:
            fields[key] = value
    return fields


def slurm_time(value):
    """A Slurm timestamp (``2026-11-25T17:29:13``, local time) as epoch seconds; 0 for None/Unknown."""
    try:
        return time.mktime(time.strptime(value or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def slurmd_registered(fields, since=0.0):
    """True when slurmctld has this node responding (no ``*``, e.g. ``IDLE``, ``MIXED``, ``DOWN``) and its
    registration came from a slurmd started at ``since`` (epoch s) or later (Slurm keeps whole seconds)."""
    state = fields.get("State", "")
    if not state or "*" in state or "NOT_RESPONDING" in state:
        return False
    return slurm_time(fields.get("SlurmdStartTime")) >= int(since) - 1


# =========================================================================== services


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _last_line(text):
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no error output"


def _run(argv, timeout=60, env=None):
    LOG.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, env=env)
    except FileNotFoundError:
        raise AgentError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise AgentError(f"`{' '.join(argv[:3])}` did not finish within {timeout} s") from None
    return proc


def _check(argv, timeout=60, env=None):
    proc = _run(argv, timeout, env)
    if proc.returncode != 0:
        raise AgentError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                         f"{_last_line(proc.stderr or proc.stdout)}")
    return proc


def systemd_is_pid1():
    """True when systemd manages this machine (sd_booted(): /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system")


def find_processes(name):
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if proc.info["name"] == name and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _wait(predicate, timeout, step=0.1):
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


class Services:
    """Start/restart munge and slurmd: systemctl under systemd, else `service` or a direct start.

    ``ensure(name, restart)`` starts the service when it is not running and restarts it only when
    ``restart`` (its configuration changed). Returns "started", "restarted" or "running".
    """

    def __init__(self, mode="auto", *, deadline=None, backoff_base=2.0, backoff_max=60.0, once=False,
                 sleep=time.sleep, rand=random.random, clock=time.monotonic):
        if mode == "auto":
            mode = "systemd" if systemd_is_pid1() else "sysv"
        self.mode = mode
        self.deadline = deadline
        self.backoff_base, self.backoff_max, self.once = backoff_base, backoff_max, once
        self.sleep, self.rand, self.clock = sleep, rand, clock

    def ensure(self, name, restart=False, options=""):
        if self.mode == "none":
            return "skipped"
        if self.mode == "systemd":
            return self._systemd(name, restart)
        return self._sysv(name, restart, options)

    def _systemd(self, name, restart):
        if _run(["systemctl", "is-enabled", "--quiet", name]).returncode != 0:
            # Only the symlinks: no daemon-reload (a start needs none) and no SysV sync (update-rc.d for an
            # init script systemd ignores). Each cost about half a minute on the emulated Pi (bench/target).
            _check(["systemctl", "enable", "--no-reload", name], env={**os.environ, "SYSTEMCTL_SKIP_SYSV": "1"})
        active = _run(["systemctl", "is-active", "--quiet", name]).returncode == 0
        if active and not restart:
            return "running"
        _check(["systemctl", "restart" if active else "start", name], timeout=120)
        if _run(["systemctl", "is-active", "--quiet", name]).returncode != 0:
            raise AgentError(f"{name} did not stay up: see `journalctl -u {name}`")
        return "restarted" if active else "started"

    def _sysv(self, name, restart, options):
        daemon = {"munge": "munged", "slurmd": "slurmd"}.get(name, name)
        running = find_processes(daemon)
        if running and not restart:
            return "running"
        if running:
            self._stop(daemon, running)
        if name == "munge" and _which("service") and os.path.exists("/etc/init.d/munge"):
            os.makedirs("/run/lock", exist_ok=True)
            _check(["service", "munge", "start"])
        elif name == "munge":
            os.makedirs("/run/munge", exist_ok=True)
            uid, gid = _owner_ids("munge")
            os.chown("/run/munge", uid, gid)
            _check(["runuser", "-u", "munge", "--", _which("munged") or "/usr/sbin/munged"])
        else:
            # Debian's init.d/slurmd exits 0 *without starting* when /etc/slurm/slurm.conf is
            # missing, which is always so in configless mode: start the daemon directly.
            self._start_slurmd([_which(daemon) or f"/usr/sbin/{daemon}"] + options.split())
        if not _wait(lambda: find_processes(daemon), 10):
            raise AgentError(f"{daemon} did not start: see /var/log/{'munge/munged.log' if name == 'munge' else 'slurm/'}")
        return "restarted" if running else "started"

    def _start_slurmd(self, argv):
        """slurmd fetches its config from the controller before it daemonizes and exits 1 when it cannot
        (manager still booting, slurmctld restarting for another node): retry with backoff until the
        deadline."""
        attempt = 0
        while True:
            attempt += 1
            proc = _run(argv, timeout=180)
            if proc.returncode == 0:
                return
            problem = f"`{' '.join(argv)}` failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}"
            remaining = (self.deadline - self.clock()) if self.deadline is not None else 0
            if self.once or remaining <= 0:
                raise AgentError(problem + (f" (gave up after {attempt} attempts)" if attempt > 1 else ""))
            delay = min(remaining, self.rand() * min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
            LOG.warning("%s; attempt %d, retrying in %.1f s", problem, attempt, delay)
            self.sleep(delay)

    def confirm_slurmd(self, hostname, options="", since=None, timeout=SLURMD_REGISTER_TIMEOUT_S):
        """After slurmd was (re)started at ``since`` (epoch s): wait until slurmctld lists ``hostname`` as
        registered by it; without systemd, start slurmd again when it died first. Returns how many times it
        had to be started again.

        Why: a slurmd that starts while slurmctld restarts (the manager adding other nodes) can die before it
        registers (Slurm 22.05.8: SIGSEGV when a reconfigure RPC arrives first; see registry/slurmctl.py).
        Under systemd the unit's Restart=on-failure brings it back; here nothing would. So "ready" means
        "registered", not "a process was spawned". Needs ``scontrol`` (slurm-client) on the node, which reads
        the configless copy in /run/slurm/conf; without it only "still running" is checked."""
        if self.mode == "none":
            return 0
        since = time.time() if since is None else since
        scontrol = _which("scontrol")
        end = self.clock() + timeout
        if self.deadline is not None:
            end = min(end, max(self.deadline, self.clock() + 10))
        restarts = 0
        while True:
            alive = self._slurmd_alive()
            if alive and not scontrol:
                return restarts
            if alive:
                proc = _run([scontrol, "show", "node", hostname, "-o"], timeout=60)
                if proc.returncode == 0 and slurmd_registered(parse_scontrol_node(proc.stdout), since):
                    return restarts
            elif self.mode == "sysv":
                restarts += 1
                LOG.warning("slurmd exited before it registered with slurmctld (see /var/log/slurm/slurmd.log); "
                            "starting it again (%d)", restarts)
                since = time.time()
                self._start_slurmd([_which("slurmd") or "/usr/sbin/slurmd"] + options.split())
                continue
            if self.clock() >= end or self.once:
                state = "is not running" if not alive else "has not registered with slurmctld"
                raise AgentError(f"slurmd {state} {timeout if self.clock() >= end else 0:.0f} s after it was "
                                 "started: see /var/log/slurm/slurmd.log here and slurmctld's log on the manager")
            self.sleep(SLURMD_REGISTER_POLL_S)

    def _slurmd_alive(self):
        if self.mode == "systemd":
            return _run(["systemctl", "is-active", "--quiet", "slurmd"]).returncode == 0
        return bool(find_processes("slurmd"))

    @staticmethod
    def _stop(daemon, procs):
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            LOG.warning("%s (pid %d) ignored SIGTERM; killing it", daemon, proc.pid)
            proc.kill()
        psutil.wait_procs(alive, timeout=5)

    def daemon_reload(self):
        if self.mode == "systemd":
            _check(["systemctl", "daemon-reload"])


# =========================================================================== the agent


class Agent:
    """One run of the agent: enrol (or authenticate), configure munge + slurmd, report."""

    def __init__(self, config_path, *, once=False, services=None, registry=None):
        self.config_path = config_path
        self.raw_config, self.config = load_config(config_path)
        self.once = once
        self.started = time.monotonic()
        self.deadline = self.started + float(self.config["deadline_s"])
        self.services = services or Services(
            self.config["services"], deadline=self.deadline, backoff_base=float(self.config["backoff_base_s"]),
            backoff_max=float(self.config["backoff_max_s"]), once=once)
        self._registry = registry
        self.result = {"hostname": None, "registry": self.config["registry_url"], "status": "error",
                       "enrolment": None, "changed": [], "services": {}, "warnings": [], "message": ""}

    # ---------------------------------------------------------------- helpers
    def registry(self):
        if self._registry is None:
            c = self.config
            self._registry = AgentRegistryClient(
                c["registry_url"], c["ca_cert"], deadline=self.deadline, backoff_base=float(c["backoff_base_s"]),
                backoff_max=float(c["backoff_max_s"]), timeout=float(c["request_timeout_s"]), once=self.once)
        return self._registry

    def _changed(self, path, did_change):
        if did_change:
            self.result["changed"].append(path)
            LOG.info("wrote %s", path)
        return did_change

    # ---------------------------------------------------------------- steps
    def run(self):
        c = self.config
        ca_path = c["ca_cert"]
        ca_pem = _read(ca_path)
        if ca_pem is None:
            raise AgentConfigError(f"{ca_path}: CA certificate missing; the seed must install it")
        state = _load_state(c["state_file"])
        token = _load_token(c)
        credential = (_read(c["credential_file"]) or "").strip() or None

        # 1. pin: with a token, the CA must hash to the token's pin; later boots: to the pin saved then.
        if token:
            ca_hash = check_pin(ca_pem, token, ca_path)
        else:
            try:
                ca_hash = ca_sha256(ca_pem)
            except ValueError as exc:
                raise AgentConfigError(f"{ca_path}: {exc}") from None
            if state.get("ca_sha256") and state["ca_sha256"] != ca_hash:
                raise AgentError(f"CA pin mismatch: {ca_path} changed since enrolment (sha256 {ca_hash[:16]}..., "
                                 f"pinned {state['ca_sha256'][:16]}...); nothing was sent to the registry")
        if not token and not credential:
            raise AgentError(f"nothing to authenticate with: no join token in {self.config_path} and no node "
                             f"credential in {c['credential_file']}; re-seed the card or run `pibake deploy`")
        LOG.info("CA %s pinned (sha256 %s...)", ca_path, ca_hash[:16])

        # 2. name resolution of the manager before the first request (the cert names it).
        if c.get("manager") and c.get("manager_ip"):
            self._changed(c["hosts_file"], write_file(
                c["hosts_file"], ensure_hosts_entry(_read(c["hosts_file"]) or "", c["manager"], c["manager_ip"]),
                mode=0o644))

        facts = collect_facts(c)
        hostname = state.get("hostname") if credential and state.get("hostname") else facts["hostname"]
        self.result["hostname"] = hostname
        LOG.info("facts: %s, %s, %d CPUs, %d MiB, MAC %s, IPs %s", hostname, facts["model"], facts["cpus"],
                 facts["memory_mb"], facts["mac"], ",".join(facts["ips"]) or "-")

        # 3. authenticate: the credential first; enrol with the token when there is none or it is refused.
        munge_resp = None
        if credential:
            try:
                munge_resp = self._fetch_munge_key(hostname, credential, state)
                self.result["enrolment"] = "credential"
                if token:  # e.g. a config rewritten with a token although the node is enrolled
                    self._remove_token(token)
            except Refused as exc:
                if exc.status != 401:
                    raise
                if not token:
                    raise AgentError(
                        f"the registry rejected this node's credential (HTTP 401: {exc.error}); the node was "
                        "probably removed by an admin. Re-enrol it with a fresh join token "
                        "(re-seed the card or run `pibake deploy`)") from None
                LOG.warning("the registry rejected the stored credential; re-enrolling with the join token")
        if munge_resp is None:
            credential, state = self._enrol(facts, token, ca_hash, state)
            hostname = state["hostname"]
            self.result["hostname"] = hostname
            munge_resp = self._fetch_munge_key(hostname, credential, state)
        self._configure(munge_resp, state, hostname, credential)
        # a registry that says the cluster has no MQTT saves the request; an older one says nothing: ask
        if _json(munge_resp, "munge key download").get("mqtt", True) is not False:
            self._mqtt_password(hostname, credential)
        return self.result

    def _enrol(self, facts, token, ca_hash, state):
        c = self.config
        body = {k: v for k, v in facts.items() if k != "slurmd_c_parsed"}
        LOG.info("enrolling %s with %s", facts["hostname"], c["registry_url"])
        resp = self.registry().call("POST", "/enrol", "enrolment", auth=token, body=body, ok=(200, 201),
                                    timeout=max(float(c["enrol_timeout_s"]), float(c["request_timeout_s"])))
        data = _json(resp, "enrolment")
        credential = data.get("credential")
        if not isinstance(credential, str) or not credential:
            raise AgentError("the registry's enrolment answer has no credential; is it a pibake registry (API v1)?")
        write_file(c["credential_file"], credential + "\n", mode=0o600)
        slurm = data.get("slurm") or {}
        state = {
            "hostname": data.get("hostname") or facts["hostname"],
            "status": data.get("status", "enrolled"),
            "ca_sha256": ca_hash,
            "conf_server": slurm.get("conf_server"),
            "manager": slurm.get("manager") or c.get("manager"),
            "manager_ip": slurm.get("manager_ip") or c.get("manager_ip"),
            "registry_url": c["registry_url"],
            "enrolled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_file(c["state_file"], json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)
        self.result["enrolment"] = "new" if resp.status_code == 201 else "re-enrolled"
        LOG.info("enrolled as %s (%s, HTTP %d); credential stored in %s", state["hostname"], state["status"],
                 resp.status_code, c["credential_file"])
        self._remove_token(token)
        return credential, state

    def _remove_token(self, token):
        c = self.config
        removed = []
        if "join_token" in self.raw_config:
            self.raw_config = config_without_token(self.raw_config)
            write_file(self.config_path, json.dumps(self.raw_config, indent=2, sort_keys=True) + "\n", mode=0o600)
            removed.append(self.config_path)
        if c.get("join_token_file") and os.path.exists(c["join_token_file"]):
            os.unlink(c["join_token_file"])
            removed.append(c["join_token_file"])
        patterns = c["scrub_paths"] if c["scrub_paths"] is not None else DEFAULT_SCRUB_PATHS
        seen = set()
        for pattern in patterns:
            for path in sorted(glob.glob(pattern.format(boot_dir=c["boot_dir"]))):
                real = os.path.realpath(path)
                if real in seen or not os.path.isfile(real):
                    continue
                seen.add(real)
                try:
                    with open(real, "rb") as fh:
                        data = fh.read()
                    new, count = scrub_token(data, token)
                    if count:
                        _rewrite_same_meta(real, new)
                        removed.append(path)
                except OSError as exc:
                    msg = f"could not remove the join token from {path} ({exc.strerror}); remove it by hand"
                    LOG.warning("%s", msg)
                    self.result["warnings"].append(msg)
        for path in removed:
            LOG.info("join token removed from %s", path)
        self.result["token_removed_from"] = removed

    def _fetch_munge_key(self, hostname, credential, state):
        pending = state.get("status") == "pending"
        if pending:
            LOG.info("%s is pending approval; waiting for an admin (`pibake registry accept %s`)", hostname, hostname)
        try:
            resp = self.registry().call("GET", "/munge-key", "munge key download", auth=(hostname, credential),
                                        retry_status=(403,) if pending else ())
        except RegistryUnreachable as exc:
            if pending:
                raise RegistryUnreachable(f"still pending approval: {exc}") from None
            raise
        if pending:
            state["status"] = "enrolled"
            write_file(self.config["state_file"], json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)
        return resp

    def _configure(self, munge_resp, state, hostname, credential):
        c = self.config
        try:
            key = base64.b64decode(_json(munge_resp, "munge key download").get("munge_key_b64") or "", validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) < 32:
            raise AgentError("the registry sent no usable munge key")
        conf_server = state.get("conf_server")
        if not conf_server and state.get("manager") and c["role"] == "worker":
            conf_server = f"{state['manager']}:{c['slurmctld_port']}"
        if state.get("manager") and state.get("manager_ip") and state["manager_ip"] != c.get("manager_ip"):
            self._changed(c["hosts_file"], write_file(c["hosts_file"], ensure_hosts_entry(
                _read(c["hosts_file"]) or "", state["manager"], state["manager_ip"]), mode=0o644))
        try:
            if c["role"] != "worker" and not _user_exists("munge"):
                # a sensor or the manager's own seed without munge: nothing to install, nothing to start
                message = f"enrolled; munge is not installed on this {c['role']}"
                LOG.info("%s", message)
                self._report(hostname, credential, "ready", message)
                self.result["status"], self.result["message"] = "ready", message
                return
            key_changed = self._changed(c["munge_key_file"], write_file(c["munge_key_file"], key, 0o400, "munge"))
            if conf_server and c["role"] == "worker":  # only workers are Slurm compute nodes
                options = f"--conf-server {conf_server}"
                slurm_changed = self._changed(c["slurmd_defaults_file"], write_file(
                    c["slurmd_defaults_file"],
                    set_shell_var(_read(c["slurmd_defaults_file"]) or "", "SLURMD_OPTIONS", options), 0o644))
                if self.services.mode == "systemd":
                    dropin = os.path.join(c["systemd_dropin_dir"], "pibake-configless.conf")
                    if self._changed(dropin, write_file(dropin, SLURMD_DROPIN, 0o644)):
                        self.services.daemon_reload()
                        slurm_changed = True
                hosts_changed = c["hosts_file"] in self.result["changed"]
                # A slurmd left running across a new enrolment (the node had been removed in the registry) is
                # unknown to the slurmctld that re-added the node and dies at the registry's next reconfigure
                # like one that started during a restart (see Services.confirm_slurmd): start it afresh.
                enrolled_now = self.result["enrolment"] in ("new", "re-enrolled")
                self.result["services"]["munge"] = self.services.ensure("munge", restart=key_changed)
                since = time.time()
                self.result["services"]["slurmd"] = self.services.ensure(
                    "slurmd", restart=key_changed or slurm_changed or hosts_changed or enrolled_now, options=options)
                if self.result["services"]["slurmd"] in ("started", "restarted"):
                    again = self.services.confirm_slurmd(hostname, options, since=since)
                    if again:
                        self.result["warnings"].append(
                            f"slurmd exited before it registered and was started again ({again}x)")
                message = f"munge {self.result['services']['munge']}, slurmd {self.result['services']['slurmd']} " \
                          f"(conf server {conf_server})"
            else:
                self.result["services"]["munge"] = self.services.ensure("munge", restart=key_changed)
                message = f"munge {self.result['services']['munge']}; no slurmd for role {c['role']}"
        except AgentError as exc:
            self._report(hostname, credential, "error", str(exc))
            raise
        for name, what in self.result["services"].items():
            LOG.info("%s: %s", name, what)
        if self.result["warnings"]:
            message += "; warnings: " + "; ".join(self.result["warnings"])
        self._report(hostname, credential, "ready", message)
        self.result["status"] = "ready"
        self.result["message"] = message

    def _mqtt_password(self, hostname, credential):
        """Fetch this node's MQTT broker password when it has none (or just enrolled: the old one is void).
        A cluster without MQTT answers 404. Never fatal: Slurm and the readings over HTTPS work without it."""
        path = self.config["mqtt_password_file"]
        if not path or (os.path.exists(path) and self.result.get("enrolment") == "credential"):
            return
        try:
            resp = self.registry().call("POST", "/mqtt-credential", "MQTT password", auth=(hostname, credential),
                                        body={})
            password = _json(resp, "MQTT password").get("password")
        except Refused as exc:
            if exc.status != 404:
                self.result["warnings"].append(f"no MQTT password: HTTP {exc.status} ({exc.error})")
            return
        except (RegistryUnreachable, AgentError) as exc:
            self.result["warnings"].append(f"no MQTT password: {exc}")
            return
        if not isinstance(password, str) or not password:
            self.result["warnings"].append("no MQTT password: the registry's answer has none")
            return
        write_file(path, password + "\n", mode=0o400)
        self.result["mqtt"] = "password stored"
        LOG.info("MQTT broker password stored in %s", path)

    def _report(self, hostname, credential, state, message):
        try:
            self.registry().call("POST", f"/nodes/{hostname}/status", "status report", auth=(hostname, credential),
                                 body={"state": state, "message": message[:500]})
            LOG.info("reported %s to the registry", state)
        except AgentError as exc:
            if state == "ready":
                raise
            LOG.warning("could not report the error to the registry: %s", exc)


def _json(resp, what):
    try:
        data = resp.json()
    except ValueError:
        raise AgentError(f"{what}: the registry answered with something that is not JSON") from None
    if not isinstance(data, dict):
        raise AgentError(f"{what}: unexpected answer from the registry")
    return data


def run_agent(config_path, *, once=False):
    """Run the agent once; returns the result dict or raises AgentError (with ``exit_code``)."""
    return Agent(config_path, once=once).run()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pibake-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="agent config JSON")
    parser.add_argument("--once", action="store_true", help="one attempt per request, no retries")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug output")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pibake-agent: %(levelname)s %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    LOG.propagate = False
    try:
        result = run_agent(args.config, once=args.once)
        code = EXIT_OK
    except AgentError as exc:
        LOG.error("%s", exc)
        result = {"status": "error", "message": str(exc)}
        code = exc.exit_code
    except OSError as exc:  # a file the agent must write: say which and why, no traceback
        message = f"{exc.filename or 'a file'}: {exc.strerror or exc}"
        LOG.error("%s", message)
        result = {"status": "error", "message": message}
        code = EXIT_FAILED
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
