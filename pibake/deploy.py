"""``pibake deploy``: make running machines Slurm workers over ssh, in parallel, with a result per host.

    from pibake.deploy import deploy
    report = deploy("cluster", "red[01-04]")          # or "10.1.1.[11-14]", or a list of names/IPs
    report.ok, report.exit_code, report.to_dict()      # report.to_json() is what `pibake deploy --json` prints

How it works (pyinfra-like: facts first, then only the steps whose facts say something is missing):

1. The manager: its registry must answer ``GET /health`` at the manager's IP (TLS, checked with the
   cluster CA). When it does, the manager is left alone (its row, if it is among ``hosts``, says
   ``unchanged``). When it does not, deploy sets the manager up over ssh first (role ``manager``, see
   "The manager" below); the workers start only once its registry answers and its agent is done. A manager
   that cannot be reached or set up fails with the reason, and every worker row says "manager not ready".
2. Per host, over ssh (ClusterShell ``Task`` on OpenSSH, so ~/.ssh/config, agents and ProxyJump work;
   ``BatchMode=yes``, ``ConnectTimeout``; at most ``parallel`` ssh sessions at once; each host moves on
   to its next step as soon as its previous one is done):

   ``connect``/``facts``  one ssh session: os-release, PID 1, uid, which role packages are installed,
                          sha256 of the files deploy ships, whether the node has an enrolment credential;
   ``packages``           ``apt-get install -y --no-install-recommends`` of the missing ones (skipped when
                          none is missing);
   ``files``              the agent (0755), its config (JSON, 0600, in /etc/pibake 0700), the CA
                          certificate, on a systemd node the timesyncd drop-in (time from the manager,
                          as the seed writes it), and, for a node without credential, the join token in its own file
                          (0600; the agent deletes it after enrolment, so the config stays byte-identical and
                          a re-run rewrites nothing), and the manager's ssh key in the cluster user's
                          authorized_keys (as the seeds write it: the registry's verify/deploy jobs log in
                          with it). Written atomically (temp file + rename) and only when the checksum
                          differs (skipped when all match);
   ``agent``              ``python3 /usr/local/lib/pibake/agent.py --config /etc/pibake/agent.json --json``:
                          enrols (or authenticates with the stored credential), writes the /etc/hosts entry
                          of the manager, the munge key and slurmd's conf server, starts munge and slurmd.
                          It changes nothing on a node that is already right;
   ``idle``               the registry's ``GET /nodes`` (admin credential; it asks sinfo on the manager)
                          reports the node ``idle``.

The manager (over ssh, when its registry does not answer): the SAME steps a burned manager card runs at
first boot, taken from the SAME data: deploy renders the manager's user-data (``pibake.bake.seed
.render_checked``, cluster.yaml + the cluster bundle ``pibake.secrets.manager_bundle``) and takes its
``packages``, ``bootcmd``, ``write_files`` and ``runcmd`` (``manager_plan``), skipping only the runcmd step
that scrubs the seed file from the boot partition (there is none) and pointing ``pibake-install`` at the
wheel deploy ships (``pibake.bake.burn.manager_wheel``, ``--wheel``) instead of the boot partition's:

   ``connect``/``facts``  as for a worker, with the manager's packages and files, and whether /opt/pibake has
                          pibake installed;
   ``packages``           the seed's packages that are missing (``apt-get``, as above);
   ``files``              the seed's ``bootcmd`` (the 0700 cluster directory), then its ``write_files`` (agent,
                          config, CA, helper scripts, systemd units, chrony drop-in, the registry's cluster
                          bundle with its secrets 0400) plus the wheel, over stdin, only those that differ;
   ``install``            the seed's runcmd up to the registry: /etc/hosts entry, chrony, sshd, and
                          ``pibake-install`` of the wheel into /opt/pibake (skipped when the wheel is unchanged
                          and /opt/pibake has pibake);
   ``registry``           the seed's ``pibake-start pibake-registry.service -- ...`` (a systemd unit, or a
                          detached process without systemd), then deploy waits for ``/health``;
   ``agent``              the agent, as on a worker (enrols the manager, installs the munge key, starts munge;
                          slurmctld is run by the registry once workers enrol); with systemd, the seed's
                          ``pibake-start pibake-agent.service`` then enables it for later boots;
   ``ready``              the manager is done.

A host's ``status`` is ``changed`` when any step changed something on it, ``unchanged`` when nothing was
needed, ``failed`` otherwise; ``step`` is the last step reached (the failing one, or ``idle``). ``error``
is one line: ssh's own message for a host that cannot be reached ("Connection refused", "Connection
timed out", "Permission denied (publickey)"), else what failed and why. Secrets (join token, admin
password, node credentials) never appear in results, errors or logs.
"""

import base64
import hashlib
import json
import logging
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pibake.errors import ConfigError, PibakeError, PlanError

LOG = logging.getLogger(__name__)

STEPS = ("connect", "facts", "packages", "files", "agent", "idle")
MANAGER_STEPS = ("connect", "facts", "packages", "files", "install", "registry", "agent", "ready")
ROLE_PACKAGES = {"worker": ("slurmd", "munge", "slurm-client", "python3-psutil")}  # as the worker seed

AGENT_PATH = "/usr/local/lib/pibake/agent.py"
AGENT_CONFIG = "/etc/pibake/agent.json"
CA_PATH = "/etc/pibake/ca.crt"
TOKEN_FILE = "/etc/pibake/join-token"
CREDENTIAL_FILE = "/etc/pibake/node-credential"
TIMESYNCD_DROPIN = "/etc/systemd/timesyncd.conf.d/pibake.conf"  # time from the manager, as the seed does
REMOTE_PYTHON = "/usr/bin/python3"
AGENT_DEADLINE_S = 240  # how long the agent keeps retrying the registry (a busy manager restarts slurmctld)

VENV_PIBAKE = "/opt/pibake/bin/pibake"  # what the manager seed's pibake-install puts there
MANAGER_WHEEL_DIR = "/var/lib/pibake/wheel"  # where deploy ships the wheel (a burned card has it on /boot/firmware)
MANAGER_REGISTRY_TIMEOUT = 90  # seconds from starting the manager's registry until /health must answer
REMOTE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # as cloud-init's runcmd has

DEFAULT_PARALLEL = 32
DEFAULT_CONNECT_TIMEOUT = 10
DEFAULT_IDLE_TIMEOUT = 180
IDLE_POLL_S = 0.5  # each poll makes the registry run sinfo on the manager
AGENT_RETRY_AFTER_S = 20  # a node not idle this long after its agent ran gets one more agent run
CONTROL_PERSIST_S = 120  # an ssh master outlives its host's last session this long; deploy stops them at the end

_MARK = "@@pibake "
FACTS_SCRIPT = """\
echo '{m}os-release'; cat /etc/os-release 2>/dev/null
echo '{m}pid1'; cat /proc/1/comm 2>/dev/null
echo '{m}hostname'; hostname
echo '{m}uid'; id -u
echo '{m}packages'; dpkg-query -W -f='${{Package}} ${{db:Status-Status}}\\n' {packages} 2>/dev/null
echo '{m}sha256'; sha256sum {files} 2>/dev/null
echo '{m}credential'; test -s {credential} && echo present
echo '{m}venv'; test -x {venv} && echo present
echo '{m}authorized'; home=$(getent passwd {auth_user} | cut -d: -f6)
if [ -z "$home" ]; then echo no-user; elif grep -qsxF {auth_line} "$home/.ssh/authorized_keys"; then echo present
else echo absent; fi
echo '{m}end'
exit 0
"""

# Runs on the node (python3, stdlib only): reads {"files": [{path, mode, b64}], "dirs": [[path, mode]]} on
# stdin, writes each file whose content or mode differs (temp file in the same directory + rename), prints
# the JSON list of paths it wrote; a file's "then" command runs after it was written (e.g. a service restart).
INSTALL_SCRIPT = r"""
import base64, hashlib, json, os, sys
spec = json.load(sys.stdin)
for path, mode in spec["dirs"]:
    os.makedirs(path, exist_ok=True)
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)
written = []
for f in spec["files"]:
    os.makedirs(os.path.dirname(f["path"]), mode=0o755, exist_ok=True)
    data = base64.b64decode(f["b64"])
    try:
        with open(f["path"], "rb") as fh:
            same = hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()
        same = same and os.stat(f["path"]).st_mode & 0o7777 == f["mode"] and os.stat(f["path"]).st_uid == 0
    except OSError:
        same = False
    if same:
        continue
    tmp = "%s.pibake-%d" % (f["path"], os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, f["mode"])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, f["path"])
    written.append(f["path"])
    if f.get("then"):
        import subprocess
        subprocess.call(f["then"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
auth = spec.get("authorize")
if auth:  # one line in the user's authorized_keys: replaces an older line of the same key or key name
    import pwd
    pw = pwd.getpwnam(auth["user"])
    ssh_dir = os.path.join(pw.pw_dir, ".ssh")
    if not os.path.isdir(ssh_dir):
        os.makedirs(ssh_dir, mode=0o700)
        os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
    path = os.path.join(ssh_dir, "authorized_keys")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        lines = []
    lines = [ln for ln in lines if auth["blob"] not in ln and not ln.endswith(" " + auth["name"])] + [auth["line"]]
    tmp = "%s.pibake-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    written.append(path)
print(json.dumps(written))
"""


class DeployError(PibakeError):
    """deploy cannot start (bad host list, registry refuses the admin credential, ...)."""


# =========================================================================== results


@dataclass
class HostResult:
    """What happened on one host (the manager too: role "manager", last step "ready")."""

    host: str  # as given in --hosts (name or IP): what ssh connects to
    hostname: str | None = None  # the machine's hostname (what it enrolled as)
    role: str = "worker"  # worker, or manager (set up first when its registry does not answer)
    step: str = "connect"  # the last step reached: one of STEPS (MANAGER_STEPS for the manager)
    status: str = "pending"  # changed | unchanged | failed (pending/running while deploy runs)
    duration_s: float = 0.0
    changes: list = field(default_factory=list)  # what was changed, e.g. "installed slurmd", "/etc/hosts"
    error: str | None = None
    slurm_state: str | None = None
    timings: dict = field(default_factory=dict)  # seconds spent in each step that ran

    def to_dict(self):
        d = asdict(self)
        d["duration_s"] = round(self.duration_s, 3)
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return d


@dataclass
class DeployReport:
    """The result of one deploy: one HostResult per host, in the order given."""

    hosts: list
    manager: str
    registry: str
    parallel: int
    started_at: str
    duration_s: float

    @property
    def failed(self):
        return [h for h in self.hosts if h.status == "failed"]

    @property
    def ok(self):
        return not self.failed

    @property
    def exit_code(self):
        return 0 if self.ok else 1

    def summary(self):
        return summarize(self.hosts)

    def to_dict(self):
        return {
            "manager": self.manager,
            "registry": self.registry,
            "parallel": self.parallel,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "summary": self.summary(),
            "hosts": [h.to_dict() for h in self.hosts],
        }

    def to_json(self):
        """Exactly what ``pibake deploy --json`` prints on stdout."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def summarize(results):
    """{"hosts": N, "changed": a, "unchanged": b, "failed": c} (pure)."""
    out = {"hosts": len(results), "changed": 0, "unchanged": 0, "failed": 0}
    for r in results:
        if r.status in out:
            out[r.status] += 1
    return out


def format_table(results):
    """The per-host table (text, one line per host), like pyinfra's results."""
    rows = [("HOST", "HOSTNAME", "STEP", "STATUS", "TIME", "DETAIL")]
    for r in results:
        detail = r.error if r.status == "failed" else (", ".join(r.changes) if r.changes else "-")
        rows.append((r.host, r.hostname or "-", r.step, r.status, f"{r.duration_s:.1f}s", detail or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    s = summarize(results)
    lines.append(f"{s['hosts']} host(s): {s['changed']} changed, {s['unchanged']} unchanged, {s['failed']} failed")
    return "\n".join(line.rstrip() for line in lines) + "\n"


# =========================================================================== pure parts


def parse_hosts(hosts):
    """``"red[01-04]"``, ``"10.1.1.[11-14]"``, ``"red01,red02"`` or a list of such: the expanded list of ssh
    targets, in order, without duplicates. Raises PlanError naming what to fix."""
    from ClusterShell.NodeSet import NodeSet, NodeSetParseError, RangeSetParseError
    from ClusterShell.NodeUtils import GroupResolverError

    items = [hosts] if isinstance(hosts, str) else list(hosts or ())
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            # NodeSet folds/sorts; keep the order given: expand each comma-separated part on its own
            for part in _split_top_level(text):
                for name in NodeSet(part, resolver=False):  # no group resolution: a name is a name
                    if name not in out:
                        out.append(name)
        except (NodeSetParseError, RangeSetParseError) as exc:
            raise PlanError(f"--hosts {text!r}: {exc}; write e.g. red[01-04] or 10.1.1.[11-14]") from None
        except GroupResolverError:  # "@source:group" names a ClusterShell group; deploy resolves none
            raise PlanError(f"--hosts {text!r}: node groups (@...) are not supported; write e.g. red[01-04] or "
                            "10.1.1.[11-14]") from None
    if not out:
        raise PlanError("--hosts: no host given; write e.g. red[01-04] or 10.1.1.[11-14]")
    bad = [h for h in out if not _valid_target(h)]
    if bad:
        raise PlanError(f"--hosts: not a host name or IP address: {', '.join(bad)}")
    return out


def _split_top_level(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _valid_target(host):
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host)) and ".." not in host


def parse_facts(text):
    """The facts script's output -> {"os_release": {...}, "pid1": "systemd", "hostname", "uid",
    "packages": {name: status}, "sha256": {path: hex}, "credential": bool}."""
    sections, cur = {}, None
    for line in text.splitlines():
        if line.startswith(_MARK):
            cur = line[len(_MARK):].strip()
            sections[cur] = []
        elif cur is not None:
            sections[cur].append(line)
    if "end" not in sections:
        raise ValueError("the facts script did not finish (no end marker)")
    osr = {}
    for line in sections.get("os-release", []):
        if "=" in line:
            k, v = line.split("=", 1)
            osr[k.strip()] = v.strip().strip('"')
    packages = {}
    for line in sections.get("packages", []):
        parts = line.split()
        if len(parts) >= 2:
            packages[parts[0]] = parts[1]
    sha = {}
    for line in sections.get("sha256", []):
        parts = line.split(None, 1)
        if len(parts) == 2 and len(parts[0]) == 64:
            sha[parts[1].strip()] = parts[0]
    first = lambda key: (sections.get(key) or [""])[0].strip()  # noqa: E731
    return {
        "os_release": osr,
        "pid1": first("pid1"),
        "systemd": first("pid1") == "systemd",
        "hostname": first("hostname"),
        "uid": first("uid"),
        "packages": packages,
        "sha256": sha,
        "credential": first("credential") == "present",
        "venv": first("venv") == "present",
        "authorized": first("authorized"),  # the manager's key for the cluster user: present, absent, no-user
    }


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


# --------------------------------------------------------------------------- the manager's steps


@dataclass
class ManagerPlan:
    """What deploy does on a manager whose registry does not answer: the manager seed's own steps (pure data).

    ``packages``: the seed's package list; ``bootcmd``: argv lists run before the files (the 0700 cluster
    directory); ``files``: {path: (bytes, mode)} from the seed's write_files plus the wheel; ``setup``: the
    runcmd entries (argv lists, or shell strings) before the registry's start (hosts entry, chrony, sshd, pibake-install); ``install``: the
    pibake-install line among them; ``registry``/``agent``: the runcmd lines that start the registry and the
    agent; ``wheel``: where the wheel goes on the manager."""

    packages: list
    bootcmd: list
    files: dict
    setup: list
    install: list
    registry: list
    agent: list
    wheel: str


def _seed_file_bytes(entry):
    if entry.get("encoding") in ("b64", "base64"):
        return base64.b64decode(entry["content"])
    if entry.get("encoding") not in (None, "text/plain"):
        raise ValueError(f"write_files {entry['path']}: encoding {entry['encoding']} is not handled")
    return str(entry.get("content", "")).encode("utf-8")


def manager_plan(user_data, wheel_name, wheel_bytes):
    """The manager's ManagerPlan from its rendered user-data (``#cloud-config`` text) and the wheel (pure).

    Every step comes from the seed: its ``packages``, ``bootcmd``, ``write_files`` and ``runcmd``. Left out:
    the runcmd line that scrubs the seed file on the boot partition (deploy puts no seed there). Changed:
    ``pibake-install`` gets the wheel deploy ships (``MANAGER_WHEEL_DIR/<wheel_name>``) instead of the boot
    partition's glob. Raises ValueError when the seed does not have the shape this relies on."""
    import yaml

    from pibake.bake.seed import SCRIPTS, WHEEL_GLOB

    config = yaml.safe_load(user_data)
    if not isinstance(config, dict):
        raise ValueError("the manager's user-data is not a cloud-config mapping")
    wheel = f"{MANAGER_WHEEL_DIR}/{wheel_name}"
    files = {}
    for entry in config.get("write_files") or ():
        if entry.get("owner", "root:root") != "root:root":
            raise ValueError(f"write_files {entry['path']}: owner {entry['owner']} is not handled")
        files[entry["path"]] = (_seed_file_bytes(entry), int(str(entry.get("permissions", "0644")), 8))
    files[wheel] = (wheel_bytes, 0o644)
    start, scrub, install_script = SCRIPTS["start"][0], SCRIPTS["scrub"][0], SCRIPTS["install_pibake"][0]
    setup, install, registry, agent = [], None, None, None
    for line in config.get("runcmd") or ():
        entry = line if isinstance(line, str) else [str(a) for a in line]  # a string runs as a shell line
        argv = shlex.split(entry) if isinstance(entry, str) else entry
        if not argv or argv[0] == scrub:
            continue
        if argv[0] == start and argv[1:2] == ["pibake-registry.service"]:
            registry = entry
        elif argv[0] == start and argv[1:2] == ["pibake-agent.service"]:
            agent = entry
        elif registry is not None:
            raise ValueError(f"runcmd: {argv[0]} after the registry's start is not handled")
        else:
            if argv[0] == install_script and not isinstance(entry, str):
                entry = [wheel if a == WHEEL_GLOB else a for a in entry]
                install = entry
            setup.append(entry)
    if install is None or registry is None or agent is None:
        raise ValueError("the manager's runcmd lacks pibake-install, the registry's start or the agent's start")
    bootcmd = [c if isinstance(c, str) else [str(a) for a in c] for c in config.get("bootcmd") or ()]
    return ManagerPlan(packages=[str(p) for p in config.get("packages") or ()], bootcmd=bootcmd, files=files,
                       setup=setup, install=install, registry=registry, agent=agent, wheel=wheel)


def shell_line(entry):
    """One runcmd/bootcmd entry as a shell command: a list is quoted word by word, a string is run by the
    shell as written (as cloud-init does)."""
    return entry if isinstance(entry, str) else shlex.join(entry)


def manager_config_equivalents(files):
    """{AGENT_CONFIG: {sha256}}: the manager's agent config as the agent leaves it after enrolling (the
    join_token key removed, rewritten with sorted keys), which counts as right (pure)."""
    from pibake.firstboot.agent import config_without_token

    if AGENT_CONFIG not in files:
        return {}
    try:
        config = json.loads(files[AGENT_CONFIG][0])
    except ValueError:
        return {}
    scrubbed = json.dumps(config_without_token(config), indent=2, sort_keys=True) + "\n"
    return {AGENT_CONFIG: {hashlib.sha256(scrubbed.encode()).hexdigest()}}


def setup_script(plan, *, reinstall):
    """The shell text of the ``install`` step: the seed's runcmd lines before the registry, stopping at the
    first failure; the pibake-install line only when ``reinstall`` (pure)."""
    lines = ["set -e", f"export PATH={REMOTE_PATH}"]
    for argv in plan.setup:
        if argv == plan.install and not reinstall:
            continue
        lines.append(shell_line(argv) + " >/dev/null")
    return "\n".join(lines) + "\n"


def agent_script(agent_line):
    """The manager's ``agent`` step from the seed's ``pibake-start pibake-agent.service -- COMMAND`` line: COMMAND
    in the foreground with --json (as deploy runs the agent on a worker), then, when systemd is PID 1, the
    seed's line itself, so that the unit runs on every boot (pure)."""
    if isinstance(agent_line, str) or "--" not in agent_line:
        raise ValueError("the seed's agent line must be a list: pibake-start UNIT -- COMMAND...")
    command = agent_line[agent_line.index("--") + 1:] + ["--json"]
    return (f"export PATH={REMOTE_PATH}\n{shlex.join(command)}\nrc=$?\n"
            f"if [ $rc -eq 0 ] && [ -d /run/systemd/system ]; then {shell_line(agent_line)} >/dev/null 2>&1; fi\n"
            "exit $rc\n")


def manager_not_ready(manager_result):
    """The one-line error of a worker that was not started because the manager failed (pure)."""
    return f"manager not ready: {manager_result.host} failed at {manager_result.step}"


def agent_changes(result):
    """What an agent run (its ``--json`` result) changed on the node, as short phrases (pure).

    Empty when the node was already right: authenticated with its stored credential, no file written,
    munge and slurmd already running."""
    changes = []
    if result.get("enrolment") in ("new", "re-enrolled"):
        changes.append(f"enrolment {result['enrolment']}")
    changes += [str(p) for p in result.get("changed") or ()]
    for name, state in sorted((result.get("services") or {}).items()):
        if state not in ("running", "unchanged"):
            changes.append(f"{name} {state}")
    return changes


def parse_agent_output(text):
    """The agent's ``--json`` result (a JSON object on stdout), or None when stdout holds none."""
    text = text.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:
        result = json.loads(text[start:])
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


AFTER_WRITE = {TIMESYNCD_DROPIN: ["systemctl", "try-restart", "systemd-timesyncd"]}


def timesyncd_dropin(cluster):
    """systemd-timesyncd drop-in: time from the manager (the same file a worker's seed writes)."""
    from pibake.bake.seed import _render  # the seed's template renderer: one template for both paths

    return _render("timesyncd.conf.j2", servers=[cluster.manager_ip], fallback=list(cluster.ntp_servers or ()))


def wanted_files(cluster, hostname, role, facts, agent_bytes, ca_bytes):
    """{path: (bytes, mode)} of what a node must have (pure): the agent, its config, the CA certificate,
    and on a systemd node the timesyncd drop-in (time from the manager)."""
    config = agent_config(cluster, hostname, role)
    wanted = {
        AGENT_PATH: (agent_bytes, 0o755),
        AGENT_CONFIG: ((json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), 0o600),
        CA_PATH: (ca_bytes, 0o644),
    }
    if facts.get("systemd"):
        wanted[TIMESYNCD_DROPIN] = (timesyncd_dropin(cluster).encode(), 0o644)
    return wanted


def credential_rejected(message):
    """True when the agent's error says the registry no longer accepts the node's stored credential."""
    return "rejected this node's credential" in (message or "")


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


def manager_key_authorization(cluster, public_key):
    """The ``authorize`` entry of the files step (pure): the manager's ssh key for the cluster user, as the seeds
    write it (``pibake.bake.seed.manager_key_line``); an older line of the same key or key name is replaced."""
    from pibake.bake.seed import manager_key_line

    _kind, blob, *comment = public_key.split()
    return {"user": cluster.user, "line": manager_key_line(cluster, public_key), "blob": blob,
            "name": comment[-1] if comment else blob}


def ssh_error(stderr, rc):
    """One line for a failed ssh session: ssh's own last message (exit 255), else the command's."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    if lines:
        return lines[-1]
    return f"ssh exited with {rc} without a message" if rc == 255 else f"exited with {rc}"


def final_status(result):
    """changed / unchanged for a host that reached ``idle`` (pure)."""
    return "changed" if result.changes else "unchanged"


# =========================================================================== the run


class _Host:
    def __init__(self, target, role="worker", plan=None):
        self.result = HostResult(host=target, role=role)
        self.role = role
        self.plan = plan  # ManagerPlan for the manager
        self.started = None
        self.step_started = None
        self.token_sent = False
        self.agent_runs = 1
        self.facts = None
        self.written = []
        self.installed = False  # the manager went through install + registry in this run
        self.force_ship = set()
        self.out = []
        self.err = []
        self.rc = None

    @property
    def packages(self):
        return self.plan.packages if self.plan else ROLE_PACKAGES[self.role]

    @property
    def fact_files(self):
        if self.plan:
            return tuple(self.plan.files)
        return (AGENT_PATH, AGENT_CONFIG, CA_PATH, TIMESYNCD_DROPIN)


class _Pipeline:
    """Moves every host through the ssh steps with one ClusterShell task (event-driven, per host)."""

    def __init__(self, cluster, hosts, *, secrets, user, parallel, connect_timeout, ssh_options, progress):
        from ClusterShell.Event import EventHandler
        from ClusterShell.Task import task_self

        self.cluster = cluster
        self.hosts = hosts
        self.secrets = secrets
        self.user = user
        self.progress = progress
        self.task = task_self()
        self.task.set_info("fanout", max(1, int(parallel)))
        self.task.set_info("connect_timeout", connect_timeout)
        self.task.set_info("ssh_user", user)
        self.task.set_info("ssh_options", " ".join(shlex.quote(o) for o in ssh_options) or None)
        self.task.set_default("stderr", True)
        self.workers = {}
        pipeline = self

        class Handler(EventHandler):
            def ev_read(self, worker, node, sname, msg):
                host = pipeline.workers[worker]
                (host.err if sname == "stderr" else host.out).append(msg)

            def ev_hup(self, worker, node, rc):
                pipeline.workers[worker].rc = rc

            def ev_close(self, worker, timedout):
                host = pipeline.workers.pop(worker)
                try:
                    pipeline._done(host, timedout)
                except Exception as exc:  # noqa: BLE001  a bug must not hang the other hosts
                    LOG.exception("deploy: %s: internal error", host.result.host)
                    pipeline._fail(host, f"internal error: {exc}")

        self.handler = Handler()

    # -------------------------------------------------------------- plumbing
    def _note(self, host, step=None, status=None):
        r = host.result
        if step:
            r.step = step
        if status:
            r.status = status
        r.duration_s = time.monotonic() - host.started
        if self.progress:
            try:
                self.progress(r.to_dict())
            except Exception:  # noqa: BLE001  a broken progress callback must not stop the deploy
                LOG.exception("deploy: progress callback failed")

    def _remote(self, command):
        root = self.user in (None, "root")
        return command if root else f"sudo -n sh -c {shlex.quote(command)}"

    def _launch(self, host, step, command, *, stdin=None, timeout=120):
        host.out, host.err, host.rc = [], [], None
        host.step = step
        host.step_started = time.monotonic()
        self._note(host, step=step, status="running")
        worker = self.task.shell(self._remote(command), nodes=host.result.host, handler=self.handler,
                                 timeout=timeout, stdin=stdin is not None, stderr=True)
        self.workers[worker] = host
        if stdin is not None:
            worker.write(stdin)
            worker.set_write_eof()

    def _fail(self, host, error):
        host.result.error = error
        LOG.info("deploy: %s failed at %s: %s", host.result.host, host.result.step, error)
        self._note(host, status="failed")

    # -------------------------------------------------------------- steps
    def run(self, hosts=None):
        """Take ``hosts`` (default: all) through their steps; returns when none has an ssh session left
        (workers wait in ``idle``, the manager in ``registry`` or ``ready``)."""
        for host in self.hosts if hosts is None else hosts:
            host.started = time.monotonic()
            self._launch(host, "connect", FACTS_SCRIPT.format(
                m=_MARK, packages=" ".join(shlex.quote(p) for p in host.packages),
                files=" ".join(shlex.quote(f) for f in host.fact_files), credential=CREDENTIAL_FILE,
                venv=VENV_PIBAKE, auth_user=shlex.quote(self.secrets["authorize"]["user"]),
                auth_line=shlex.quote(self.secrets["authorize"]["line"])), timeout=60)
        self.task.resume()

    def _done(self, host, timedout):
        step = host.step
        host.result.timings[step] = host.result.timings.get(step, 0.0) + time.monotonic() - host.step_started
        out = b"\n".join(host.out).decode("utf-8", "replace")
        err = b"\n".join(host.err).decode("utf-8", "replace")
        if timedout or host.rc is None:
            if step == "connect":
                self._fail(host, "ssh: no answer in time (connection timed out)")
            else:
                self._fail(host, f"{step}: did not finish in time on the node")
            return
        if host.rc == 255 and step == "connect":
            self._fail(host, ssh_error(err, host.rc))
            return
        if step == "connect":
            host.result.step = "facts"
            try:
                host.facts = parse_facts(out)
            except ValueError as exc:
                self._fail(host, f"facts: {exc}: {ssh_error(err, host.rc)}")
                return
            host.result.hostname = host.facts["hostname"] or None
            if self.user in (None, "root") and host.facts["uid"] not in ("0", ""):
                self._fail(host, f"facts: logged in as uid {host.facts['uid']}, not root: give --user root "
                                 "or a user with passwordless sudo")
                return
            if host.role == "manager" and host.facts["hostname"] != self.cluster.manager:
                # slurmctld runs only on the host named SlurmctldHost (cluster.yaml's manager); a seed sets the
                # hostname at first boot, deploy does not rename a running machine
                self._fail(host, f"facts: this machine is named {host.facts['hostname'] or '?'}, but cluster.yaml's "
                                 f"manager is {self.cluster.manager}: rename it (hostnamectl set-hostname "
                                 f"{self.cluster.manager}) and deploy again")
                return
            if host.role == "worker" and host.facts["hostname"] == self.cluster.manager:
                self._fail(host, f"facts: this machine is the cluster's manager ({self.cluster.manager}); "
                                 f"name it {self.cluster.manager} or {self.cluster.manager_ip} in --hosts")
                return
            self._packages(host)
        elif step == "packages":
            if host.rc != 0:
                self._fail(host, f"packages: apt-get exited with {host.rc}: {ssh_error(err, host.rc)}")
                return
            missing = missing_packages(host.role, host.facts["packages"], host.packages)
            host.result.changes += [f"installed {p}" for p in missing]
            self._files(host)
        elif step == "files":
            if host.rc != 0:
                self._fail(host, f"files: {ssh_error(err, host.rc)}")
                return
            try:
                written = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                self._fail(host, f"files: unexpected answer from the node: {ssh_error(err, host.rc)}")
                return
            host.written = written
            host.result.changes += [p for p in written if p != TOKEN_FILE and p not in host.result.changes]
            self._after_files(host)
        elif step == "install":
            if host.rc != 0:
                self._fail(host, f"install: {ssh_error(err, host.rc)}")
                return
            host.installed = True
            self._registry(host)
        elif step == "registry":
            if host.rc != 0:
                self._fail(host, f"registry: {ssh_error(err, host.rc)}")
                return
            host.result.changes.append("pibake-registry started")
            host.step_started = time.monotonic()  # deploy() now waits for /health (timed as "registry")
        elif step == "agent":
            result = parse_agent_output(out)
            if not isinstance(result, dict):
                self._fail(host, f"agent: exited with {host.rc}: {ssh_error(err, host.rc)}")
                return
            if result.get("hostname"):
                host.result.hostname = result["hostname"]
            if host.rc != 0 or result.get("status") != "ready":
                message = result.get("message") or ssh_error(err, host.rc)
                if credential_rejected(message) and not host.token_sent:
                    # removed in the registry (or a re-installed registry): enrol again with the join token
                    LOG.info("deploy: %s: stored credential rejected; re-enrolling with the join token",
                             host.result.host)
                    host.facts["credential"] = False
                    if host.plan:  # the manager's token is in its seed's agent config: send that again
                        host.token_sent = True
                        host.force_ship.add(AGENT_CONFIG)
                    self._files(host)
                    return
                self._fail(host, f"agent: {message}")
                return
            host.result.changes += agent_changes(result)
            if host.role == "manager":
                self._note(host, step="ready", status=final_status(host.result))
                return
            host.result.step = "idle"
            host.step_started = time.monotonic()
            self._note(host, step="idle", status="running")

    def _packages(self, host):
        missing = missing_packages(host.role, host.facts["packages"], host.packages)
        if not missing:
            self._files(host)
            return
        pkgs = " ".join(shlex.quote(p) for p in missing)
        install = f"apt-get install -y -q --no-install-recommends {pkgs}"
        self._launch(host, "packages",
                     f"export DEBIAN_FRONTEND=noninteractive; {install} >/dev/null || "
                     f"{{ apt-get update -q >/dev/null && {install} >/dev/null; }}", timeout=900)

    def _wanted_files(self, host):
        if host.plan:
            return host.plan.files
        return wanted_files(self.cluster, host.result.hostname or host.result.host, host.role, host.facts,
                            self.secrets["agent"], self.secrets["ca"])

    def _files(self, host):
        wanted = self._wanted_files(host)
        manager = host.plan is not None
        ship = files_to_ship(wanted, host.facts["sha256"], manager_config_equivalents(wanted) if manager else None)
        ship += sorted(p for p in host.force_ship if p in wanted and p not in ship)
        host.force_ship = set()
        # a manager's join token is in its seed's agent config (as on a burned card); a worker's has its own file
        need_token = not manager and not host.facts["credential"] and not host.token_sent
        host.token_sent = host.token_sent or need_token
        # the manager's ssh key, for its verify/deploy jobs: on every node but the manager (as the seeds do)
        need_auth = not manager and host.facts["authorized"] == "absent"
        if not manager and host.facts["authorized"] == "no-user":
            LOG.warning("deploy: %s has no user %s (cluster.yaml's user): the manager's ssh key is not authorized "
                        "there, so the registry's verify and deploy jobs cannot log in to it", host.result.host,
                        self.cluster.user)
        if not ship and not need_token and not need_auth:
            host.written = []
            self._after_files(host)
            return
        files = [{"path": p, "mode": wanted[p][1], "b64": base64.b64encode(wanted[p][0]).decode(),
                  "then": AFTER_WRITE.get(p)} for p in ship]
        if need_token:
            files.append({"path": TOKEN_FILE, "mode": 0o600,
                          "b64": base64.b64encode(self.secrets["token"].encode() + b"\n").decode()})
        spec = {"dirs": [["/etc/pibake", 0o700], ["/usr/local/lib/pibake", 0o755]], "files": files}
        if need_auth:
            spec["authorize"] = self.secrets["authorize"]
        command = f"{REMOTE_PYTHON} -c {shlex.quote(INSTALL_SCRIPT)}"
        if manager:  # the seed's bootcmd first: the registry's cluster directory exists 0700 before its secrets
            command = " && ".join([f"export PATH={REMOTE_PATH}"] + [shell_line(c) for c in host.plan.bootcmd]
                                  + [command])
        # secrets (join token, the manager's cluster bundle) travel on stdin, never on a command line
        self._launch(host, "files", command, stdin=json.dumps(spec).encode(), timeout=300)

    def _after_files(self, host):
        if host.plan and not host.installed:
            self._install(host)
        else:
            self._agent(host)

    def _install(self, host):
        reinstall = host.plan.wheel in host.written or not host.facts.get("venv")
        if reinstall:
            host.result.changes.append(f"pibake installed into {VENV_PIBAKE.rsplit('/bin/', 1)[0]}")
        self._launch(host, "install", setup_script(host.plan, reinstall=reinstall), timeout=900)

    def _registry(self, host):
        self._launch(host, "registry", f"export PATH={REMOTE_PATH}; {shell_line(host.plan.registry)} >/dev/null",
                     timeout=120)

    def manager_agent(self, host):
        """The manager's agent step (after deploy() saw its registry answer); returns when it is done."""
        self._agent(host)
        self.task.resume()

    def rerun_agent(self, hosts):
        """Run the agent step again on ``hosts`` (each already through it once) and wait for them."""
        for host in hosts:
            host.agent_runs += 1
            self._agent(host)
        self.task.resume()

    def _agent(self, host):
        if host.plan:
            self._launch(host, "agent", agent_script(host.plan.agent), timeout=AGENT_DEADLINE_S + 60)
            return
        self._launch(host, "agent", f"{REMOTE_PYTHON} {AGENT_PATH} --config {AGENT_CONFIG} --json",
                     timeout=AGENT_DEADLINE_S + 60)


class RegistryClient:
    """The manager's registry as seen from the machine running deploy (by IP: the cert names it)."""

    def __init__(self, cluster, cluster_dir, timeout=10):
        from pibake.secrets import secrets_dir

        self.base = f"https://{cluster.manager_ip}:{cluster.registry_port}/api/v1"
        self.ca = str(secrets_dir(cluster_dir) / "ca.crt")
        self.admin_file = secrets_dir(cluster_dir) / "admin-password"
        self.timeout = timeout

    def health(self):
        """None when healthy, else one line saying why not."""
        import requests

        try:
            r = requests.get(f"{self.base}/health", verify=self.ca, timeout=self.timeout)
        except requests.exceptions.SSLError as exc:
            return f"TLS check against the cluster CA failed ({type(exc).__name__})"
        except requests.exceptions.ConnectionError as exc:
            text = str(exc)
            reason = "connection refused" if "refused" in text.lower() else (
                "timed out" if "timed out" in text.lower() else "cannot connect")
            return reason
        except requests.exceptions.Timeout:
            return "timed out"
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        return None

    def slurm_states(self):
        """{hostname: slurm_state} from ``GET /nodes`` (admin)."""
        import requests

        try:
            password = self.admin_file.read_text().strip()
        except OSError as exc:
            raise DeployError(f"{self.admin_file}: cannot read the admin password ({exc.strerror})") from None
        try:
            r = requests.get(f"{self.base}/nodes", verify=self.ca, timeout=self.timeout, auth=("admin", password))
        except requests.exceptions.RequestException:
            return None
        if r.status_code == 401:
            raise DeployError("the registry refused the admin password of this cluster directory "
                              "(secrets/admin-password): is it the same cluster?")
        if r.status_code != 200:
            return None
        return {n.get("hostname"): n.get("slurm_state") for n in r.json()}


def _now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def deploy(cluster_dir, hosts, *, manager=None, user=None, parallel=DEFAULT_PARALLEL,
           connect_timeout=DEFAULT_CONNECT_TIMEOUT, ssh_options=(), idle_timeout=DEFAULT_IDLE_TIMEOUT,
           wheel=None, progress=None):
    """Make ``hosts`` (names or IPs, NodeSet syntax, or a list) Slurm workers of the cluster in ``cluster_dir``;
    set up the manager over ssh first when its registry does not answer.

    ``manager``: how to reach the cluster's manager over ssh (its name or IP in cluster.yaml; default: the
    entry of ``hosts`` that is the manager, else cluster.yaml's manager name). ``hosts`` may contain the
    manager: its row then says what was done there (``unchanged`` when its registry answers).
    ``user``: ssh login (default: ssh's own choice, e.g. from ~/.ssh/config); a non-root user needs
    passwordless sudo. ``parallel``: at most this many ssh sessions at once. ``connect_timeout``: seconds
    (ssh's ConnectTimeout). ``ssh_options``: extra ssh arguments, e.g. ("-F", "lab_ssh_config").
    ``wheel``: the pibake wheel the manager installs (default: the running pibake's own,
    ``pibake.bake.burn.manager_wheel``; only needed when the manager is set up).
    ``progress``: called with a host's result dict (``HostResult.to_dict()``) whenever its step or status
    changes. Returns a ``DeployReport``; raises PibakeError only when nothing could be tried (bad host list,
    no cluster, expired join token, no wheel for a manager that needs one).
    """
    from pibake.bake.seed import agent_source
    from pibake.cluster import load_cluster
    from pibake.secrets import seed_secrets

    started_wall, t0 = _now_iso(), time.monotonic()
    cluster = load_cluster(cluster_dir)
    targets = parse_hosts(hosts)
    if manager is not None and manager not in (cluster.manager, cluster.manager_ip):
        raise ConfigError(f"--manager {manager}: this cluster's manager is {cluster.manager} "
                          f"({cluster.manager_ip}) in cluster.yaml; its registry certificate and join token "
                          "belong to it")
    try:
        parallel = int(parallel)
        connect_timeout = int(connect_timeout)
    except (TypeError, ValueError):
        raise DeployError("--parallel and --connect-timeout take whole numbers") from None
    if parallel < 1 or connect_timeout < 1:
        raise DeployError("--parallel and --connect-timeout must be at least 1")
    manager_target = manager_ssh_target(cluster, targets, manager)
    in_hosts = manager_target in targets

    sec = seed_secrets(cluster_dir)
    secrets = {"agent": agent_source().encode(), "ca": sec.ca_cert_pem.encode(), "token": sec.join_token,
               "authorize": manager_key_authorization(cluster, sec.manager_ssh_key)}
    registry = RegistryClient(cluster, cluster_dir)
    t_health = time.monotonic()
    why = registry.health()
    plan = manager_plan_for(cluster, cluster_dir, wheel) if registry_down(why) else None

    mgr = _Host(manager_target, role="manager", plan=plan)
    mgr.result.hostname = cluster.manager
    workers = [_Host(t) for t in targets if t != manager_target]
    host_runs = [mgr if t == manager_target else next(w for w in workers if w.result.host == t) for t in targets]
    if not in_hosts and plan is not None:
        host_runs.insert(0, mgr)  # deploy sets the manager up: it gets its row, first
    LOG.info("deploy: %d host(s), up to %d ssh sessions at once, registry %s", len(targets), parallel,
             registry.base)
    # One ssh connection per host for all its steps (OpenSSH ControlMaster): the key exchange is most of what
    # an ssh session costs (OpenSSH 9.2, default sntrup761x25519 KEX: ~60 ms CPU for `ssh host true`, ~5 ms
    # through an open master), so a host's sessions cost one handshake plus cheap multiplexed ones.
    control_dir = tempfile.mkdtemp(prefix="pibake-ssh-")  # 0700; one socket per host, named by ssh's %C hash
    mux = ("-oControlMaster=auto", f"-oControlPath={control_dir}/%C", f"-oControlPersist={CONTROL_PERSIST_S}")
    try:
        ssh_options = with_planned_addresses([h.result.host for h in host_runs], planned_addresses(cluster, cluster_dir),
                                             tuple(ssh_options), control_dir)
        pipeline = _Pipeline(cluster, host_runs, secrets=secrets, user=user, parallel=parallel,
                             connect_timeout=connect_timeout, ssh_options=tuple(ssh_options) + mux, progress=progress)
        if why is not None and plan is None:
            # something answers at the registry's address, but not this cluster's healthy registry: never
            # overwrite what runs there
            mgr.started = t_health
            if not in_hosts:
                host_runs.insert(0, mgr)
            mgr.result.step = "registry"
            pipeline._fail(mgr, f"registry: {registry.base}/health: {why}; deploy sets up only a manager "  # pylint: disable=protected-access
                                "whose registry is not running (is it this cluster's manager?)")
        elif plan is None:  # the registry answers: the manager is left alone
            mgr.started = t_health
            mgr.result.timings["registry"] = time.monotonic() - t_health
            if in_hosts:
                pipeline._note(mgr, step="ready", status="unchanged")  # pylint: disable=protected-access
        else:
            LOG.info("deploy: the registry at %s does not answer (%s); setting up the manager %s over ssh",
                     registry.base, why, manager_target)
            _setup_manager(pipeline, mgr, registry)
        if mgr.result.status == "failed":
            for w in workers:
                w.started = w.started or time.monotonic()
                w.result.error = manager_not_ready(mgr.result)
                pipeline._note(w, status="failed")  # pylint: disable=protected-access
        elif workers:
            pipeline.run(workers)
            # A node whose slurmd did not stay up (e.g. it started while slurmctld restarted for other nodes) is
            # not idle after a short while: run its agent once more (it starts what is not running), then wait.
            idle_end = time.monotonic() + idle_timeout
            _wait_idle(registry, workers, min(idle_timeout, AGENT_RETRY_AFTER_S), progress, final=False)
            stragglers = [h for h in workers if h.result.status == "running" and h.result.step == "idle"]
            if stragglers:
                LOG.info("deploy: %s not idle after %d s; running the agent there again",
                         ", ".join(h.result.host for h in stragglers), AGENT_RETRY_AFTER_S)
                pipeline.rerun_agent(stragglers)
            _wait_idle(registry, workers, max(0.0, idle_end - time.monotonic()), progress, budget=idle_timeout)
        return DeployReport(hosts=[h.result for h in host_runs], manager=cluster.manager,
                            registry=registry.base.rsplit("/api/v1", 1)[0], parallel=parallel,
                            started_at=started_wall, duration_s=time.monotonic() - t0)
    finally:
        _close_masters(host_runs, tuple(ssh_options) + mux, user)
        shutil.rmtree(control_dir, ignore_errors=True)


REGISTRY_DOWN = ("connection refused", "timed out", "cannot connect")


def registry_down(why):
    """True when ``RegistryClient.health()``'s answer means nothing listens at the registry's address (pure):
    then deploy sets the manager up. A TLS failure or an HTTP error means something runs there that is not
    this cluster's healthy registry: deploy does not touch it."""
    return why in REGISTRY_DOWN


def planned_addresses(cluster, cluster_dir):
    """{hostname: IP} of the machines this cluster planned: plan.yaml's nodes and cluster.yaml's manager."""
    from pibake.plan import recorded_plan

    out = {n.hostname: n.ip for n in recorded_plan(cluster_dir)}
    out[cluster.manager] = cluster.manager_ip
    return out


def split_config_option(ssh_options):
    """(the ssh config file given with ``-F`` or None, the other options) (pure)."""
    opts, config, i = list(ssh_options), None, 0
    rest = []
    while i < len(opts):
        if opts[i] == "-F" and i + 1 < len(opts):
            config, i = opts[i + 1], i + 2
            continue
        if opts[i].startswith("-F") and len(opts[i]) > 2:
            config, i = opts[i][2:], i + 1
            continue
        rest.append(opts[i])
        i += 1
    return config, tuple(rest)


def address_config(names, planned, user_config=None, home=None):
    """The text of an ssh config that reaches ``names`` at their planned addresses (pure).

    The user's own config comes first (``user_config`` given with -F, else ~/.ssh/config and
    /etc/ssh/ssh_config, as ssh reads them), so whatever it says wins; the blocks after it only add
    ``HostName <planned IP>`` and ``HostKeyAlias <name>`` (host keys stay filed under the name the user gave)."""
    import os

    if user_config == "none":
        includes = []
    elif user_config:
        includes = [os.path.abspath(os.path.expanduser(user_config))]
    else:
        includes = [os.path.join(home or os.path.expanduser("~"), ".ssh", "config"), "/etc/ssh/ssh_config"]
    lines = ["# pibake deploy: the planned addresses of this cluster's machines (plan.yaml, cluster.yaml);",
             "# your own ssh configuration is read first and wins"]
    lines += ['Include "%s"' % path.replace('"', "") for path in includes]
    for name in names:
        lines += [f"Host {name}", f"    HostName {planned[name]}", f"    HostKeyAlias {name}"]
    return "\n".join(lines) + "\n"


def _ssh_hostname(target, ssh_options):
    """What ssh would connect to for ``target`` with these options (``ssh -G``; no connection is made)."""
    from pibake.errors import CommandError
    from pibake.run import run

    try:
        proc = run(["ssh", *ssh_options, "-G", target], timeout=10, check=False)
    except CommandError:
        return target
    for line in proc.stdout.splitlines():
        if line.startswith("hostname "):
            return line.split(None, 1)[1].strip()
    return target


def with_planned_addresses(targets, planned, ssh_options, directory):
    """``ssh_options`` extended so that names of ``targets`` that ssh cannot map by itself (its config gives no
    HostName for them) and that the cluster planned reach their planned address: a config file written to
    ``directory`` that includes the user's own. Names nobody planned, and IPs, are left to ssh (and DNS)."""
    import ipaddress

    def is_ip(value):
        try:
            ipaddress.ip_address(value)
            return True
        except ValueError:
            return False

    names = [t for t in targets if t in planned and not is_ip(t) and _ssh_hostname(t, ssh_options) == t]
    if not names:
        return tuple(ssh_options)
    user_config, rest = split_config_option(ssh_options)
    path = Path(directory) / "ssh_config"
    path.write_text(address_config(names, planned, user_config))
    LOG.info("deploy: %s reached at their planned addresses (%s)", ", ".join(names), path)
    return ("-F", str(path), *rest)


def manager_ssh_target(cluster, targets, manager=None):
    """How deploy reaches the manager over ssh (pure): the entry of ``targets`` that names it (cluster.yaml's
    name or IP), else ``manager`` (--manager), else cluster.yaml's manager name."""
    for t in targets:
        if t in (cluster.manager, cluster.manager_ip):
            return t
    return manager or cluster.manager


def manager_plan_for(cluster, cluster_dir, wheel=None):
    """The ManagerPlan of this cluster's manager: its seed rendered and linted exactly as `pibake burn` does
    (``render_checked``), plus the wheel (``manager_wheel``: ``wheel`` or the running pibake's own)."""
    from pibake.bake.burn import manager_wheel
    from pibake.bake.seed import render_checked
    from pibake.model import PlannedNode

    node = PlannedNode(hostname=cluster.manager, ip=cluster.manager_ip, role="manager")
    ((_node, seed, _report),) = render_checked(cluster, cluster_dir, [node], family=cluster.family)
    path = manager_wheel(wheel)
    try:
        return manager_plan(seed.user_data, path.name, path.read_bytes())
    except (ValueError, KeyError) as exc:  # a seed template this version of deploy cannot follow: a bug
        raise DeployError(f"cannot take the manager's steps from its seed: {exc}") from None


def _setup_manager(pipeline, mgr, registry):
    """The manager's steps up to the registry's start, the wait for /health, then its agent."""
    pipeline.run([mgr])
    if mgr.result.status == "failed":
        return
    end = time.monotonic() + MANAGER_REGISTRY_TIMEOUT
    why = registry.health()
    while why is not None and time.monotonic() < end:
        time.sleep(0.5)
        why = registry.health()
    mgr.result.timings["registry"] = mgr.result.timings.get("registry", 0.0) + time.monotonic() - mgr.step_started
    if why is not None:
        pipeline._fail(mgr, f"registry: no answer from {registry.base}/health after "  # pylint: disable=protected-access
                            f"{MANAGER_REGISTRY_TIMEOUT} s ({why}); see /var/log/pibake/pibake-registry.log on "
                            "the manager (journalctl -u pibake-registry with systemd)")
        return
    LOG.info("deploy: the manager's registry answers; running its agent")
    pipeline.manager_agent(mgr)


def _close_masters(host_runs, ssh_options, user):
    """Stop this deploy's ssh master connections (``ssh -O exit``; a host never reached has none)."""
    from pibake.errors import CommandError
    from pibake.run import run

    for h in host_runs:
        try:
            run(["ssh", *ssh_options, *(["-l", user] if user else []), "-O", "exit", h.result.host], timeout=10,
                check=False)
        except CommandError:
            LOG.debug("deploy: %s: no ssh master to stop", h.result.host)


def _wait_idle(registry, host_runs, timeout, progress, final=True, budget=None):
    waiting = [h for h in host_runs if h.result.status == "running" and h.result.step == "idle"]
    end = time.monotonic() + timeout
    states = {}
    while waiting:
        states = registry.slurm_states() or states
        for h in list(waiting):
            state = states.get(h.result.hostname)
            h.result.slurm_state = state
            if state == "idle":
                waiting.remove(h)
                h.result.timings["idle"] = h.result.timings.get("idle", 0.0) + time.monotonic() - h.step_started
                h.result.status = final_status(h.result)
                h.result.duration_s = time.monotonic() - h.started
                if progress:
                    progress(h.result.to_dict())
        if not waiting or time.monotonic() > end:
            break
        time.sleep(IDLE_POLL_S)
    if not final:
        return
    for h in waiting:
        state = states.get(h.result.hostname)
        h.result.status = "failed"
        h.result.error = (f"idle: the node is {state or 'not in sinfo'} after {round(budget or timeout)} s "
                          "(see slurmd's log on the node and slurmctld's on the manager)")
        h.result.duration_s = time.monotonic() - h.started
        if progress:
            progress(h.result.to_dict())
