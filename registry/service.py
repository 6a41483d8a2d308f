"""The registry's operations, shared by the REST API, the web page and ``pibake registry`` commands.

``RegistryService(cluster_dir, **options)`` binds the store, the cluster settings and the slurm.conf applier.
Options (``create_app(cluster_dir, **options)`` and ``pibake registry serve`` flags take the same), with the
cluster.yaml ``registry:`` keys that set them when not given explicitly:

==================  ==========================  ==============================================================
option              cluster.yaml registry: key  meaning
==================  ==========================  ==============================================================
require_approval    require_approval            new nodes wait as ``pending`` until an admin accepts them
slurm_conf          slurm_conf                  where slurm.conf is written (default /etc/slurm/slurm.conf)
slurm_apply         slurm_apply                 auto|systemd|service|direct|none (see ``slurmctl``)
slurm_settings      slurm_settings              mapping of slurm.conf settings overriding the defaults
slurm_state         slurm_state                 ask ``sinfo`` for each node's state (default true)
apply_timeout       apply_timeout               seconds to wait for slurmctld (default 60)
==================  ==========================  ==============================================================
"""

import ipaddress
import logging
import threading
import time
from pathlib import Path

import yaml
from pibake.registry import schema, slurmconf
from pibake.registry.slurmctl import DEFAULT_CONF, SlurmApplier, slurm_states
from pibake.registry.store import Store

from pibake import __version__, fields, mqtt
from pibake.cluster import CLUSTER_FILE, load_cluster
from pibake.errors import ConfigError, RegistryError
from pibake.files import FileDerived

LOG = logging.getLogger(__name__)

OPTION_KEYS = ("require_approval", "slurm_conf", "slurm_apply", "slurm_settings", "slurm_state",
               "apply_timeout")
SINFO_CACHE_SECONDS = 0.5  # deploy polls GET /nodes every 0.5 s while it waits for idle nodes


def cluster_settings(cluster_dir):
    """What the registry needs from cluster.yaml (validated by ``pibake.cluster.load_cluster``): name,
    manager, manager_ip, network, registry_port, and the optional ``registry:`` mapping of options."""
    cluster = load_cluster(cluster_dir)
    path = Path(cluster_dir) / "cluster.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    registry = raw.get("registry") or {}
    if not isinstance(registry, dict):
        raise ConfigError(f"{path}: registry must be a mapping")
    unknown = sorted(set(registry) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"{path}: registry: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(OPTION_KEYS)}")
    return {"name": cluster.name, "manager": cluster.manager, "manager_ip": cluster.manager_ip,
            "network": cluster.network, "registry_port": cluster.registry_port, "registry": registry}


def validate_enrolment(payload, peer_ip=None, network=None):
    """Check an enrolment body against the published schema (``Enrolment`` in openapi.json); return the
    record to store. Raises RegistryError(400) naming every problem."""
    problems = schema.problems("Enrolment", payload)
    raw = payload.get("slurmd_c") if isinstance(payload, dict) else None
    if any(p.startswith("slurmd_c:") for p in problems) and isinstance(raw, str):
        try:  # the parser says more precisely what is missing than the schema's pattern
            slurmconf.parse_slurmd_c(raw)
        except slurmconf.SlurmdCError as exc:
            problems = [str(exc) if p.startswith("slurmd_c:") else p for p in problems]
    if problems:
        raise RegistryError(400, "invalid enrolment: " + "; ".join(problems), problems)
    ips = [str(ipaddress.ip_address(ip)) for ip in payload["ips"]]
    model, os_release = payload.get("model", ""), payload.get("os_release", {})
    return {
        "hostname": payload["hostname"], "mac": fields.MAC.normalise(payload["mac"]), "ips": ips,
        "ip": choose_ip(ips, peer_ip, network), "role": payload.get("role", "worker"), "model": model.strip(),
        "cpus": payload["cpus"], "memory_mb": payload["memory_mb"], "slurmd_c_raw": raw or "",
        "slurmd_c": slurmconf.parse_slurmd_c(raw) if raw else None,
        "os_release": {k: v[:200] for k, v in os_release.items()}, "agent_version": payload.get("agent_version", ""),
    }


def choose_ip(ips, peer_ip=None, network=None):
    """The address slurmctld reaches the node at: the one the request came from when the node listed it,
    else the first in the cluster network, else the first listed."""
    if peer_ip in ips:
        return peer_ip
    if network:
        try:
            net = ipaddress.ip_network(network, strict=False)
            for ip in ips:
                if ipaddress.ip_address(ip) in net:
                    return ip
        except ValueError:
            pass
    return ips[0]


class RegistryService:
    """Registry operations over one cluster directory."""

    def __init__(self, cluster_dir, **options):
        unknown = sorted(set(options) - set(OPTION_KEYS))
        if unknown:
            raise ConfigError(f"unknown registry option(s): {', '.join(unknown)}")
        self.cluster_dir = Path(cluster_dir)
        self.cluster = cluster_settings(cluster_dir)
        merged = dict(self.cluster["registry"])
        merged.update({k: v for k, v in options.items() if v is not None})
        self.require_approval = bool(merged.get("require_approval", False))
        self.slurm_settings = dict(merged.get("slurm_settings") or {})
        self.slurm_state_enabled = bool(merged.get("slurm_state", True))
        self.applier = SlurmApplier(merged.get("slurm_conf") or DEFAULT_CONF, merged.get("slurm_apply") or "auto",
                                    timeout=float(merged.get("apply_timeout", 60)))
        self.store = Store(cluster_dir)
        # the MQTT broker's files on the manager (pibake.mqtt): a removed node loses its broker user too
        self.mqtt_paths = (mqtt.ETC_DIR, mqtt.PID_FILE)
        self._sinfo_cache = (0.0, None)
        self._cluster_config = FileDerived(self.cluster_dir / CLUSTER_FILE, lambda: load_cluster(self.cluster_dir))
        # apply_slurm's in-process gate: the newest node_set_seq known to be in force, and whether a
        # thread of this process is applying now.
        self._apply_gate = threading.Condition()
        self._applied_seen = -1
        self._apply_leading = False

    def cluster_config(self):
        """The validated cluster.yaml (``pibake.model.Cluster``), parsed again only when the file changed.

        Parsing and validating it (``load_cluster``) costs 13-20 ms of CPU; requests of every node (the MQTT
        credential) need it, so a deploy of N nodes paid it N times. An edited cluster.yaml is still seen: its
        (mtime, size, inode) changes, also when an editor replaces the file."""
        return self._cluster_config.get()  # missing or unreadable: load_cluster's ConfigError says so

    # ------------------------------------------------------------------ slurm
    @property
    def manager(self):
        return self.cluster["manager"]

    @property
    def manager_ip(self):
        return self.cluster["manager_ip"]

    def slurm_nodes(self):
        """Nodes that belong in slurm.conf: accepted workers (pending, manager and sensor roles are not)."""
        return self.store.slurm_rows()

    def slurm_conf(self):
        return slurmconf.generate_slurm_conf(
            self.slurm_nodes(), cluster_name=self.cluster["name"], manager=self.manager,
            manager_ip=self.manager_ip, settings=self.slurm_settings,
            slurm_version=self.applier.slurm_version())

    def apply_slurm(self, after_seq=None):
        """Make slurmctld run with a slurm.conf matching the store. Raises ApplyError.

        ``after_seq``: the store's node_set_seq after the caller's change. When the conf in force was
        generated at that counter or later, the caller's change is already in it and nothing is done:
        concurrent enrolments coalesce into few applies (group commit).

        Within one process, one thread at a time leads: it takes the applier's lock (thread lock + flock,
        shared with the other gunicorn workers) and generates from the newest node set, so its apply
        covers every change committed before it started; the other threads wait on a condition until
        an apply covers them, or lead the next one. Without this gate every waiter took the applier's
        lock in turn only to find it was covered; under load each such turn could wait for the GIL
        (5 ms switch interval) while holding the lock, and the waiters convoyed behind each other
        (measured: bench/registry, docs/report/registry.md).
        """
        if after_seq is None:
            return self._apply_slurm_locked(None)
        gate = self._apply_gate
        with gate:
            while self._applied_seen < after_seq and self._apply_leading:
                gate.wait()
            if self._applied_seen >= after_seq:
                self._count_gate("coalesced")
                return {"action": "coalesced", "conf": str(self.applier.conf_path)}
            self._apply_leading = True
        covered = -1
        try:
            result, covered = self._apply_slurm_locked(after_seq, with_seq=True)
            return result
        finally:
            with gate:
                self._applied_seen = max(self._applied_seen, covered)
                self._apply_leading = False
                gate.notify_all()

    def _count_gate(self, action):
        self.applier.counters[action] = self.applier.counters.get(action, 0) + 1

    def _apply_slurm_locked(self, after_seq, with_seq=False):
        """One apply under the applier's lock. With ``with_seq``: ``(result, seq covered)``, where the
        seq covered is the node_set_seq the conf now in force was generated at (-1 when unknown)."""
        conf = str(self.applier.conf_path)
        generated = {}

        def text():
            if after_seq is not None:
                done = self.store.applied_seq(conf)
                if done >= after_seq:  # another process's apply covered it
                    generated["covered"] = done
                    return None
            generated["seq"] = self.store.node_set_seq()
            return self.slurm_conf()

        def applied():
            if "seq" in generated:
                self.store.set_applied_seq(conf, generated["seq"])
                generated["covered"] = generated["seq"]

        result = self.applier.apply(text, on_applied=applied)
        return (result, generated.get("covered", -1)) if with_seq else result

    def slurm_state_map(self):
        if not self.slurm_state_enabled:
            return None
        stamp, states = self._sinfo_cache
        if time.monotonic() - stamp < SINFO_CACHE_SECONDS:
            return states
        states = slurm_states(self.applier.conf_path)
        self._sinfo_cache = (time.monotonic(), states)
        return states

    def conf_server(self):
        return f"{self.manager}:{slurmconf.DEFAULT_SETTINGS['SlurmctldPort']}"

    # ------------------------------------------------------------------ nodes
    def with_state(self, nodes):
        states = self.slurm_state_map() if nodes else None
        for node in nodes:
            node["slurm_state"] = (states or {}).get(node["hostname"]) if states is not None else None
        return nodes

    def nodes(self):
        return self.with_state(self.store.list())

    def node(self, hostname):
        node = self.store.get(hostname)
        if node is None:
            raise RegistryError(404, f"no node named {hostname[:64]!s} is enrolled")
        return self.with_state([node])[0]

    def enrol(self, payload, peer_ip=None):
        """Enrol (or re-enrol) a node. Returns ``(response body, created)``; the slurm.conf that includes
        the node is in force when this returns (for an accepted worker)."""
        record = validate_enrolment(payload, peer_ip, self.cluster.get("network"))
        node, credential, created = self.store.enrol(record, require_approval=self.require_approval)
        LOG.info("%s %s (%s, %s, status %s)", "enrolled" if created else "re-enrolled", node["hostname"],
                 node["ip"], node["model"] or "unknown model", node["status"])
        if node["status"] != "pending" and node["role"] == "worker":
            self.apply_slurm(after_seq=self.store.node_set_seq())
        return {
            "hostname": node["hostname"],
            "status": "pending" if node["status"] == "pending" else "enrolled",
            "credential": credential,
            "slurm": {"conf_server": self.conf_server(), "manager": self.manager, "manager_ip": self.manager_ip},
        }, created

    def accept(self, hostname):
        node = self.store.get(hostname)
        if node is None:
            raise RegistryError(404, f"no node named {hostname[:64]} is enrolled")
        node = self.store.accept(hostname)
        LOG.info("accepted %s", hostname)
        if node["role"] == "worker":
            self.apply_slurm(after_seq=self.store.node_set_seq())
        return node

    def remove(self, hostname):
        node = self.store.get(hostname)
        if node is None or not self.store.delete(hostname):
            raise RegistryError(404, f"no node named {hostname[:64]} is enrolled")
        LOG.info("removed %s", hostname)
        mqtt.revoke_node_user(self.cluster_dir, hostname, *self.mqtt_paths)
        if node["role"] == "worker" and node["status"] != "pending":
            self.apply_slurm(after_seq=self.store.node_set_seq())
        return node

    def report_status(self, hostname, payload):
        problems = schema.problems("StatusReport", payload)
        if problems:
            raise RegistryError(400, "invalid status report: " + "; ".join(problems), problems)
        state, message = payload["state"], payload.get("message", "")
        node = self.store.get(hostname)
        if node is None:
            raise RegistryError(404, f"no node named {hostname[:64]} is enrolled")
        if node["status"] == "pending":
            raise RegistryError(403, f"{hostname} is pending approval; an admin must accept it first")
        LOG.info("%s reports %s%s", hostname, state, f": {message[:200]}" if message else "")
        return self.store.set_status(hostname, state, message)

    def health(self):
        return {"status": "ok", "version": __version__, "nodes": self.store.count()}
