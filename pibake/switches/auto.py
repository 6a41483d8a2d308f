"""The automatic recovery policy: on the manager, recover the nodes whose switch says ``auto_cycle: true``,
when ssh and Slurm both find them down, with a growing pause between attempts and a limit per hour.

Never the manager and never a switch that powers a thing (the network switch, a fan): cluster.yaml refuses
``auto_cycle`` there, and ``candidates`` checks again so a hand-made config cannot slip through.
``decide`` is pure (history and clock in, a decision out); ``auto_pass`` does one round of I/O and records
every attempt in ``<cluster>/switches/auto.json`` and every action in the switch log.
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pibake import switches
from pibake.cluster import load_cluster
from pibake.errors import PibakeError
from pibake.switches.recover import (
    judge_down,
    make_node_connectors,
    probe_node,
    registry_addresses,
    recover_node,
)
from pibake.verify import served_slurm_conf

LOG = logging.getLogger(__name__)

HOUR_S = 3600.0


@dataclass(frozen=True)
class Policy:
    max_per_hour: int = 2  # recoveries of one node within any hour
    backoff_s: float = 600.0  # pause after the first attempt; doubled after each further one in the hour
    off_s: float = 10.0
    wait_s: float = 600.0


def candidates(cluster):
    """The switches the policy may cycle: auto_cycle, powering a node, not the manager."""
    return [s for s in cluster.switches if s.auto_cycle and s.node and not s.thing and s.node != cluster.manager]


def decide(node, down, why, attempts, now, policy):
    """('recover' | 'up' | 'backoff' | 'limit', text) for one node; ``attempts``: epoch seconds of earlier
    recoveries of it."""
    if not down:
        return "up", why
    recent = sorted(t for t in attempts if now - t < HOUR_S)
    if len(recent) >= policy.max_per_hour:
        again = recent[0] + HOUR_S
        return "limit", (f"{node} is down but was recovered {len(recent)} times in the last hour "
                         f"(limit {policy.max_per_hour}); next chance in {again - now:.0f} s")
    if recent:
        pause = policy.backoff_s * 2 ** (len(recent) - 1)
        if now - recent[-1] < pause:
            return "backoff", (f"{node} is down; waiting {recent[-1] + pause - now:.0f} s more before trying "
                               f"again (pause {pause:.0f} s after {len(recent)} attempt(s))")
    return "recover", why


def _history_path(cluster_dir):
    return Path(cluster_dir) / "switches" / "auto.json"


def load_history(cluster_dir):
    try:
        data = json.loads(_history_path(cluster_dir).read_text())
    except (OSError, ValueError):
        return {}
    return {k: [float(t) for t in v] for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}


def _save_history(cluster_dir, history, now):
    path = _history_path(cluster_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {node: [t for t in times if now - t < 24 * HOUR_S] for node, times in history.items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(kept, sort_keys=True))
    tmp.replace(path)


def auto_pass(cluster_dir, *, policy=Policy(), connectors=None, clock=time.time, sleep=time.sleep, progress=None,
              slurm_conf=None, ssh_options=None, quiet_up=False):
    """One round over the candidates; returns [{node, switch, decision, detail}]. ``ssh_options``: see
    ``recover.make_node_connectors``; ``quiet_up``: no progress line for a node found up (a loop's every
    round)."""
    say = progress or (lambda message: None)
    cluster = load_cluster(cluster_dir)
    if not candidates(cluster):  # the manager's loop with nothing to do: no ssh, no Slurm query
        return []
    slurm_conf = slurm_conf or served_slurm_conf(cluster_dir)
    history = load_history(cluster_dir)
    addresses, error = (None, None) if connectors else registry_addresses(cluster_dir, cluster)
    report = []
    for config in candidates(cluster):
        node = config.node
        if addresses is not None and node not in addresses:
            # never enrolled (a first boot still running), or the registry does not answer: ssh could only try
            # the name, and a failure there says nothing about the node; never cycle on that
            detail = f"the registry has no address for {node} ({error or 'not enrolled yet'}); not judged"
            if not quiet_up:
                say(f"{node}: unknown: {detail}")
            report.append({"node": node, "switch": config.name, "decision": "unknown", "detail": detail})
            continue
        nodes_connectors = connectors or make_node_connectors(cluster_dir, cluster, node, ssh_options=ssh_options,
                                                              addresses=addresses)
        down, why = judge_down(node, *probe_node(nodes_connectors, cluster, node, slurm_conf))
        now = clock()
        decision, detail = decide(node, down, why, history.get(node, []), now, policy)
        if decision in ("limit", "backoff"):
            switches.record(cluster_dir, {"switch": config.name, "action": "auto-skip", "node": node, "by": "auto",
                                          "ok": False, "error": detail})
        if decision == "recover":
            history.setdefault(node, []).append(now)
            _save_history(cluster_dir, history, now)  # counted even if it fails: a failing plug is not retried at once
            say(f"{node}: down ({why}); recovering through {config.name}")
            try:
                result = recover_node(cluster_dir, node, off_s=policy.off_s, wait_s=policy.wait_s,
                                      connectors=nodes_connectors, progress=say, by="auto", sleep=sleep,
                                      slurm_conf=slurm_conf)
                detail = f"recovered through {config.name}"
                decision = "recovered" if result["recovered"] else "failed"
            except PibakeError as err:
                decision, detail = "failed", str(err)
        if decision != "up" or not quiet_up:
            say(f"{node}: {decision}: {detail}")
        report.append({"node": node, "switch": config.name, "decision": decision, "detail": detail})
    return report
