"""Rules from a sensor to a switch, evaluated on the manager: each round reads every rule's newest reading
from the registry's readings store (``readings.db`` in the cluster directory, written by POST
/api/v1/readings), reads the switch's state from the device, asks ``pibake.rules_model.decide`` what to do,
and switches through ``switch_command`` (lock, read back), so every switching lands in the switch log with
the rule's name and the reason (``by: "rule NAME"``, ``why``).

The switch's last change (for ``min_on_s`` / ``min_off_s``) is the switch log's last successful on, off,
toggle or cycle of that switch, by anyone: a fan a person just turned off by hand is not turned on again
before ``min_off_s`` either.
"""

import datetime as dt
import logging
import time
from pathlib import Path

from pibake.errors import SwitchError

LOG = logging.getLogger(__name__)

CHANGES = ("on", "off", "toggle", "cycle")
LOG_LOOKBACK = 2000  # switch log entries searched for a switch's last change


def load_rules(cluster_dir):
    """The ``Rule``s of cluster.yaml (validated), in file order."""
    from pibake.cluster import load_cluster_data
    from pibake.rules_model import rules_from_data

    return list(rules_from_data(load_cluster_data(cluster_dir).get("rules")))


def latest_readings(cluster_dir):
    """{node: its newest reading {"time", "metrics", ...}} from the manager's readings store; {} when the
    cluster has none (this machine is not the manager, or no sensor has reported yet)."""
    from pibake.registry.readings import DB_FILE, ReadingsStore

    if not (Path(cluster_dir) / DB_FILE).exists():
        return {}
    return {n["node"]: n["latest"] for n in ReadingsStore(cluster_dir).nodes() if n.get("latest")}


def last_change(entries, switch):
    """Epoch seconds of ``switch``'s last successful change in switch log ``entries`` (oldest first), or None."""
    for entry in reversed(entries):
        if entry.get("switch") == switch and entry.get("ok") and entry.get("action") in CHANGES:
            try:
                return dt.datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
            except (KeyError, ValueError):
                return None
    return None


def rules_pass(cluster_dir, *, clock=time.time, readings=None, progress=None):
    """One round over the rules; returns [{rule, switch, sensor, metric, value, on, action, why}] where ``on``
    is the switch's state after the round (None when it could not be read) and ``action`` what was done
    ("on", "off", None, or "error"). ``readings``: {node: newest reading} instead of the readings store."""
    from pibake import switches
    from pibake.rules_model import decide

    say = progress or (lambda message: None)
    rules = load_rules(cluster_dir)
    if not rules:
        return []
    newest = latest_readings(cluster_dir) if readings is None else readings
    report = []
    for rule in rules:
        row = {"rule": rule.name, "switch": rule.switch, "sensor": rule.sensor, "metric": rule.metric}
        try:
            on = switches.switch_status(cluster_dir, rule.switch)["state"]["on"]
        except SwitchError as exc:
            row.update(value=None, on=None, action="error", why=str(exc))
            say(f"rule {rule.name}: {exc}")
            report.append(row)
            continue
        now = clock()
        changed = last_change(switches.switch_log(cluster_dir, LOG_LOOKBACK), rule.switch)
        decision = decide(rule, newest.get(rule.sensor), on, changed, now)
        row.update(value=decision.value, on=on, action=decision.action, why=decision.why)
        if decision.action:
            try:
                result = switches.switch_command(cluster_dir, rule.switch, decision.action, by=f"rule {rule.name}",
                                                 why=decision.why)
                row["on"] = result["state"]["on"]
            except SwitchError as exc:
                row.update(action="error", why=f"{decision.why}; switching {decision.action} failed: {exc}")
        say(f"rule {rule.name}: {row['why']}" + (f" -> {rule.switch} {row['action']}" if row["action"] else ""))
        report.append(row)
    return report
