"""Sensors on the manager: readings in, history and alerts out. The REST API (``/api/v1/readings``,
``/api/v1/sensors...``), the page and ``pibake sensors`` all call these functions.

    from pibake import api
    sensors = api.Sensors("cluster")
    sensors.ingest("red-zero", {"readings": [...]})      # what POST /api/v1/readings does
    sensors.list()                                         # latest values, last seen, offline, alerts
    sensors.series("red-zero", "temperature_c", since, until)

Settings come from cluster.yaml ``sensors:`` (``pibake.sensors_model.DEFAULTS``), re-read when the file
changes; thresholds set with ``set_threshold`` (the API) override cluster.yaml's for that node and metric.
"""

import logging
import math
import re
import time
from pathlib import Path

from pibake.cluster import load_cluster_data
from pibake.errors import RegistryError
from pibake.files import FileDerived
from pibake.fields import anchored
from pibake.registry import schema
from pibake.registry.readings import ReadingsStore
from pibake.registry.store import Store
from pibake.sensors_model import (
    MAX_BATCH,
    MAX_FUTURE_S,
    METRICS,
    PLACE_RE,
    metric_value_problem,
    sensor_settings,
    threshold_problem,
)

LOG = logging.getLogger(__name__)

MAX_POINTS = 10000  # per series request: (until - since) / step
METRIC_FIELD_RE = re.compile(r"^readings\[(\d+)\]\.metrics\.(\w+)$")
# Refusals of schema-valid requests for what a schema cannot say start with these (tests/registry/test_openapi.py)
CLOCK_PREFIX = "clock: "  # a reading's time ahead of the manager's clock ("now")
RANGE_PREFIX = "range: "  # since/until/step that do not fit together
THRESHOLD_PREFIX = "threshold: "  # min above max, or a bound outside the metric's plausible range
TIME_PATTERN = anchored(r"([0-9]{1,12}(\.[0-9]{1,6})?|-[0-9]{1,9}(\.[0-9]{1,6})?[smhd])")


def validate_batch(body, now):
    """The readings of a POST /api/v1/readings body, checked against the published schema (``ReadingsBatch``)
    and the manager's clock. RegistryError 413 over MAX_BATCH readings, 400 naming every problem."""
    if isinstance(body, dict) and isinstance(body.get("readings"), list) and len(body["readings"]) > MAX_BATCH:
        raise RegistryError(413, f"{len(body['readings'])} readings in one batch; send at most {MAX_BATCH} "
                                 "per request")
    problems = [_with_value(p, body) for p in schema.problems("ReadingsBatch", body)]
    if not problems:
        for i, reading in enumerate(body["readings"]):
            ahead = reading["time"] - now
            if ahead > MAX_FUTURE_S:
                problems.append(f"{CLOCK_PREFIX}readings[{i}].time is {ahead:.0f} s ahead of the manager's clock "
                                f"(at most {MAX_FUTURE_S} s); check the node's time sync (NTP)")
    if problems:
        raise RegistryError(400, "; ".join(problems), problems)
    return body["readings"]


def _with_value(problem, body):
    """'readings[3].metrics.humidity_pct: 140 is outside 0..100' rather than the schema's generic wording."""
    field, _, _message = problem.partition(": ")
    match = METRIC_FIELD_RE.match(field)
    if match and match.group(2) in METRICS:
        try:
            value = body["readings"][int(match.group(1))]["metrics"][match.group(2)]
        except (KeyError, IndexError, TypeError):
            return problem
        better = metric_value_problem(match.group(2), value)
        if better:
            return f"{field}: {better}"
    return problem


def parse_time(value, name, default):
    """A query time: Unix seconds (a number, or a string of digits), or relative to now as -24h / -7d / -30m;
    None or "" -> ``default``."""
    if value is None or value == "":
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    if not isinstance(value, str) or not re.match(TIME_PATTERN, value):
        raise RegistryError(400, f"{name}: {str(value)[:40]!r} is not a time: give Unix seconds or -24h, -7d, -30m")
    if value.startswith("-"):
        factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[value[-1]]
        return time.time() - float(value[1:-1]) * factor
    return float(value)


class Sensors:
    """The sensors of one cluster directory (the manager's)."""

    def __init__(self, cluster_dir):
        self.cluster_dir = Path(cluster_dir)
        self.readings = ReadingsStore(cluster_dir)
        self.nodes_store = Store(cluster_dir)
        self._settings = FileDerived(self.cluster_dir / "cluster.yaml",
                                     lambda: sensor_settings(load_cluster_data(self.cluster_dir).get("sensors")))

    def settings(self):
        """cluster.yaml ``sensors:`` over the defaults, re-read when the file changes."""
        return self._settings.get()

    # ------------------------------------------------------------------ ingest
    def ingest(self, node, body, *, now=None):
        """Store a POST /api/v1/readings body for ``node`` (the authenticated one); then run the downsampling
        and retention pass when it is due. Returns {accepted, duplicates, last_seq}."""
        now = time.time() if now is None else now
        readings = validate_batch(body, now)
        settings = self.settings()
        result = self.readings.ingest(node, readings, now=now, yaml_thresholds=settings["thresholds"])
        if result["accepted"]:
            LOG.debug("%s: %d reading(s) stored, %d duplicate(s)", node, result["accepted"], result["duplicates"])
        # The pass rides on ingest: readings are what it works on, it needs no timer (the manager may run
        # without systemd, and gunicorn workers come and go), and the claim in maybe_pass keeps it to one
        # process at a time. A cluster that gets no readings has nothing new to roll up.
        self.readings.maybe_pass(every_s=settings["pass_every_s"], raw_days=settings["raw_days"],
                                 hourly_days=settings["hourly_days"], now=now)
        return result

    def run_pass(self, *, now=None):
        settings = self.settings()
        return self.readings.run_pass(raw_days=settings["raw_days"], hourly_days=settings["hourly_days"], now=now)

    # ------------------------------------------------------------------ reading back
    def _known(self, node):
        if not self.readings.has_node(node) and self.nodes_store.get(node) is None:
            raise RegistryError(404, f"no node named {node[:64]} is enrolled or has sent readings")

    def list(self, *, now=None):
        """Every sensor: nodes with role ``sensor`` and every node that has sent readings, with the latest
        reading, when it was received, whether it is offline, and its alerts."""
        now = time.time() if now is None else now
        settings = self.settings()
        enrolled = {n["hostname"]: n for n in self.nodes_store.list()}
        stored = {n["node"]: n for n in self.readings.nodes()}
        names = sorted(set(stored) | {h for h, n in enrolled.items() if n["role"] == "sensor"})
        return [self._summary(name, enrolled.get(name), stored.get(name), settings, now) for name in names]

    def _summary(self, name, enrolled, stored, settings, now):
        stored = stored or {"place": None, "last_received": None, "latest": None, "alerts": {}, "last_seq": None}
        latest = stored["latest"] or {}
        received = stored["last_received"]
        values = {m: {"value": v, "unit": METRICS[m].unit} for m, v in (latest.get("metrics") or {}).items()
                  if m in METRICS}
        alerting = {m: a for m, a in stored["alerts"].items() if a["state"] != "ok"}
        return {
            "node": name,
            "role": enrolled["role"] if enrolled else None,
            "place": latest.get("place") or stored["place"],
            "place_set": stored["place"],
            "last_seen": received,
            "last_reading_time": latest.get("time"),
            "last_seq": stored["last_seq"],
            "offline": received is None or now - received > settings["offline_after_s"],
            "values": values,
            "wifi": latest.get("wifi"),
            "alerts": stored["alerts"],
            "alerting": sorted(alerting),
        }

    def show(self, node, *, now=None):
        """One sensor's summary with its thresholds, latest Wi-Fi scan and Wi-Fi survey."""
        now = time.time() if now is None else now
        self._known(node)
        settings = self.settings()
        stored = next((n for n in self.readings.nodes() if n["node"] == node), None)
        summary = self._summary(node, self.nodes_store.get(node), stored, settings, now)
        summary["thresholds"] = self.readings.thresholds(node, settings["thresholds"])
        summary["networks"] = self.readings.networks(node)
        summary["survey"] = self.readings.survey(node, since=now - settings["raw_days"] * 86400)
        return summary

    def series(self, node, metric, since=None, until=None, step=None, *, now=None):
        """History of ``metric``: {node, metric, unit, since, until, step, source, threshold, points}. Default
        range the last 24 h; default step so that a range gives at most ~720 points (24 h: 2 min), and at least an
        hour beyond 2 days (7 d and 30 d come from the hourly aggregates)."""
        now = time.time() if now is None else now
        if metric not in METRICS:
            raise RegistryError(400, f"metric: unknown metric {str(metric)[:40]!r}; known: {', '.join(METRICS)}")
        self._known(node)
        until = now if until is None else until
        since = until - 86400 if since is None else since
        if since >= until:
            raise RegistryError(400, f"{RANGE_PREFIX}since must be before until")
        if step is None:
            step = max(60, math.ceil((until - since) / 720))
            if until - since > 2 * 86400:  # hourly rows: a week of raw readings took 0.15-0.3 s (bench/sensors)
                step = max(3600, step)
        if step < 1 or (until - since) / step > MAX_POINTS:
            raise RegistryError(400, f"{RANGE_PREFIX}step {step} s gives more than {MAX_POINTS} points for this range; "
                                     f"use at least {math.ceil((until - since) / MAX_POINTS)} s")
        settings = self.settings()
        source, points = self.readings.series(node, metric, since, until, int(step), raw_days=settings["raw_days"],
                                              now=now)
        return {"node": node, "metric": metric, "unit": METRICS[metric].unit, "since": since, "until": until,
                "step": int(step) if source == "raw" else max(3600, int(step) - int(step) % 3600),
                "source": source, "threshold": self.readings.thresholds(node, settings["thresholds"]).get(metric),
                "points": points}

    def export(self, node, since=None, until=None, *, now=None):
        """Raw readings of ``node`` (default: all kept), oldest first."""
        now = time.time() if now is None else now
        self._known(node)
        return self.readings.export(node, 0 if since is None else since, now + MAX_FUTURE_S if until is None else until)

    # ------------------------------------------------------------------ admin changes
    def mark(self, node, place, *, now=None):
        """Set the place of ``node`` from now on (None or "": no place)."""
        self._known(node)
        place = place or None
        if place is not None and not PLACE_RE.match(place):
            raise RegistryError(400, f"place: {place[:70]!r} is not a place label (letters, digits, spaces and "
                                     "_ . , ' ( ) / -, at most 64, starting with a letter or digit)")
        return self.readings.set_place(node, place, now=now)

    def set_threshold(self, node, metric, low=None, high=None, *, now=None):
        """Set ``node``'s threshold band for ``metric`` (None for an open side); both None removes the node's
        own threshold (cluster.yaml's applies again). Returns the threshold in force (or None)."""
        self._known(node)
        if metric not in METRICS:
            raise RegistryError(400, f"metric: unknown metric {str(metric)[:40]!r}; known: {', '.join(METRICS)}")
        if low is not None or high is not None:
            problem = threshold_problem(metric, low, high)
            if problem:
                raise RegistryError(400, f"{THRESHOLD_PREFIX}{metric}: {problem}")
        return self.readings.set_threshold(node, metric, low, high, now=now,
                                           yaml_thresholds=self.settings()["thresholds"])
