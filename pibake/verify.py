"""``pibake verify``: prove the cluster works, check by check, each failure saying what to do.

    report = verify("cluster")            # VerifyReport
    report.ok, report.to_json()           # to_json() is exactly `pibake verify --json`

Checks (names as in the JSON): ``registry`` (GET /api/v1/health over TLS pinned to the cluster CA),
``expected-nodes`` (burn manifest + plan.yaml vs enrolled), ``reachable`` (each node answers over its
connector), ``sinfo-idle``, ``srun`` (``srun -N<all> hostname``), ``munge`` (a credential made on the manager
decodes on every node and one made on each node decodes on the manager), ``clock-skew`` (per node against
munge's 300 s TTL) and ``slurm-conf`` (the manager's file vs the one each configless slurmd uses).

I/O lives in ``gather()`` (through a ``pibake.connect`` connector); every ``check_*`` function is pure over
command outputs and is tested on recorded outputs. Measured numbers live only in JSON keys ending in ``_s``
(and in ``bench``), so two runs on the same cluster differ only there and in ``started``/``finished``.
"""

import datetime as dt
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pibake.bake.manifest import latest_by_hostname
from pibake.benchmarks import bench_markdown, run_bench, write_plots
from pibake.cluster import load_cluster
from pibake.connect import Connectors, Job, LocalConnector, SshConnector, is_local_address
from pibake.errors import RegistryClientError
from pibake.files import atomic_write
from pibake.plan import recorded_plan
from pibake.registry.service import cluster_settings
from pibake.registry_client import RegistryClient

LOG = logging.getLogger(__name__)

MUNGE_TTL_S = 300
SKEW_WARN_S = 30
DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
# Where a configless slurmd keeps the slurm.conf it fetched: Slurm >= 23.02 under /run/slurm/conf,
# Slurm 22.05 (Debian 12, Raspberry Pi OS bookworm) under SlurmdSpoolDir/conf-cache; a node set up
# without configless mode reads /etc/slurm/slurm.conf.
NODE_CONF_PATHS = ("/run/slurm/conf/slurm.conf", "/var/spool/slurmd/conf-cache/slurm.conf",
                   "/etc/slurm/slurm.conf")
OK, FAIL, SKIP = "ok", "fail", "skip"
CHECKS = ("registry", "expected-nodes", "reachable", "sinfo-idle", "srun", "munge", "clock-skew", "slurm-conf")
HEALTHY_STATES = ("idle",)

# One round trip per node: name, clock, the slurm.conf in use, a fresh munge credential.
NODE_FACTS = (
    'echo "hostname=$(hostname)"\n'
    'echo "time=$(date +%s.%N)"\n'
    'for f in ' + " ".join(NODE_CONF_PATHS) + '; do\n'
    '  if [ -f "$f" ]; then echo "conf=$(sha256sum "$f" | cut -d" " -f1) $f"; break; fi\n'
    'done\n'
    'if c=$(munge -n 2>&1); then echo "cred=$c"; else echo "munge_error=$(echo "$c" | tail -n 1)"; fi\n'
)
MANAGER_FACTS = (
    'echo "hostname=$(hostname)"\n'
    'echo "time=$(date +%s.%N)"\n'
    'if [ -f "$1" ]; then echo "conf=$(sha256sum "$1" | cut -d" " -f1) $1"; fi\n'
    'if c=$(munge -n 2>&1); then echo "cred=$c"; else echo "munge_error=$(echo "$c" | tail -n 1)"; fi\n'
)


def utcnow():
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class CheckResult:
    name: str
    status: str  # ok | fail | skip
    summary: str
    details: list = field(default_factory=list)  # one line per node/problem
    action: str = ""  # what to do (empty when ok)
    data: dict = field(default_factory=dict)

    def to_json(self):
        return {"name": self.name, "status": self.status, "summary": self.summary, "details": list(self.details),
                "action": self.action, "data": self.data}


@dataclass
class VerifyReport:
    cluster: str
    manager: str
    nodes: list
    checks: list
    started: str
    finished: str
    duration_s: float
    bench: dict | None = None
    report_dir: str | None = None

    @property
    def ok(self):
        return all(c.status != FAIL for c in self.checks) and (self.bench is None or self.bench.get("ok", True))

    @property
    def failed(self):
        return [c for c in self.checks if c.status == FAIL]

    def to_json(self):
        return {"cluster": self.cluster, "manager": self.manager, "ok": self.ok, "nodes": self.nodes,
                "checks": [c.to_json() for c in self.checks], "bench": self.bench, "report_dir": self.report_dir,
                "started": self.started, "finished": self.finished, "duration_s": round(self.duration_s, 3)}


# ---------------------------------------------------------------------- pure parsers

def parse_verify_facts(text):
    """``key=value`` lines of NODE_FACTS/MANAGER_FACTS -> dict (time as float, conf as (sha, path))."""
    facts = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip()
        if key == "time":
            try:
                facts["time"] = float(value)
            except ValueError:
                pass
        elif key == "conf":
            sha, _, path = value.partition(" ")
            facts["conf"] = (sha.strip(), path.strip())
        elif key in ("hostname", "cred", "munge_error"):
            facts[key] = value.strip()
    return facts


UNMUNGE_STATUS_RE = re.compile(r"^STATUS:\s+(.+?)\s*\((\d+)\)\s*$", re.M)
UNMUNGE_ERROR_RE = re.compile(r"unmunge: Error: (.+)$", re.M)


def parse_unmunge(rc, stdout, stderr):
    """(ok, message) of one ``unmunge`` run: 'Success', 'Expired credential', 'Rewound credential', ..."""
    m = UNMUNGE_STATUS_RE.search(stdout or "")
    if m:
        return m.group(1) == "Success" and rc == 0, m.group(1)
    m = UNMUNGE_ERROR_RE.search(stderr or "")
    if m:
        return False, m.group(1).strip()
    lines = [ln for ln in (stderr or stdout or "").strip().splitlines() if ln.strip()]
    return False, lines[-1].strip() if lines else f"unmunge exited with {rc}"


def parse_sinfo_reasons(text):
    """``sinfo -N -h -o '%N|%T|%E'`` -> {node: (state, reason)} (a node listed in several partitions once)."""
    nodes = {}
    for line in (text or "").splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        reason = parts[2].strip() if len(parts) > 2 else ""
        nodes.setdefault(parts[0].strip(), (parts[1].strip(), "" if reason == "none" else reason))
    return nodes


# ---------------------------------------------------------------------- pure checks

def check_registry(health_error, health):
    if health_error:
        return CheckResult("registry", FAIL, f"the registry does not answer: {health_error}", [],
                           "start it on the manager (`pibake registry serve`, or `systemctl status pibake-registry`) "
                           "and check that this machine reaches the manager's port")
    return CheckResult("registry", OK, f"healthy (version {health.get('version')}, {health.get('nodes')} node(s) "
                       "recorded), TLS verified against the cluster CA", data={"health": health})


def check_expected(burned, planned, enrolled, manager):
    """Burn manifest ({host: latest entry}) + plan ({host: role}) vs enrolled ({host: node}); None = unknown."""
    if enrolled is None:
        return CheckResult("expected-nodes", SKIP, "cannot list the enrolled nodes: the registry does not answer",
                           action="fix the registry check first")
    problems, actions = [], []
    expected = set()
    for host, entry in sorted(burned.items()):
        if host == manager or entry.get("role") == "manager":
            continue
        expected.add(host)
        status = entry.get("status")
        when = entry.get("finished") or entry.get("started") or "?"
        if status in ("incomplete", "failed"):
            reason = entry.get("reason") or "the burn never finished"
            problems.append(f"{host}: its latest burn is {status} ({reason})")
            actions.append(f"burn {host}'s card again (`pibake burn --hostname {host} ...`)")
        elif status == "running":
            problems.append(f"{host}: its card is still being burned")
            actions.append(f"wait for the burn of {host} to finish")
        elif host not in enrolled:
            problems.append(f"{host}: card burned ({when}) but it never enrolled")
            actions.append(f"power {host} on and check its network; on it, see /var/log/cloud-init-output.log "
                           "and the agent's log (journalctl -u pibake-agent)")
    for host, role in sorted(planned.items()):
        if host == manager or role == "manager" or host in burned:
            continue
        expected.add(host)
        if host not in enrolled:
            problems.append(f"{host}: planned (plan.yaml) but never burned, deployed or enrolled")
            actions.append(f"burn a card for {host} or `pibake deploy --hosts {host}`, or remove it from plan.yaml")
    for host, node in sorted(enrolled.items()):
        if node.get("status") == "pending":
            problems.append(f"{host}: enrolled but pending approval")
            actions.append(f"accept it: `pibake registry accept {host}`")
        elif node.get("status") == "error":
            problems.append(f"{host}: reported an error: {node.get('message') or 'no message'}")
            actions.append(f"read the agent's log on {host} and run it again")
    extra = sorted(set(enrolled) - expected)
    data = {"expected": sorted(expected), "enrolled": sorted(enrolled), "not_in_manifest_or_plan": extra}
    if problems:
        return CheckResult("expected-nodes", FAIL, f"{len(problems)} problem(s): " + "; ".join(problems),
                           problems, "; ".join(dict.fromkeys(actions)), data)
    source = "burn manifest + plan.yaml" if expected else "no burn manifest or plan recorded"
    return CheckResult("expected-nodes", OK, f"{len(enrolled)} node(s) enrolled, every expected one ({source}) "
                       "among them", data=data)


def check_reachable(nodes, outputs, via):
    bad = [(n, outputs[n]) for n in nodes if not outputs[n].ok]
    if not nodes:
        return CheckResult("reachable", SKIP, "no worker nodes known (registry and sinfo list none)",
                           action="enrol nodes first")
    if bad:
        details = [f"{n}: unreachable over {via.get(n, 'ssh')}: {o.reason()}" for n, o in bad]
        return CheckResult("reachable", FAIL, f"{len(bad)} of {len(nodes)} node(s) unreachable: "
                           + ", ".join(n for n, _ in bad), details,
                           "check that " + ", ".join(n for n, _ in bad) + " is powered on and on the network "
                           "(ping it, `ssh <user>@<its ip>`); the cluster user's key must be authorized there",
                           {"unreachable": [n for n, _ in bad]})
    return CheckResult("reachable", OK, f"all {len(nodes)} node(s) answer", data={"via": via})


def check_idle(nodes, sinfo, sinfo_error, plugs=None):
    """``plugs``: {node: switch name} from cluster.yaml; a down node on a switch names it and `pibake recover`."""
    plugs = plugs or {}
    if sinfo_error:
        return CheckResult("sinfo-idle", FAIL, f"sinfo failed on the manager: {sinfo_error}", [],
                           "check slurmctld on the manager (`scontrol ping`, /var/log/slurm/slurmctld.log)")
    problems = []
    for n in nodes:
        if n not in sinfo:
            problems.append(f"{n}: not in sinfo (slurm.conf does not list it)")
        elif sinfo[n][0] not in HEALTHY_STATES:
            state, reason = sinfo[n]
            problem = f"{n}: {state}" + (f" ({reason})" if reason else "")
            if n in plugs and (state.endswith("*") or state.startswith("down")):
                problem += f"; switch {plugs[n]} powers it: `pibake recover {n}` power-cycles it if it hangs"
            problems.append(problem)
    states = {n: sinfo[n][0] for n in sinfo}
    if problems:
        action = ("for a down or not responding (*) node check that it runs and slurmd is started there "
                  "(`systemctl status slurmd`); then `scontrol update nodename=<node> state=resume`")
        return CheckResult("sinfo-idle", FAIL, f"{len(problems)} node(s) not idle: " + "; ".join(problems),
                           problems, action, {"states": states})
    if not nodes:
        return CheckResult("sinfo-idle", SKIP, "sinfo lists no nodes", action="enrol nodes first",
                           data={"states": states})
    return CheckResult("sinfo-idle", OK, f"all {len(nodes)} node(s) idle", data={"states": states})


def check_srun(nodes, output, excluded=None):
    """``nodes``: where srun ran; ``excluded``: {node: why it was not tried} (unreachable or not idle)."""
    excluded = dict(excluded or {})
    if not nodes and not excluded:
        return CheckResult("srun", SKIP, "no nodes to run on")
    names = output.stdout.split() if output else []
    missing = [n for n in nodes if n not in names]
    if output is not None and output.rc == 0 and not missing and not excluded:
        return CheckResult("srun", OK, f"srun -N{len(nodes)} hostname returned every node name")
    details = [f"{n}: no output from srun" for n in missing] + [f"{n}: not tried ({why})"
                                                                for n, why in sorted(excluded.items())]
    reason = output.reason() if output is not None and output.rc != 0 else (
        "some nodes did not answer" if missing else "some nodes could not be tried")
    return CheckResult("srun", FAIL, f"srun -N{len(nodes)} hostname: {reason}; missing: "
                       + (", ".join(missing + sorted(excluded)) or "none"), details,
                       "look at the nodes named (reachable and sinfo-idle checks) and at slurmd's log on them "
                       "(/var/log/slurm/slurmd.log)", {"missing": missing + sorted(excluded)})


def check_munge(manager, manager_facts, to_nodes, from_nodes, nodes):
    """``to_nodes``: {node: (ok, message)} decoding the manager's credential there; ``from_nodes``:
    {node: (ok, message)} decoding each node's credential on the manager (None when it made none)."""
    if manager_facts.get("munge_error") or "cred" not in manager_facts:
        return CheckResult("munge", FAIL, f"munge -n failed on the manager {manager}: "
                           f"{manager_facts.get('munge_error', 'no answer')}", [],
                           f"start munged on {manager} (`systemctl start munge`) and check /etc/munge/munge.key")
    if not nodes:
        return CheckResult("munge", SKIP, f"munge works on the manager {manager}, but no node could be reached "
                           "to check credentials across hosts", [], "see the reachable check")
    problems = []
    for n in nodes:
        ok, msg = to_nodes.get(n, (False, "not tried (node unreachable)"))
        if not ok:
            problems.append(f"{n}: the manager's credential does not decode there: {msg}")
        back = from_nodes.get(n)
        if back is None:
            problems.append(f"{n}: cannot make a credential there (munged not running?)")
        elif not back[0]:
            problems.append(f"{n}: its credential does not decode on the manager: {back[1]}")
    if problems:
        msgs = " ".join(problems)
        if "Invalid credential" in msgs:
            action = "the munge key differs: copy the cluster's secrets/munge.key to /etc/munge/munge.key " \
                     "(0400, owner munge) on the node and restart munge"
        elif "Expired" in msgs or "Rewound" in msgs:
            action = "a clock is off by more than munge's 300 s TTL: see the clock-skew check"
        else:
            action = "start munged on the node (`systemctl start munge`) and check /etc/munge/munge.key there"
        return CheckResult("munge", FAIL, f"{len(problems)} problem(s): " + "; ".join(problems), problems, action)
    return CheckResult("munge", OK, f"credentials decode both ways between {manager} and all {len(nodes)} node(s)")


def describe_skew(node, manager, skew_s, limit_s=MUNGE_TTL_S):
    """Plain language: 'red02's clock is 612 s ahead of the manager: munge rejects its credentials ...'."""
    direction = "ahead of" if skew_s > 0 else "behind"
    amount = abs(round(skew_s))
    if abs(skew_s) > limit_s:
        return (f"{node}'s clock is {amount} s {direction} the manager ({manager}): munge rejects its "
                f"credentials (limit {limit_s} s); check time sync (timesyncd/chrony) on {node}")
    return (f"{node}'s clock is {amount} s {direction} the manager ({manager}): within munge's {limit_s} s "
            f"but drifting; check time sync (timesyncd/chrony) on {node}")


def check_skew(manager, offsets, nodes, limit_s=MUNGE_TTL_S, warn_s=SKEW_WARN_S):
    """``offsets``: {host: (offset from this machine's clock, uncertainty)} for the manager and nodes."""
    if manager not in offsets:
        return CheckResult("clock-skew", SKIP, f"the manager's clock could not be read ({manager} did not answer)")
    base, base_err = offsets[manager]
    skews, bad, drifting = {}, [], []
    for n in nodes:
        if n not in offsets:
            continue
        off, err = offsets[n]
        skew = off - base
        skews[n] = round(skew, 3)
        if abs(skew) > limit_s:
            bad.append(describe_skew(n, manager, skew, limit_s))
        elif abs(skew) > warn_s:
            drifting.append(describe_skew(n, manager, skew, limit_s))
    data = {"skew_s": skews, "limit_s": limit_s}
    if bad:
        return CheckResult("clock-skew", FAIL, "; ".join(bad), bad + drifting,
                           "enable time sync on the nodes named (`timedatectl set-ntp true`, or chrony) and check "
                           "that they reach an NTP server; set the clock by hand once with `date -s` if needed",
                           data)
    if not skews:
        return CheckResult("clock-skew", SKIP, "no node's clock could be read", data=data)
    if drifting:
        return CheckResult("clock-skew", OK, f"every clock within munge's {limit_s} s; drifting: "
                           + "; ".join(drifting), drifting, data=data)
    return CheckResult("clock-skew", OK, f"all {len(skews)} node clock(s) within {warn_s} s of the manager "
                       f"(munge allows {limit_s} s)", data=data)


def check_conf(manager, manager_facts, node_facts, nodes):
    if "conf" not in manager_facts:
        return CheckResult("slurm-conf", FAIL, f"no slurm.conf found on the manager {manager}", [],
                           "the registry writes it when the first worker enrols: check `pibake registry serve`")
    sha, path = manager_facts["conf"]
    problems, used = [], {}
    for n in nodes:
        facts = node_facts.get(n)
        if facts is None:
            continue
        if "conf" not in facts:
            problems.append(f"{n}: slurmd has no slurm.conf (looked in {', '.join(NODE_CONF_PATHS)})")
            continue
        nsha, npath = facts["conf"]
        used[n] = npath
        if nsha != sha:
            problems.append(f"{n}: {npath} differs from the manager's {path}")
    data = {"manager_sha256": sha, "manager_path": path, "node_paths": used}
    if problems:
        return CheckResult("slurm-conf", FAIL, f"{len(problems)} node(s) use another slurm.conf: "
                           + "; ".join(problems), problems,
                           "run `scontrol reconfigure` on the manager (configless slurmds fetch it again), or "
                           "restart slurmd on the nodes named", data)
    if not used:
        return CheckResult("slurm-conf", SKIP, "no node's slurm.conf could be read", data=data)
    return CheckResult("slurm-conf", OK, f"all {len(used)} node(s) use the manager's slurm.conf "
                       f"(sha256 {sha[:12]})", data=data)


# ---------------------------------------------------------------------- gathering (I/O)

@dataclass
class Target:
    """Where verify runs things: the manager, the worker nodes and how to reach each."""

    cluster_dir: Path
    cluster: object
    connectors: Connectors
    slurm_conf: str = DEFAULT_SLURM_CONF

    @property
    def manager(self):
        return self.cluster.manager

    def manager_run(self, script_or_argv, *, timeout=60, input=None):
        argv = script_or_argv
        return self.connectors.run(self.manager, ["env", f"SLURM_CONF={self.slurm_conf}", *argv],
                                   timeout=timeout, input=input)


def fetch_registry(cluster_dir, cluster, timeout=10):
    """(health, nodes, error): GET /health and /nodes (admin) through the shared registry client; ``error`` is
    the RegistryClientError's one line (URL, reason, the registry's message) or None."""
    client = RegistryClient.for_cluster(cluster, cluster_dir, timeout=timeout)
    try:
        return client.health(), client.nodes(), None
    except RegistryClientError as exc:
        return None, None, str(exc)
    finally:
        client.close()


def served_slurm_conf(cluster_dir):
    """The slurm.conf path the registry writes: what `registry serve` recorded, cluster.yaml, or the default."""
    try:
        from pibake.registry.server import served_options  # start-up: Flask loads only when verify runs

        opts = served_options(cluster_dir) or {}
        if opts.get("slurm_conf"):
            return opts["slurm_conf"]
    except Exception:  # noqa: BLE001  best effort: fall back to cluster.yaml
        LOG.debug("no recorded serve options", exc_info=True)
    try:
        return cluster_settings(cluster_dir)["registry"].get("slurm_conf") or DEFAULT_SLURM_CONF
    except Exception:  # noqa: BLE001
        return DEFAULT_SLURM_CONF


def make_connectors(cluster, addresses, *, user=None, identity=None, known_hosts=None, connect_timeout=5):
    """Local for the manager when this machine is the manager, ssh (as ``user``, default the cluster's user)
    for everything else, hosts addressed by the IP the registry recorded."""
    addresses = dict(addresses)
    addresses.setdefault(cluster.manager, cluster.manager_ip)
    ssh = SshConnector(user=user or cluster.user, identity=identity, known_hosts=known_hosts,
                       connect_timeout=connect_timeout, addresses=addresses)
    local = [cluster.manager] if is_local_address(cluster.manager_ip) else []
    return Connectors(ssh, local_hosts=local, local=LocalConnector())


def _offset(facts, out):
    """(clock offset, its uncertainty) of the host that answered ``out`` with ``facts``, or None."""
    if "time" not in facts or out.started is None or out.ended is None:
        return None
    return facts["time"] - (out.started + out.ended) / 2, (out.ended - out.started) / 2


def verify(cluster_dir, *, bench=False, report_dir=None, user=None, identity=None, known_hosts=None,
           connect_timeout=5, connectors=None, progress=None, bench_options=None):
    """Run every check (and the benchmarks with ``bench``); return a VerifyReport.

    ``report_dir``: write report.json + report.md there (with ``bench`` also the plots); with ``bench`` and no
    ``report_dir`` the report goes to ``<cluster>/reports/<UTC time>/``. A written report also becomes
    ``<cluster>/reports/latest`` (what the registry page shows). ``progress(fraction, message)`` is called as
    checks finish. ``connectors``: a ``pibake.connect.Connectors`` (default: local/ssh, see make_connectors).
    """
    cluster_dir = Path(cluster_dir)
    cluster = load_cluster(cluster_dir)
    started, t_start = utcnow(), time.monotonic()
    step = _CheckProgress(progress, 9 if bench else 7)
    checks = []

    step("asking the registry")
    health, enrolled_list, reg_error = fetch_registry(cluster_dir, cluster)
    checks.append(check_registry(reg_error, health))
    enrolled = None if enrolled_list is None else {n["hostname"]: n for n in enrolled_list}
    burned = latest_by_hostname(cluster_dir)
    planned = {n.hostname: n.role for n in recorded_plan(cluster_dir)}
    checks.append(check_expected(burned, planned, enrolled, cluster.manager))

    slurm_conf = served_slurm_conf(cluster_dir)
    addresses = {h: n["ip"] for h, n in (enrolled or {}).items() if n.get("ip")}
    if connectors is None:
        connectors = make_connectors(cluster, addresses, user=user, identity=identity, known_hosts=known_hosts,
                                     connect_timeout=connect_timeout)
    target = Target(cluster_dir, cluster, connectors, slurm_conf)

    step("sinfo on the manager")
    sinfo_out = target.manager_run(["sinfo", "-N", "-h", "-o", "%N|%T|%E"], timeout=30)
    sinfo = parse_sinfo_reasons(sinfo_out.stdout) if sinfo_out.ok else {}
    sinfo_error = None if sinfo_out.ok else sinfo_out.reason()
    workers = sorted({h for h, n in (enrolled or {}).items()
                      if n.get("role") == "worker" and n.get("status") != "pending"} | set(sinfo))

    step("reaching the manager and the nodes")
    hosts = [cluster.manager] + workers
    facts_runs = connectors.run_many(
        hosts, lambda host: ["sh", "-c", MANAGER_FACTS, "sh", slurm_conf] if host == cluster.manager
        else ["sh", "-c", NODE_FACTS], timeout=30)
    manager_out = facts_runs[cluster.manager]
    manager_facts = parse_verify_facts(manager_out.stdout) if manager_out.ok else {}
    node_outs = {n: facts_runs[n] for n in workers}
    checks.append(check_reachable(workers, node_outs, {n: connectors.describe(n) for n in workers}))
    reachable = [n for n in workers if node_outs[n].ok]
    node_facts = {n: parse_verify_facts(node_outs[n].stdout) for n in reachable}
    checks.append(check_idle(workers, sinfo, sinfo_error, {s.node: s.name for s in cluster.switches if s.node}))

    step("srun on every node")
    excluded = {n: "unreachable" for n in workers if n not in reachable}
    excluded.update({n: f"sinfo state {sinfo[n][0]}" if n in sinfo else "not in sinfo"
                     for n in reachable if sinfo.get(n, ("",))[0] not in HEALTHY_STATES})
    runnable = [n for n in workers if n not in excluded]
    if sinfo_error:
        checks.append(CheckResult("srun", SKIP, "skipped: sinfo failed on the manager"))
    elif runnable:
        argv = ["srun", "--immediate=20", f"-N{len(runnable)}", "-w", ",".join(runnable), "hostname"]
        srun_out = target.manager_run(argv, timeout=60)
        if not srun_out.ok:  # one retry: a step launched while slurmds re-read their config can abort
            LOG.info("srun failed (%s); trying once more", srun_out.reason())
            time.sleep(2)
            srun_out = target.manager_run(argv, timeout=60)
        checks.append(check_srun(runnable, srun_out, excluded))
    else:
        checks.append(check_srun([], None, excluded))

    step("munge both ways")
    to_nodes, from_nodes = {}, {}
    if manager_facts.get("cred"):
        outs = connectors.run_many(reachable, ["unmunge"], input=manager_facts["cred"] + "\n", timeout=30)
        to_nodes = {n: parse_unmunge(o.rc, o.stdout, o.stderr) for n, o in outs.items()}
    creds = {n: f["cred"] for n, f in node_facts.items() if f.get("cred")}
    if creds and manager_out.ok:
        outs = connectors.run_each({n: Job(cluster.manager, ["unmunge"], cred + "\n") for n, cred in creds.items()},
                                   timeout=30, fanout=16)
        from_nodes = {n: parse_unmunge(o.rc, o.stdout, o.stderr) for n, o in outs.items()}
    if not manager_out.ok:
        checks.append(CheckResult("munge", FAIL, f"the manager {cluster.manager} does not answer: "
                                  f"{manager_out.reason()}", [], "check that this machine reaches the manager"))
    else:
        checks.append(check_munge(cluster.manager, manager_facts, to_nodes, from_nodes, reachable))

    step("clocks and slurm.conf")
    offsets = {}
    for host, out in facts_runs.items():
        facts = manager_facts if host == cluster.manager else node_facts.get(host, {})
        off = _offset(facts, out)
        if off is not None:
            offsets[host] = off
    checks.append(check_skew(cluster.manager, offsets, reachable))
    checks.append(check_conf(cluster.manager, manager_facts, node_facts, reachable))

    bench_result = None
    if bench:
        step("benchmarks")
        bench_result = run_bench(target, reachable, progress=step.sub, **(bench_options or {}))
    step("done")
    nodes = [{"hostname": n, "ip": addresses.get(n), "via": connectors.describe(n)} for n in workers]
    report = VerifyReport(cluster=cluster.name, manager=cluster.manager, nodes=nodes, checks=checks,
                          started=started, finished=utcnow(), duration_s=time.monotonic() - t_start,
                          bench=bench_result)
    if bench and report_dir is None:
        report_dir = cluster_dir / "reports" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if report_dir is not None:
        report.report_dir = str(Path(report_dir).resolve())
        write_report(report, report_dir, cluster_dir)
    return report


class _CheckProgress:
    """verify's progress through its checks: ``callback(fraction done, message)`` as each one starts."""

    def __init__(self, callback, steps):
        self.callback = callback
        self.steps = steps
        self.done = 0

    def __call__(self, message):
        if self.callback:
            self.callback(min(self.done / self.steps, 1.0), message)
        self.done += 1

    def sub(self, message):
        if self.callback:
            self.callback(min(self.done / self.steps, 1.0), message)


# ---------------------------------------------------------------------- report files

def render_markdown(report_json):
    r = report_json
    lines = [f"# pibake verify: cluster {r['cluster']}", "",
             f"{'All checks passed' if r['ok'] else 'FAILED'} — manager {r['manager']}, "
             f"{len(r['nodes'])} node(s), {r['started']}", "", "| check | result | summary |", "|---|---|---|"]
    for c in r["checks"]:
        lines.append(f"| {c['name']} | {c['status']} | {c['summary'].replace('|', '/')} |")
    for c in r["checks"]:
        if c["status"] == FAIL:
            lines += ["", f"**{c['name']}**: what to do: {c['action']}"]
    if r.get("bench"):
        lines += ["", *bench_markdown(r["bench"])]
    return "\n".join(lines) + "\n"


def write_report(report, report_dir, cluster_dir):
    """report.json, report.md (and with bench the PNG plots) in ``report_dir``; ``<cluster>/reports/latest``
    then points at it."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    if report.bench:
        data["bench"]["plots"] = write_plots(report.bench, report_dir)
        report.bench["plots"] = data["bench"]["plots"]
    atomic_write(report_dir / "report.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    (report_dir / "report.md").write_text(render_markdown(data))
    latest = Path(cluster_dir) / "reports" / "latest"
    latest.parent.mkdir(parents=True, exist_ok=True)
    if report_dir.resolve() != latest.resolve():
        link_tmp = latest.with_name(".latest.tmp")
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        link_tmp.symlink_to(report_dir.resolve())
        if latest.exists() and not latest.is_symlink():
            shutil.rmtree(latest)
        link_tmp.replace(latest)
    LOG.info("report written to %s", report_dir)
    return report_dir
