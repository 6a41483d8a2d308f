"""Hostname/IP plans: ``red[01-04]`` + ``10.1.1.[11-14]`` paired one-to-one with ClusterShell NodeSet.

``plan_nodes`` is pure: data in, a list of ``PlannedNode`` out, or one ``PlanError`` naming
every problem (different counts, duplicates, addresses outside the network or reserved,
invalid hostnames, conflicts with what was planned before). ``plan_from_inventory`` reads
the inventory YAML of cloudmesh-pi-burn / cloudmesh-inventory (a mapping of host name to
``{host, ip, service, ...}``) through the same checks.

Plans are remembered in ``<cluster>/plan.yaml`` (``record_plan`` / ``recorded_plan``) so a
hostname keeps its IP across burns: re-planning ``red01`` with another address is an error.
"""

import ipaddress
import logging
from pathlib import Path

import yaml
from ClusterShell.NodeSet import NodeSet, NodeSetException
from ClusterShell.RangeSet import RangeSetException

from pibake import fields
from pibake.cluster import read_yaml
from pibake.errors import PlanError
from pibake.files import atomic_write
from pibake.locks import file_lock
from pibake.model import ROLES, PlannedNode

LOG = logging.getLogger(__name__)

PLAN_FILE = "plan.yaml"
MAX_NODES = 4096  # a hostlist larger than this is a typo, not a home lab

# cloudmesh inventory "service" values and the pibake role they mean.
INVENTORY_SERVICES = {"manager": "manager", "worker": "worker", "sensor": "sensor"}


def _plan_error(problems):
    err = PlanError("; ".join(problems))
    err.problems = list(problems)
    return err


def _split_top_level(text):
    """Split a hostlist on commas outside brackets, keeping the order the user wrote."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def expand_hostlist(pattern, option="--hostname", problems=None):
    """Expand ``red[01-04]``, ``red01,red05`` or a list of such, in the order written.

    Uses ClusterShell ``NodeSet`` for each comma-separated part (a bracket range expands in
    ascending order). Syntax problems are appended to ``problems`` (or raised as PlanError).
    Duplicates are kept so the caller can report them.
    """
    own = problems is None
    problems = [] if own else problems
    if isinstance(pattern, NodeSet):
        pattern = str(pattern)
    items = [pattern] if isinstance(pattern, str) else list(pattern or ())
    out = []
    for item in items:
        if isinstance(item, NodeSet):
            item = str(item)
        if not isinstance(item, str):
            problems.append(f"{option}: {item!r} is not text")
            continue
        for part in _split_top_level(item):
            if not part:
                problems.append(f"{option}: {item!r} has an empty entry (check the commas)")
                continue
            if any(ch in part for ch in "@!&^*?") or any(ord(c) < 32 or c.isspace() for c in part):
                problems.append(
                    f"{option}: {part!r} is not a hostlist (write e.g. red01, 'red[01-04]' or 'red[01-02,07]')"
                )
                continue
            try:
                nodeset = NodeSet(part)
                if len(nodeset) > MAX_NODES:
                    problems.append(f"{option}: {part!r} expands to {len(nodeset)} entries; at most {MAX_NODES}")
                    continue
                out.extend(str(n) for n in nodeset)
            except (NodeSetException, RangeSetException, ValueError) as exc:
                detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if "padding" in detail:
                    problems.append(
                        f"{option}: {part!r}: both ends of a zero-padded range need the same width "
                        "(write e.g. 'red[01-10]', not 'red0[1-10]')"
                    )
                    continue
                problems.append(
                    f"{option}: {part!r} is not a valid hostlist ({detail}); write e.g. 'red[01-04]'"
                )
    if own and problems:
        raise _plan_error(problems)
    return out


def expand_iplist(pattern, option="--ip", problems=None):
    """Expand ``10.1.1.11``, ``10.1.1.11,10.1.1.12`` or ``10.1.1.[11-14]`` into IPv4 strings, in order.

    The last-octet range goes through ``NodeSet`` like a hostlist. Invalid entries are reported
    in ``problems`` (or raised).
    """
    own = problems is None
    problems = [] if own else problems
    raw = expand_hostlist(pattern, option, problems)
    out = []
    for text in raw:
        problem = fields.IPV4.problem(text)
        if problem:
            problems.append(f"{option}: {problem}; write e.g. 10.1.1.11 or '10.1.1.[11-14]'")
        else:
            out.append(text)
    if own and problems:
        raise _plan_error(problems)
    return out


def _check_pairs(cluster, pairs, recorded, label=lambda i, host: host):
    """Problems with a list of (hostname, ip, role) triples; ``label(i, host)`` prefixes each."""
    problems = []
    network = ipaddress.IPv4Network(cluster.network)
    manager_ip = ipaddress.IPv4Address(cluster.manager_ip)
    gateway = ipaddress.IPv4Address(cluster.gateway) if cluster.gateway else None
    seen_hosts, seen_ips = {}, {}
    rec_by_host = {n.hostname: n for n in recorded}
    rec_by_ip = {n.ip: n for n in recorded}
    for i, (host, ip, role) in enumerate(pairs):
        where = label(i, host)
        if not fields.HOSTNAME.valid(host):
            problems.append(f"{where}: {fields.HOSTNAME.problem(host)}")
        elif host in seen_hosts:
            problems.append(f"{where}: hostname {host} appears twice; give each node its own name")
        seen_hosts.setdefault(host, ip)
        if ip is None:
            continue
        addr = ipaddress.IPv4Address(ip)
        if ip in seen_ips and seen_ips[ip] != host:
            problems.append(f"{where}: {ip} is given to both {seen_ips[ip]} and {host}; give each node its own IP")
        elif ip in seen_ips:
            pass  # same host twice: reported above
        seen_ips.setdefault(ip, host)
        is_manager = host == cluster.manager
        if addr not in network:
            problems.append(
                f"{where}: {ip} is outside the cluster network {network} (choose an address inside it, "
                f"or change network in cluster.yaml)"
            )
        elif addr == network.network_address:
            problems.append(f"{where}: {ip} is the network address of {network}; choose a host address")
        elif addr == network.broadcast_address:
            problems.append(f"{where}: {ip} is the broadcast address of {network}; choose a host address")
        elif gateway is not None and addr == gateway and not (is_manager and gateway == manager_ip):
            problems.append(f"{where}: {ip} is the gateway (cluster.yaml gateway); choose another address")
        elif is_manager and addr != manager_ip:
            problems.append(
                f"{where}: {host} is the cluster's manager, its IP is {manager_ip} (cluster.yaml manager_ip), not {ip}"
            )
        elif not is_manager and addr == manager_ip:
            problems.append(
                f"{where}: {ip} is the manager's address ({cluster.manager}); choose another address for {host}"
            )
        if role not in ROLES:
            problems.append(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        elif is_manager and role != "manager":
            problems.append(f"{where}: {host} is the cluster's manager in cluster.yaml, its role is manager, not {role}")
        elif not is_manager and role == "manager":
            problems.append(
                f"{where}: only {cluster.manager} (manager in cluster.yaml) can have role manager, not {host}"
            )
        old = rec_by_host.get(host)
        if old is not None and old.ip != ip:
            problems.append(
                f"{where}: {host} is already planned with {old.ip} (plan.yaml); use {old.ip}, "
                f"or remove {host} from plan.yaml to re-plan it"
            )
        other = rec_by_ip.get(ip)
        if other is not None and other.hostname != host:
            problems.append(
                f"{where}: {ip} is already planned for {other.hostname} (plan.yaml); choose another address, "
                f"or remove {other.hostname} from plan.yaml"
            )
    return problems


def _default_role(cluster, host, role):
    if host == cluster.manager:
        return role or "manager"
    return role or "worker"


def plan_nodes(cluster, hostnames, ips, role=None, recorded=()):
    """Pair a hostlist with an IP list into ``PlannedNode``s, in the order written.

    ``hostnames``: ``red01``, ``red[01-04]``, ``red01,red[03-04]`` (or a list of those);
    ``ips``: ``10.1.1.11``, ``10.1.1.[11-14]``, comma lists (or a list). The role is manager for
    the cluster's manager hostname, else ``role`` or worker. ``recorded`` are nodes planned
    before (``recorded_plan``): a hostname keeps its IP. Raises PlanError listing every problem.
    """
    problems = []
    hosts = expand_hostlist(hostnames, "--hostname", problems) if hostnames else []
    addrs = expand_iplist(ips, "--ip", problems) if ips else []
    if not hostnames:
        problems.append("--hostname: missing (give e.g. red01 or 'red[01-04]')")
    if not ips:
        problems.append("--ip: missing (give e.g. 10.1.1.11 or '10.1.1.[11-14]', one IP per hostname)")
    if role is not None and role not in ROLES:
        problems.append(f"--role: {role!r} is not one of {', '.join(ROLES)}")
        role = None
    if problems and (not hosts or not addrs):
        raise _plan_error(problems)
    if hosts and addrs and len(hosts) != len(addrs):
        problems.append(
            f"--hostname gives {len(hosts)} name{'s' if len(hosts) != 1 else ''} but --ip gives "
            f"{len(addrs)} address{'es' if len(addrs) != 1 else ''}; give exactly one IP per hostname"
        )
    pairs = [(h, ip, _default_role(cluster, h, role)) for h, ip in zip(hosts, addrs)]
    unpaired = [(h, None, _default_role(cluster, h, role)) for h in hosts[len(addrs):]]
    problems += _check_pairs(cluster, pairs + unpaired, tuple(recorded))
    if problems:
        raise _plan_error(problems)
    nodes = [PlannedNode(hostname=h, ip=ip, role=r) for h, ip, r in pairs]
    LOG.debug("planned %d node(s)", len(nodes))
    return nodes


def plan_from_inventory(cluster, path, recorded=()):
    """Read a cloudmesh-pi-burn / cloudmesh-inventory YAML file into ``PlannedNode``s.

    The file maps each host name to a record with at least ``host`` (or the key itself) and
    ``ip``; ``service`` (manager/worker) gives the role. Other cloudmesh fields (``keyfile``,
    ``tag``, ``dns``, ``router``, ``timezone``, ``locale``, ``status``, ...) are accepted and
    ignored: cluster.yaml decides them for pibake. Raises PlanError listing every problem.
    """
    path = Path(path)
    what = path.name
    try:
        data = read_yaml(path, what=str(path), error=PlanError)
    except FileNotFoundError:
        raise PlanError(f"--inventory {path}: no such file") from None
    except IsADirectoryError:
        raise PlanError(f"--inventory {path}: is a directory, not an inventory file") from None
    if not isinstance(data, dict) or not data:
        raise PlanError(
            f"{path}: not a cloudmesh inventory (expected a mapping of host names to "
            "{host, ip, service, ...} records)"
        )
    problems, pairs, labels = [], [], []
    for key, record in data.items():
        where = f"{what}: {key}"
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a record with host, ip and service, got {type(record).__name__}")
            continue
        host = record.get("host") or key
        if host != key and record.get("host"):
            problems.append(f"{where}.host: {host!r} differs from its key {key!r}; make them the same")
            continue
        ip = record.get("ip")
        if ip in (None, ""):
            problems.append(f"{where}.ip: missing (pibake gives every node a static IP)")
            continue
        ip = str(ip).strip()  # an inventory (cloudmesh-pi-burn) may write it unquoted or padded
        if not fields.IPV4.valid(ip):
            problems.append(f"{where}.ip: {fields.IPV4.problem(ip)}")
            continue
        service = record.get("service") or ("manager" if host == cluster.manager else "worker")
        role = INVENTORY_SERVICES.get(str(service).strip().lower()) if isinstance(service, str) else None
        if role is None:
            problems.append(f"{where}.service: {service!r} is not one of manager, worker")
            continue
        if role == "manager" and host != cluster.manager:
            problems.append(
                f"{where}: the inventory's manager is {host} but cluster.yaml's manager is {cluster.manager}; "
                f"use the same name (edit manager in cluster.yaml or the inventory)"
            )
            continue
        pairs.append((host if isinstance(host, str) else str(host), ip, role))
        labels.append(f"{what}: {key}")
    problems += _check_pairs(cluster, pairs, tuple(recorded), label=lambda i, host: labels[i])
    if problems:
        raise _plan_error(problems)
    return [PlannedNode(hostname=h, ip=ip, role=r) for h, ip, r in pairs]


def resolve_plan(cluster, *, hostnames=None, ips=None, role=None, inventory=None, recorded=None):
    """What the CLI commands (render/burn/deploy) call: ``--hostname/--ip`` or ``--inventory``.

    ``recorded`` defaults to ``recorded_plan(cluster.directory)`` when the cluster has one.
    """
    if recorded is None:
        recorded = recorded_plan(cluster.directory) if cluster.directory is not None else ()
    if inventory is not None:
        if hostnames or ips:
            raise PlanError("give either --inventory or --hostname/--ip, not both")
        nodes = plan_from_inventory(cluster, inventory, recorded)
        if role is not None:
            nodes = [n for n in nodes if n.role == role]
            if not nodes:
                raise PlanError(f"--inventory {inventory}: no node with role {role}")
        return nodes
    return plan_nodes(cluster, hostnames, ips, role=role, recorded=recorded)


# --------------------------------------------------------------------------- plan.yaml


def _plan_lock(cluster_dir):
    return file_lock(Path(cluster_dir) / ".plan.lock", mode=0o644)


def recorded_plan(cluster_dir):
    """The nodes planned before in ``cluster_dir``/plan.yaml (a tuple; empty when there is none)."""
    path = Path(cluster_dir) / PLAN_FILE
    if not path.exists():
        return ()
    data = read_yaml(path, error=PlanError)
    if data is None:
        return ()
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list):
        raise PlanError(f"{path}: expected 'nodes:' with a list of {{hostname, ip, role}}; fix or delete the file")
    out, problems = [], []
    for i, entry in enumerate(nodes):
        if not isinstance(entry, dict) or not {"hostname", "ip"} <= set(entry):
            problems.append(f"{path}: nodes[{i}]: expected hostname and ip")
            continue
        host, ip, role = entry["hostname"], entry["ip"], entry.get("role", "worker")
        if not fields.IPV4.valid(str(ip)):
            problems.append(f"{path}: nodes[{i}].ip: {fields.IPV4.problem(ip)}")
            continue
        ip = str(ip)
        if not fields.HOSTNAME.valid(host):
            problems.append(f"{path}: nodes[{i}].hostname: {fields.HOSTNAME.problem(host)}")
            continue
        if role not in ROLES:
            problems.append(f"{path}: nodes[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
            continue
        out.append(PlannedNode(hostname=host, ip=ip, role=role))
    if problems:
        raise _plan_error(problems)
    return tuple(out)


def _render_plan(nodes):
    body = yaml.safe_dump(
        {"nodes": [{"hostname": n.hostname, "ip": n.ip, "role": n.role} for n in nodes]},
        default_flow_style=False,
        sort_keys=False,
    )
    return (
        "# Nodes pibake has planned for this cluster (written by render/burn/deploy).\n"
        "# A hostname keeps its IP: to give one a new address, delete its entry here first.\n" + body
    )


def record_plan(cluster_dir, nodes):
    """Add ``nodes`` to ``cluster_dir``/plan.yaml. Idempotent; never duplicates an entry.

    A node already recorded with the same hostname and IP is updated in place (its role may
    change); a hostname recorded with another IP, or an IP recorded for another hostname, raises
    PlanError and nothing is written. Returns the full recorded plan.
    """
    cluster_dir = Path(cluster_dir)
    path = cluster_dir / PLAN_FILE
    nodes = list(nodes)
    with _plan_lock(cluster_dir):
        current = list(recorded_plan(cluster_dir))
        by_host = {n.hostname: i for i, n in enumerate(current)}
        by_ip = {n.ip: n.hostname for n in current}
        problems, changed = [], False
        for node in nodes:
            if node.hostname in by_host:
                old = current[by_host[node.hostname]]
                if old.ip != node.ip:
                    problems.append(f"{node.hostname} is already planned with {old.ip} (plan.yaml), not {node.ip}")
                elif old.role != node.role:
                    current[by_host[node.hostname]] = node
                    changed = True
                continue
            if node.ip in by_ip:
                problems.append(f"{node.ip} is already planned for {by_ip[node.ip]} (plan.yaml), not {node.hostname}")
                continue
            by_host[node.hostname] = len(current)
            by_ip[node.ip] = node.hostname
            current.append(node)
            changed = True
        if problems:
            raise _plan_error(problems)
        if changed:
            atomic_write(path, _render_plan(current))
            LOG.info("plan.yaml: %d node(s) recorded", len(current))
    return tuple(current)
