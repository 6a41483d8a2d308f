"""Rules from a sensor to a switch, evaluated on the manager: each round reads every rule's newest reading
from the registry's readings store (``readings.db`` in the cluster directory, written by POST
/api/v1/readings), reads the switch's state from the device, asks ``pibake.rules_model.decide`` what to do,
and switches through ``switch_command`` (lock, read back), so every switching lands in the switch log with
the rule's name and the reason (``by: "rule NAME"``, ``why``).

The switch's last change (for ``min_on_s`` / ``min_off_s``) is the switch log's last successful on, off,
toggle or cycle of that switch, by anyone: a fan a person just turned off by hand is not turned on again
before ``min_off_s`` either.

Each round also leaves its outcome per rule in ``<cluster>/switches/rules.json`` (``rules_status`` reads it
for `pibake switch rules --list`, GET /api/v1/rules and the switches page): the reading used, the decision
and when, and an alert-like state (``ok``, ``stale``: no usable reading, ``error``: the plug failed) with the
time it started, kept across rounds while the state stays the same.
"""

import datetime as dt
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from pibake import switches
from pibake.cluster import load_cluster_data
from pibake.errors import SwitchError
from pibake.files import atomic_write
from pibake.registry.readings import DB_FILE, ReadingsStore
from pibake.rules_model import decide, rules_from_data

LOG = logging.getLogger(__name__)

CHANGES = ("on", "off", "toggle", "cycle")
LOG_LOOKBACK = 2000  # switch log entries searched for a switch's last change
STATE_FILE = "rules.json"  # in <cluster>/switches: the last round's outcome per rule
STATES = ("ok", "stale", "error")


def load_rules(cluster_dir):
    """The ``Rule``s of cluster.yaml (validated), in file order."""
    return list(rules_from_data(load_cluster_data(cluster_dir).get("rules")))


def latest_readings(cluster_dir):
    """{node: its newest reading {"time", "metrics", ...}} from the manager's readings store; {} when the
    cluster has none (this machine is not the manager, or no sensor has reported yet)."""
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
        row["reading_time"] = _reading_time(newest.get(rule.sensor), rule.metric)
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
    _save_state(cluster_dir, rules, report, clock())
    return report


def _reading_time(reading, metric):
    """Epoch seconds of ``reading`` when it carries ``metric``, else None."""
    if not reading or ((reading.get("metrics") or {}).get(metric)) is None:
        return None
    try:
        return float(reading["time"])
    except (KeyError, TypeError, ValueError):
        return None


def _row_state(rule, row, now):
    """The alert-like state of one rule after a round: error (the plug failed), stale (no reading of the metric,
    or one older than max_age_s: the rule cannot act) or ok."""
    if row["action"] == "error":
        return "error"
    when = row.get("reading_time")
    if when is None or now - when > rule.max_age_s:
        return "stale"
    return "ok"


def _iso(epoch):
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _state_path(cluster_dir):
    return Path(cluster_dir) / "switches" / STATE_FILE


def load_state(cluster_dir):
    """{"round": epoch of the last round, "rules": {name: outcome}} from the last round; empty when none ran."""
    try:
        data = json.loads(_state_path(cluster_dir).read_text())
    except (OSError, ValueError):
        return {"round": None, "rules": {}}
    if not isinstance(data, dict) or not isinstance(data.get("rules"), dict):
        return {"round": None, "rules": {}}
    return data


def _save_state(cluster_dir, rules, report, now):
    before = load_state(cluster_dir)["rules"]
    by_name = {rule.name: rule for rule in rules}
    kept = {}
    for row in report:
        state = _row_state(by_name[row["rule"]], row, now)
        previous = before.get(row["rule"]) or {}
        since = previous.get("since") if previous.get("state") == state and previous.get("since") else now
        kept[row["rule"]] = {"time": now, "value": row.get("value"), "reading_time": row.get("reading_time"),
                             "on": row.get("on"), "action": row.get("action"), "why": row.get("why"),
                             "state": state, "since": since}
    atomic_write(_state_path(cluster_dir), json.dumps({"round": now, "rules": kept}, sort_keys=True), 0o644,
                 make_parents=True)


def rules_status(cluster_dir, *, clock=time.time):
    """Every rule of cluster.yaml with the outcome of the last round that evaluated it (no device contacted):
    [{rule, switch, sensor, metric, thresholds, describe, last}] where ``last`` is None before the first round,
    else {time, value, reading_time, reading_age_s, on, action, why, state, since} (times ISO 8601 UTC;
    ``on`` is the switch's state read in that round). ``state``: ok | stale | error, ``since``: when it
    started."""
    saved = load_state(cluster_dir)
    out = []
    for rule in load_rules(cluster_dir):
        fields = asdict(rule)
        item = {"rule": rule.name, "switch": rule.switch, "sensor": rule.sensor, "metric": rule.metric,
                "thresholds": {k: fields[k] for k in ("on_above", "off_below", "on_below", "off_above", "min_on_s",
                                                      "min_off_s", "max_age_s") if fields[k] is not None},
                "describe": rule.describe(), "last": None}
        last = saved["rules"].get(rule.name)
        if last:
            when = last.get("reading_time")
            item["last"] = {"time": _iso(last["time"]), "value": last.get("value"),
                            "reading_time": _iso(when) if when is not None else None,
                            "reading_age_s": round(last["time"] - when, 1) if when is not None else None,
                            "on": last.get("on"), "action": last.get("action"), "why": last.get("why"),
                            "state": last.get("state"), "since": _iso(last.get("since") or last["time"])}
        out.append(item)
    return out


def last_round(cluster_dir):
    """ISO time of the rules loop's last round, or None."""
    when = load_state(cluster_dir).get("round")
    return _iso(when) if when else None
