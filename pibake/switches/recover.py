"""Recover a hung node through the plug it hangs on: make sure it is really down (ssh and Slurm both), power
it off, wait, on, and wait until it answers ssh and Slurm lists it idle again, reporting every step.

``judge_down`` and ``judge_back`` are pure over command outputs (an ssh ``true`` and the manager's
``sinfo -N -h -o '%N|%T|%E' -n NODE``) and are tested on recorded outputs; ``recover_node`` does the I/O
through a ``pibake.connect.Connectors`` (default: ssh to the address the registry recorded, local or ssh for
the manager, as verify reaches them).
"""

import logging
import time

from pibake import switches
from pibake.cluster import load_cluster
from pibake.errors import RecoverError
from pibake.verify import (
    fetch_registry,
    make_connectors,
    parse_sinfo_reasons,
    served_slurm_conf,
)

LOG = logging.getLogger(__name__)

DEFAULT_WAIT_S = 600.0  # a Pi 4 boots, starts slurmd and re-registers in about 1-2 min; SD cards vary
POLL_S = 5.0
# Slurm base states that mean "not working"; a trailing * means not responding whatever the base state.
DOWN_STATES = ("down", "fail", "failing", "unknown", "no_respond", "not_responding")


def slurm_is_down(state):
    state = (state or "").lower()
    return state.endswith("*") or state.rstrip("*+~#!%$@^-") in DOWN_STATES


def judge_down(node, ssh, sinfo):
    """(down, why) for a node from its ssh probe (Output) and the manager's sinfo (Output or None)."""
    states = parse_sinfo_reasons(sinfo.stdout) if sinfo is not None and sinfo.ok else {}
    slurm = states.get(node, ("", ""))[0] or None
    if ssh.ok:
        return False, f"{node} answers ssh"
    if sinfo is None or not sinfo.ok:
        why = sinfo.reason() if sinfo is not None else "no manager"
        return False, f"{node} does not answer ssh ({ssh.reason()}) but sinfo failed on the manager ({why})"
    if slurm is None:
        return False, f"{node} does not answer ssh ({ssh.reason()}) and Slurm does not list it"
    if not slurm_is_down(slurm):
        return False, f"{node} does not answer ssh ({ssh.reason()}) but Slurm says {slurm}"
    return True, f"{node} does not answer ssh ({ssh.reason()}) and Slurm says {slurm}"


def judge_back(node, ssh, sinfo):
    """(back, why): answers ssh and Slurm lists it idle."""
    states = parse_sinfo_reasons(sinfo.stdout) if sinfo is not None and sinfo.ok else {}
    slurm = states.get(node, ("", ""))[0] or "not listed"
    if ssh.ok and slurm == "idle":
        return True, f"{node} answers ssh and Slurm says idle"
    return False, f"ssh: {'ok' if ssh.ok else ssh.reason()}; Slurm: {slurm}"


def switch_of_node(cluster, node):
    """The SwitchConfig that powers ``node``."""
    for config in cluster.switches:
        if config.node == node:
            return config
    raise RecoverError(f"no switch in cluster.yaml powers {node} (add one under switches: with node: {node}; "
                       "see docs/switches.md)")


def probe_node(connectors, cluster, node, slurm_conf):
    ssh = connectors.run(node, ["true"], timeout=10)
    sinfo = connectors.run(cluster.manager, ["env", f"SLURM_CONF={slurm_conf}", "sinfo", "-N", "-h", "-o",
                                             "%N|%T|%E", "-n", node], timeout=20)
    return ssh, sinfo


def registry_addresses(cluster_dir, cluster):
    """({hostname: ip} the registry recorded, the error line when it did not answer or None)."""
    _health, nodes, error = fetch_registry(cluster_dir, cluster)
    return {n["hostname"]: n["ip"] for n in nodes or () if n.get("ip")}, error


def make_node_connectors(cluster_dir, cluster, node, connect_timeout=5, ssh_options=None, addresses=None):
    """Connectors as verify makes them; ``ssh_options``: {"user", "identity", "known_hosts"} (as
    ``pibake verify --user -i --known-hosts``), None for the cluster's user and ssh's own choices.
    ``addresses``: the registry's, when the caller fetched them already."""
    error = None
    if addresses is None:
        addresses, error = registry_addresses(cluster_dir, cluster)
    if node not in addresses:
        LOG.info("the registry has no address for %s (%s); ssh uses the name", node, error or "not enrolled")
    return make_connectors(cluster, addresses, connect_timeout=connect_timeout, **(ssh_options or {}))


def recover_node(cluster_dir, node, *, off_s=None, wait_s=DEFAULT_WAIT_S, force=False, connectors=None,
                 progress=None, by="cli", sleep=time.sleep, clock=time.monotonic, slurm_conf=None, ssh_options=None):
    """Power-cycle the plug of hung ``node`` and wait until it is idle again; returns the step report.

    Refuses (RecoverError, nothing switched) when the node is not down by both ssh and Slurm, unless
    ``force``; always refuses the manager without ``force``. ``ssh_options``: see ``make_node_connectors``
    (ignored with ``connectors``).
    """
    say = progress or (lambda message: None)
    cluster = load_cluster(cluster_dir)
    config = switch_of_node(cluster, node)
    if node == cluster.manager and not force:
        raise RecoverError(f"{node} is the manager: pibake does not cycle it unless you pass --force")
    slurm_conf = slurm_conf or served_slurm_conf(cluster_dir)
    if connectors is None:
        connectors = make_node_connectors(cluster_dir, cluster, node, ssh_options=ssh_options)
    steps = []

    def step(name, ok, detail):
        steps.append({"step": name, "ok": ok, "detail": detail})
        say(f"{node}: {name}: {detail}")

    down, why = judge_down(node, *probe_node(connectors, cluster, node, slurm_conf))
    step("check-down", down, why)
    if not down and not force:
        switches.record(cluster_dir, {"switch": config.name, "action": "recover", "node": node, "by": by,
                                      "ok": False, "error": f"refused: {why}"})
        raise RecoverError(f"not cycling {node}: {why} (nothing was switched; --force cycles it anyway)")

    cycled = switches.cycle_switch(cluster_dir, config.name, off_s=switches.DEFAULT_OFF_S if off_s is None
                                   else off_s, progress=lambda m: say(m), by=by, sleep=sleep)
    step("power-cycle", True, f"switch {config.name} off {cycled['steps'][2]['seconds']:g} s, then on")

    deadline = clock() + wait_s
    last = "no answer yet"
    while True:
        back, last = judge_back(node, *probe_node(connectors, cluster, node, slurm_conf))
        if back:
            step("back", True, last)
            break
        if clock() >= deadline:
            step("back", False, last)
            switches.record(cluster_dir, {"switch": config.name, "action": "recover", "node": node, "by": by,
                                          "ok": False, "error": f"not idle after {wait_s:g} s: {last}"})
            raise RecoverError(f"{node} has power again but is not idle after {wait_s:g} s ({last}); "
                               "look at its console or SD card")
        say(f"{node}: waiting ({last})")
        sleep(POLL_S)
    switches.record(cluster_dir, {"switch": config.name, "action": "recover", "node": node, "by": by, "ok": True})
    return {"node": node, "switch": config.name, "recovered": True, "steps": steps, "cycle": cycled["steps"]}
