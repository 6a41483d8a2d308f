"""``pibake deploy``: make running machines Slurm workers over ssh, in parallel, with a result per host.

    from pibake.deploy import deploy
    report = deploy("cluster", "red[01-04]")          # or "10.1.1.[11-14]", or a list of names/IPs
    report.ok, report.exit_code, report.to_dict()      # report.to_json() is what `pibake deploy --json` prints

How it works (pyinfra-like: facts first, then only the steps whose facts say something is missing):

1. The manager: its registry must answer ``GET /health`` at the manager's IP (TLS, checked with the
   cluster CA). Bootstrapping a manager over ssh is not built: deploy refuses (``NotBuiltError``, exit 2)
   and says to start ``pibake registry serve`` there first (a burned manager card does that at boot).
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
                          a re-run rewrites nothing). Written atomically (temp file + rename) and only when
                          the checksum differs (skipped when all match);
   ``agent``              ``python3 /usr/local/lib/pibake/agent.py --config /etc/pibake/agent.json --json``:
                          enrols (or authenticates with the stored credential), writes the /etc/hosts entry
                          of the manager, the munge key and slurmd's conf server, starts munge and slurmd.
                          It changes nothing on a node that is already right;
   ``idle``               the registry's ``GET /nodes`` (admin credential; it asks sinfo on the manager)
                          reports the node ``idle``.

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
import time
from dataclasses import asdict, dataclass, field

from pibake.errors import ConfigError, NotBuiltError, PibakeError, PlanError

LOG = logging.getLogger(__name__)

STEPS = ("connect", "facts", "packages", "files", "agent", "idle")
ROLE_PACKAGES = {"worker": ("slurmd", "munge", "python3-requests", "python3-psutil")}

AGENT_PATH = "/usr/local/lib/pibake/agent.py"
AGENT_CONFIG = "/etc/pibake/agent.json"
CA_PATH = "/etc/pibake/ca.crt"
TOKEN_FILE = "/etc/pibake/join-token"
CREDENTIAL_FILE = "/etc/pibake/node-credential"
TIMESYNCD_DROPIN = "/etc/systemd/timesyncd.conf.d/pibake.conf"  # time from the manager, as the seed does
REMOTE_PYTHON = "/usr/bin/python3"
AGENT_DEADLINE_S = 240  # how long the agent keeps retrying the registry (a busy manager restarts slurmctld)

DEFAULT_PARALLEL = 32
DEFAULT_CONNECT_TIMEOUT = 10
DEFAULT_IDLE_TIMEOUT = 180
IDLE_POLL_S = 0.5  # each poll makes the registry run sinfo on the manager
AGENT_RETRY_AFTER_S = 20
ENROL_GATE_MAX_S = 30  # the longest a host ready to enrol waits for slower hosts (see _Pipeline._to_agent)  # a node not idle this long after its agent ran gets one more agent run

_MARK = "@@pibake "
FACTS_SCRIPT = """\
echo '{m}os-release'; cat /etc/os-release 2>/dev/null
echo '{m}pid1'; cat /proc/1/comm 2>/dev/null
echo '{m}hostname'; hostname
echo '{m}uid'; id -u
echo '{m}packages'; dpkg-query -W -f='${{Package}} ${{db:Status-Status}}\\n' {packages} 2>/dev/null
echo '{m}sha256'; sha256sum {files} 2>/dev/null
echo '{m}credential'; test -s {credential} && echo present
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
print(json.dumps(written))
"""


class DeployError(PibakeError):
    """deploy cannot start (bad host list, registry refuses the admin credential, ...)."""


# =========================================================================== results


@dataclass
class HostResult:
    """What happened on one host."""

    host: str  # as given in --hosts (name or IP): what ssh connects to
    hostname: str | None = None  # the machine's hostname (what it enrolled as)
    step: str = "connect"  # the last step reached: one of STEPS
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
    }


def missing_packages(role, installed):
    """The role's packages that ``installed`` ({name: dpkg status}) does not list as installed."""
    return [p for p in ROLE_PACKAGES[role] if installed.get(p) != "installed"]


def files_to_ship(wanted, remote_sha256):
    """Paths of ``wanted`` ({path: (bytes, mode)}) whose sha256 differs from the node's (pure).

    A mode change alone is not visible in the facts' checksums: the installer on the node checks modes too
    whenever it runs; a file with the right content is left alone."""
    return [p for p, (data, _mode) in wanted.items() if remote_sha256.get(p) != hashlib.sha256(data).hexdigest()]


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
    def __init__(self, target, role="worker"):
        self.result = HostResult(host=target)
        self.role = role
        self.started = None
        self.step_started = None
        self.token_sent = False
        self.agent_runs = 1
        self.facts = None
        self.out = []
        self.err = []
        self.rc = None


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
    def run(self):
        for host in self.hosts:
            host.started = time.monotonic()
            self._launch(host, "connect", FACTS_SCRIPT.format(
                m=_MARK, packages=" ".join(ROLE_PACKAGES[host.role]),
                files=" ".join((AGENT_PATH, AGENT_CONFIG, CA_PATH, TIMESYNCD_DROPIN)), credential=CREDENTIAL_FILE),
                timeout=60)
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
            self._packages(host)
        elif step == "packages":
            if host.rc != 0:
                self._fail(host, f"packages: apt-get exited with {host.rc}: {ssh_error(err, host.rc)}")
                return
            missing = missing_packages(host.role, host.facts["packages"])
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
            host.result.changes += [p for p in written if p != TOKEN_FILE]
            self._agent(host)
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
                    self._files(host)
                    return
                self._fail(host, f"agent: {message}")
                return
            host.result.changes += agent_changes(result)
            host.result.step = "idle"
            host.step_started = time.monotonic()
            self._note(host, step="idle", status="running")

    def _packages(self, host):
        missing = missing_packages(host.role, host.facts["packages"])
        if not missing:
            self._files(host)
            return
        pkgs = " ".join(shlex.quote(p) for p in missing)
        install = f"apt-get install -y -q --no-install-recommends {pkgs}"
        self._launch(host, "packages",
                     f"export DEBIAN_FRONTEND=noninteractive; {install} >/dev/null || "
                     f"{{ apt-get update -q >/dev/null && {install} >/dev/null; }}", timeout=900)

    def _wanted_files(self, host):
        return wanted_files(self.cluster, host.result.hostname or host.result.host, host.role, host.facts,
                            self.secrets["agent"], self.secrets["ca"])

    def _files(self, host):
        wanted = self._wanted_files(host)
        ship = files_to_ship(wanted, host.facts["sha256"])
        need_token = not host.facts["credential"] and not host.token_sent
        host.token_sent = host.token_sent or need_token
        if not ship and not need_token:
            self._agent(host)
            return
        files = [{"path": p, "mode": wanted[p][1], "b64": base64.b64encode(wanted[p][0]).decode(),
                  "then": AFTER_WRITE.get(p)} for p in ship]
        if need_token:
            files.append({"path": TOKEN_FILE, "mode": 0o600,
                          "b64": base64.b64encode(self.secrets["token"].encode() + b"\n").decode()})
        spec = {"dirs": [["/etc/pibake", 0o700], ["/usr/local/lib/pibake", 0o755]], "files": files}
        self._launch(host, "files", f"{REMOTE_PYTHON} -c {shlex.quote(INSTALL_SCRIPT)}",
                     stdin=json.dumps(spec).encode(), timeout=120)

    def rerun_agent(self, hosts):
        """Run the agent step again on ``hosts`` (each already through it once) and wait for them."""
        for host in hosts:
            host.agent_runs += 1
            self._agent(host)
        self.task.resume()

    def _agent(self, host):
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
           progress=None):
    """Make ``hosts`` (names or IPs, NodeSet syntax, or a list) Slurm workers of the cluster in ``cluster_dir``.

    ``manager``: the cluster's manager (name or IP; default cluster.yaml's); its registry must be running.
    ``user``: ssh login (default: ssh's own choice, e.g. from ~/.ssh/config); a non-root user needs
    passwordless sudo. ``parallel``: at most this many ssh sessions at once. ``connect_timeout``: seconds
    (ssh's ConnectTimeout). ``ssh_options``: extra ssh arguments, e.g. ("-F", "lab_ssh_config").
    ``progress``: called with a host's result dict (``HostResult.to_dict()``) whenever its step or status
    changes. Returns a ``DeployReport``; raises PibakeError only when nothing could be tried (bad host list,
    no cluster, expired join token) and NotBuiltError when the manager's registry is not running.
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
    on_manager = [t for t in targets if t in (cluster.manager, cluster.manager_ip)]
    if on_manager:
        raise NotBuiltError(f"deploying the manager ({on_manager[0]}) over ssh")
    try:
        parallel = int(parallel)
        connect_timeout = int(connect_timeout)
    except (TypeError, ValueError):
        raise DeployError("--parallel and --connect-timeout take whole numbers") from None
    if parallel < 1 or connect_timeout < 1:
        raise DeployError("--parallel and --connect-timeout must be at least 1")

    registry = RegistryClient(cluster, cluster_dir)
    why = registry.health()
    if why:
        raise NotBuiltError(
            f"the registry at {registry.base} does not answer ({why}); setting up the manager over ssh") from None
    sec = seed_secrets(cluster_dir)
    secrets = {"agent": agent_source().encode(), "ca": sec.ca_cert_pem.encode(), "token": sec.join_token}

    host_runs = [_Host(t) for t in targets]
    LOG.info("deploy: %d host(s), up to %d ssh sessions at once, registry %s", len(targets), parallel,
             registry.base)
    pipeline = _Pipeline(cluster, host_runs, secrets=secrets, user=user, parallel=parallel,
                         connect_timeout=connect_timeout, ssh_options=tuple(ssh_options), progress=progress)
    pipeline.run()
    # A node whose slurmd did not stay up (e.g. it started while slurmctld restarted for other nodes) is
    # not idle after a short while: run its agent once more (it starts what is not running), then wait.
    idle_end = time.monotonic() + idle_timeout
    _wait_idle(registry, host_runs, min(idle_timeout, AGENT_RETRY_AFTER_S), progress, final=False)
    stragglers = [h for h in host_runs if h.result.status == "running" and h.result.step == "idle"]
    if stragglers:
        LOG.info("deploy: %s not idle after %d s; running the agent there again",
                 ", ".join(h.result.host for h in stragglers), AGENT_RETRY_AFTER_S)
        pipeline.rerun_agent(stragglers)
    _wait_idle(registry, host_runs, max(0.0, idle_end - time.monotonic()), progress, budget=idle_timeout)
    return DeployReport(hosts=[h.result for h in host_runs], manager=cluster.manager,
                        registry=registry.base.rsplit("/api/v1", 1)[0], parallel=parallel,
                        started_at=started_wall, duration_s=time.monotonic() - t0)


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
