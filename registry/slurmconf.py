"""slurm.conf from enrolled nodes' ``slurmd -C`` facts. Pure: data in, text out; no disk, no clock.

Decisions (documented in docs/ as well):

* **Topology as reported.** Each NodeName line carries CPUs, Boards, SocketsPerBoard, CoresPerSocket and
  ThreadsPerCore exactly as the node's ``slurmd -C`` printed them: CPUs alone makes slurmctld drain the node
  with "Node configuration differs from hardware".
* **RealMemory margin.** Configured = reported minus max(3 %, 64 MiB), rounded down to a multiple of 32 MiB.
  MemTotal moves by tens of MiB across kernel updates, firmware (``gpu_mem``/CMA) changes and even boots,
  and a node whose configured RealMemory exceeds what its slurmd finds is drained ("Low RealMemory").
* **NodeAddr=<ip>** on every line, so neither the manager nor the nodes need DNS or /etc/hosts.
* **Folding.** Nodes with identical topology and board model, and memory within 2 %, share one line
  (configured from the smallest of them), names and addresses folded on their trailing number with
  ClusterShell's RangeSet, the engine of its NodeSet (``red[01-03]`` / ``10.1.1.[11-13]``). Slurm pairs the
  n-th name with the n-th address, expanding comma-separated parts in written order, so the address list
  is built in the names' order (runs of ascending addresses folded, e.g. ``10.1.1.13,10.1.1.[11-12]``).
  Lines stay under 1000 characters (split into chunks when longer).
* **Configless.** ``SlurmctldParameters=enable_configless``: nodes run ``slurmd --conf-server <manager>:6817``
  and fetch this file from slurmctld; the registry only writes it on the manager.
* **Ports and timeouts.** SlurmctldPort 6817, SlurmdPort 6818 (Slurm's defaults; the agent and firewalls
  rely on them). SlurmdTimeout 60 s: a Pi that stops answering is ``down`` within about a minute, while a
  Wi-Fi blip of a few seconds does not flap it. SlurmctldTimeout 120 s (default). MessageTimeout 30 s
  (default 10): a Pi 3 on an SD card under load can be slow to answer RPCs. ReturnToService 2: a node that
  was down for not responding comes back by itself as soon as its slurmd registers with a valid config.
* **Settings that work on Raspberry Pi OS with systemd and in the lab without it:** proctrack/linuxproc and
  task/none (no cgroup v2 requirements), MailProg=/bin/true, select/cons_tres with CR_Core (memory is not
  a consumable resource, so a job without ``--mem`` does not take a whole node's memory).
* **The running Slurm's version** (``parse_slurm_version`` of ``slurmctld -V``; ``VERSION_CHANGES``): the
  file names the credential plugin ``CredType=cred/munge`` (its name since Slurm 19.05; ``CryptoType`` is an
  old alias), which Slurm 22.05 (bookworm) and 24.11 (trixie) both read. From 23.11 the ``*/none`` plugins
  no longer exist (an unset key means none), so their keys are left out; from 23.11.4 ``DebugFlags=
  GLOB_SILENCE`` silences the error that Debian's ``plugstack.conf`` (``include plugstack.conf.d/*.conf``,
  a glob Slurm cannot expand) logs at every start and reconfigure; 22.05 refuses that flag. An unknown
  version gets the 22.05 file, which 24.11 reads too.
"""

import ipaddress
import re

from ClusterShell.NodeSet import NodeSet
from ClusterShell.RangeSet import RangeSet

from pibake import fields
from pibake.errors import SlurmdCError

TOPOLOGY_KEYS = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
INT_KEYS = TOPOLOGY_KEYS + ("RealMemory", "Sockets", "TmpDisk")
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
MEMORY_MARGIN_FRACTION = 0.03
MEMORY_MARGIN_MIN_MB = 64
MEMORY_ROUND_MB = 32
DEFAULT_PARTITION = "main"
# Older slurm.conf parsers limited lines to 1024 characters: longer folded lines are split.
MAX_LINE = 1000

# Settings that do not depend on the nodes. Overridable key by key (tests point the paths at a temp dir).
DEFAULT_SETTINGS = {
    "SlurmUser": "slurm",
    "SlurmctldPort": str(SLURMCTLD_PORT),
    "SlurmdPort": str(SLURMD_PORT),
    "AuthType": "auth/munge",
    "CredType": "cred/munge",
    "SlurmctldParameters": "enable_configless",
    "StateSaveLocation": "/var/spool/slurmctld",
    "SlurmdSpoolDir": "/var/spool/slurmd",
    "SlurmctldPidFile": "/run/slurmctld.pid",
    "SlurmdPidFile": "/run/slurmd.pid",
    "SlurmctldLogFile": "/var/log/slurm/slurmctld.log",
    "SlurmdLogFile": "/var/log/slurm/slurmd.log",
    "ProctrackType": "proctrack/linuxproc",
    "TaskPlugin": "task/none",
    "MailProg": "/bin/true",
    "ReturnToService": "2",
    "SchedulerType": "sched/backfill",
    "SelectType": "select/cons_tres",
    "SelectTypeParameters": "CR_Core",
    "SlurmctldTimeout": "120",
    "SlurmdTimeout": "60",
    "MessageTimeout": "30",
    "InactiveLimit": "0",
    "KillWait": "30",
    "MinJobAge": "300",
    "Waittime": "0",
    "JobAcctGatherType": "jobacct_gather/none",
    "AccountingStorageType": "accounting_storage/none",
    "JobCompType": "jobcomp/none",
    "SlurmctldDebug": "info",
    "SlurmdDebug": "info",
}

# What changes in the generated file from a Slurm version on: (version, {key: value, or None to drop it}).
# Applied in order over DEFAULT_SETTINGS; a caller's own settings still win. Sources: Slurm's RELEASE_NOTES
# and read_config.c of each release (see the module docstring).
VERSION_CHANGES = (
    # 23.11 removed the 'none' plugins (except auth/cred): an unset key is the same thing
    ((23, 11, 0), {"TaskPlugin": None, "JobAcctGatherType": None, "AccountingStorageType": None,
                   "JobCompType": None}),
    # 23.11.4 added DebugFlags=GLOB_SILENCE; earlier releases reject the unknown flag
    ((23, 11, 4), {"DebugFlags": "GLOB_SILENCE"}),
)

_VERSION_RE = re.compile(r"^\s*slurm(?:-wlm)?\s+(\d+)\.(\d+)\.(\d+)", re.M)


def parse_slurm_version(text):
    """``(major, minor, micro)`` from what ``slurmctld -V`` (or ``slurmd -V``) prints, else None.

    >>> parse_slurm_version("slurm-wlm 24.11.5\n")
    (24, 11, 5)
    """
    match = _VERSION_RE.search(text or "")
    return tuple(int(g) for g in match.groups()) if match else None


def version_settings(version):
    """DEFAULT_SETTINGS as the Slurm ``version`` (a tuple, or None when unknown) wants them."""
    merged = dict(DEFAULT_SETTINGS)
    for since, changes in VERSION_CHANGES:
        if version is not None and tuple(version) >= since:
            for key, value in changes.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
    return merged


_KV_RE = re.compile(r"(\w+)=(\S+)")


def parse_slurmd_c(text):
    """Parse ``slurmd -C`` output into a dict (ints for numbers). Only the ``NodeName=`` line counts.

    >>> parse_slurmd_c("NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 "
    ...                "ThreadsPerCore=1 RealMemory=24105\\nUpTime=0-00:07:20")["CoresPerSocket"]
    2
    """
    if not isinstance(text, str):
        raise SlurmdCError("slurmd_c must be the text printed by `slurmd -C`")
    line = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("NodeName=")), None)
    if line is None:
        raise SlurmdCError("slurmd_c has no line starting with NodeName= (send the output of `slurmd -C`)")
    facts = {}
    for key, value in _KV_RE.findall(line):
        if key in INT_KEYS:
            try:
                facts[key] = int(value)
            except ValueError:
                raise SlurmdCError(f"slurmd_c: {key}={value} is not a whole number") from None
        else:
            facts[key] = value
    missing = [k for k in ("CPUs", "CoresPerSocket", "ThreadsPerCore", "RealMemory") if k not in facts]
    if missing:
        raise SlurmdCError(f"slurmd_c lacks {', '.join(missing)}")
    facts.setdefault("Boards", 1)
    if "SocketsPerBoard" not in facts:
        facts["SocketsPerBoard"] = facts.get("Sockets") or max(
            1, facts["CPUs"] // (facts["CoresPerSocket"] * facts["ThreadsPerCore"] * facts["Boards"]))
    bad = [k for k in TOPOLOGY_KEYS + ("RealMemory",) if facts[k] < 1]
    if bad:
        raise SlurmdCError(f"slurmd_c: {', '.join(bad)} must be at least 1")
    return facts


def configured_memory(reported_mb):
    """RealMemory to configure for a node that reports ``reported_mb`` (see module docstring)."""
    margin = max(MEMORY_MARGIN_MIN_MB, int(reported_mb * MEMORY_MARGIN_FRACTION))
    value = (reported_mb - margin) // MEMORY_ROUND_MB * MEMORY_ROUND_MB
    return max(1, value)


def slurm_cluster_name(name):
    """Slurm lower-cases ClusterName and allows letters, digits, '_' and '-'; keep it at 40 chars."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", str(name).lower()).strip("-")
    return (cleaned or "pibake")[:40]


MEMORY_FOLD_TOLERANCE = 0.02


def model_family(model):
    """``Raspberry Pi 4 Model B Rev 1.4`` -> ``Raspberry Pi 4 Model B``: board revisions fold together."""
    return re.sub(r"\s+Rev\s+\S+$", "", (model or "").strip())


def _groups(nodes):
    """{(topology..., configured memory): [nodes]}. Nodes of one topology and board model whose reported
    memory lies within 2 % of the smallest among them share one line, configured from that smallest."""
    by_kind = {}
    for node in nodes:
        facts = node["facts"]
        kind = tuple(facts[k] for k in TOPOLOGY_KEYS) + (model_family(node.get("model")),)
        by_kind.setdefault(kind, []).append(node)
    groups = {}
    for kind, members in by_kind.items():
        members.sort(key=lambda n: (n["facts"]["RealMemory"], n["hostname"]))
        base = None
        for node in members:
            mem = node["facts"]["RealMemory"]
            if base is None or mem > base * (1 + MEMORY_FOLD_TOLERANCE):
                base = mem
            groups.setdefault(kind[:-1] + (configured_memory(base), kind[-1]), []).append(node)
    return groups


_LAST_NUMBER = re.compile(r"^(.*?)(\d+)$")
_TOP_LEVEL_COMMA = re.compile(r",(?![^\[]*\])")


def _piece(prefix, numbers):
    """``prefix[ranges]`` folded by ClusterShell's RangeSet (padding kept), and its expansion in order."""
    rangeset = RangeSet(",".join(numbers))
    expanded = [prefix + n for n in rangeset]
    if len(expanded) == 1:
        return expanded[0], expanded
    return f"{prefix}[{rangeset}]", expanded


def fold_names(names):
    """Fold hostnames on their trailing number: ``red[01-03],blue1``. Returns ``(hostlist, order)`` where
    ``order`` is how Slurm expands the hostlist (parts in written order, each range ascending)."""
    by_prefix, plain = {}, []
    for name in names:
        m = _LAST_NUMBER.match(name)
        if m:
            by_prefix.setdefault(m.group(1), []).append(m.group(2))
        else:
            plain.append(name)
    parts, order = [], []
    for prefix in sorted(by_prefix):
        part, expanded = _piece(prefix, by_prefix[prefix])
        parts.append(part)
        order += expanded
    for name in sorted(plain):
        parts.append(name)
        order.append(name)
    return ",".join(parts), order


def fold_in_order(items):
    """Fold ``items`` (addresses) into a hostlist that Slurm expands in exactly this order: runs of one
    prefix with ascending numbers fold (``10.1.1.[11-13]``), runs join with ','. None if it cannot."""
    parts, run_prefix, run, last = [], None, [], None
    for item in items:
        m = _LAST_NUMBER.match(item)
        if not m or (m.group(2).startswith("0") and len(m.group(2)) > 1):
            return None  # padded numbers: keep it simple, one line per node
        prefix, number = m.group(1), int(m.group(2))
        if run and (prefix != run_prefix or number <= last):
            parts.append(_piece(run_prefix, run)[0])
            run = []
        run_prefix, last = prefix, number
        run.append(m.group(2))
    if run:
        parts.append(_piece(run_prefix, run)[0])
    return ",".join(parts)


def expand_hostlist(hostlist):
    """Expand a hostlist as Slurm does (parts in written order, ranges ascending). For checks and tests."""
    out = []
    for part in _TOP_LEVEL_COMMA.split(hostlist):
        out.extend(NodeSet(part, fold_axis=[-1]))
    return out


def _lines_for(names, by_name, spec):
    folded, ordered = fold_names(names)
    if len(ordered) > 1:
        addrs = fold_in_order([by_name[n] for n in ordered])
        if addrs is not None:
            line = f"NodeName={folded} NodeAddr={addrs} {spec} State=UNKNOWN"
            if len(line) <= MAX_LINE:
                return [line]
            # Cut into chunks of the size that should fit, then check each (smaller again if needed).
            size = max(1, min(len(ordered) // 2, len(ordered) * (MAX_LINE - 150) // len(line)))
            out = []
            for i in range(0, len(ordered), size):
                out += _lines_for(ordered[i:i + size], by_name, spec)
            return out
    return [f"NodeName={n} NodeAddr={by_name[n]} {spec} State=UNKNOWN" for n in ordered]


def _group_lines(key, members):
    """NodeName lines for ``members`` (dicts with hostname, ip) sharing topology ``key``."""
    cpus, boards, sockets, cores, threads, memory, _model = key
    spec = (f"CPUs={cpus} Boards={boards} SocketsPerBoard={sockets} CoresPerSocket={cores} "
            f"ThreadsPerCore={threads} RealMemory={memory}")
    by_name = {m["hostname"]: m["ip"] for m in members}
    return _lines_for(list(by_name), by_name, spec)


def node_lines(nodes):
    """The NodeName lines for ``nodes`` (see ``generate_slurm_conf``), grouped and folded, sorted by name."""
    groups = _groups(nodes)
    lines = []
    # Order groups by their first hostname so the file is stable whatever the DB order.
    for key, members in sorted(groups.items(), key=lambda kv: min(m["hostname"] for m in kv[1])):
        lines.extend(_group_lines(key, members))
    return lines


def validate_nodes(nodes):
    """Raise ValueError naming every node that cannot go into slurm.conf."""
    problems = []
    seen = set()
    for i, node in enumerate(nodes):
        name = node.get("hostname")
        if not fields.HOSTNAME.valid(name):
            problems.append(f"nodes[{i}].hostname: {fields.HOSTNAME.problem(name)}")
        elif name in seen:
            problems.append(f"nodes[{i}].hostname: {name} appears twice")
        seen.add(name)
        try:
            ipaddress.ip_address(node.get("ip"))
        except ValueError:
            problems.append(f"nodes[{i}].ip: {node.get('ip')!r} is not an IP address")
        facts = node.get("facts") or {}
        missing = [k for k in TOPOLOGY_KEYS + ("RealMemory",) if not isinstance(facts.get(k), int)]
        if missing:
            problems.append(f"nodes[{i}].facts: missing {', '.join(missing)}")
    if problems:
        raise ValueError("; ".join(problems))


def generate_slurm_conf(nodes, *, cluster_name, manager, manager_ip, settings=None,
                        partition=DEFAULT_PARTITION, slurm_version=None):
    """Full slurm.conf text, for the Slurm ``slurm_version`` (a tuple from ``parse_slurm_version``; None:
    unknown, the file every supported version reads).

    ``nodes``: iterable of ``{"hostname", "ip", "facts", "model" (optional)}`` where ``facts`` is
    ``parse_slurmd_c`` output and ``model`` the board model (different models never share a line).
    ``settings``: overrides of ``DEFAULT_SETTINGS`` (a value of None drops the key).
    The partition ``partition`` holds all nodes and is the default one. With no nodes the file still
    starts a slurmctld (partition without nodes), so the manager can run before any worker enrolled.
    """
    nodes = list(nodes)
    validate_nodes(nodes)
    merged = version_settings(slurm_version)
    for key, value in (settings or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    for key, value in merged.items():
        if "\n" in value or "\n" in key:
            raise ValueError(f"slurm.conf setting {key} must be one line")
    out = [
        "# slurm.conf generated by the pibake registry from the enrolled nodes' `slurmd -C` facts.",
        "# Do not edit: the registry rewrites it whenever a node enrols, is accepted or removed.",
        f"ClusterName={slurm_cluster_name(cluster_name)}",
        f"SlurmctldHost={manager}({manager_ip})",
    ]
    out += [f"{k}={v}" for k, v in merged.items()]
    out.append("")
    out.append("# Nodes (RealMemory = reported - max(3%, 64 MiB), rounded down to 32 MiB)")
    out += node_lines(nodes)
    out.append("")
    if nodes:
        out.append(f"PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    else:
        out.append(f"PartitionName={partition} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(out) + "\n"


def nodes_section(conf_text):
    """The NodeName lines of a slurm.conf text: when they change, slurmctld must restart (22.05)."""
    return [ln.strip() for ln in (conf_text or "").splitlines() if ln.strip().startswith("NodeName=")]
