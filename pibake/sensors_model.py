"""Sensor readings: the metric names, their units and plausible ranges, the ``sensors:`` settings of
cluster.yaml, and the alert state of a value against a threshold (core: data to data, no I/O).

One home for these facts on the manager. The sensor agent (``firstboot/sensor_agent.py``) is a single file
that cannot import pibake: it keeps a copy of ``METRICS`` and a parity test compares the two. The registry's
published schema (``registry/openapi.json``, ``Metrics``) is checked against ``metrics_schema()`` by a test.
The contract between agent and registry is docs/sensors.md (and notes/SENSORS_CONTRACT.md).
"""

import math
import re
from dataclasses import dataclass

from pibake.fields import anchored


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # as shown to people ("" for a count or flags)
    low: float  # the plausible range: the registry refuses a value outside it (a broken sensor or driver)
    high: float
    label: str
    integer: bool = False


METRICS = {m.name: m for m in (
    Metric("temperature_c", "°C", -40, 85, "Temperature"),        # BME280/BME680/BMP280 operating range
    Metric("humidity_pct", "%", 0, 100, "Humidity"),
    Metric("pressure_hpa", "hPa", 300, 1100, "Pressure"),          # the BME280's measuring range
    Metric("gas_ohm", "Ω", 0, 1e7, "Gas resistance"),              # BME680 only
    Metric("wifi_signal_dbm", "dBm", -120, 0, "Wi-Fi signal"),
    Metric("wifi_quality_pct", "%", 0, 100, "Wi-Fi quality"),
    Metric("wifi_bitrate_mbps", "Mbit/s", 0, 10000, "Wi-Fi bit rate"),
    Metric("soc_temperature_c", "°C", -40, 125, "SoC temperature"),
    Metric("throttled", "", 0, 0xFFFFFFFF, "Throttling flags", integer=True),  # vcgencmd get_throttled; 0 = fine
)}

MAX_BATCH = 500  # readings per POST /api/v1/readings; more: 413
MAX_FUTURE_S = 300  # a reading's node clock may be ahead of the manager's by this much
MIN_TIME = 946684800  # 2000-01-01: a Pi without RTC before its first NTP sync reports 1970
PLACE_RE = re.compile(anchored(r"[A-Za-z0-9][A-Za-z0-9 _.,'()/-]{0,63}"))
PLACE_PATTERN = PLACE_RE.pattern

# cluster.yaml ``sensors:`` defaults (docs/sensors.md)
DEFAULTS = {
    "raw_days": 14,          # raw readings kept this long, then only hourly min/mean/max
    "hourly_days": 1830,     # hourly aggregates kept this long (5 years)
    "offline_after_s": 600,  # no reading received for this long: the node is shown offline
    "pass_every_s": 600,     # downsampling + retention pass, run by an ingest at most this often
    "thresholds": {},
}

_RANGE = {"type": "object", "additionalProperties": False, "minProperties": 1,
          "properties": {"min": {"type": ["number", "null"]}, "max": {"type": ["number", "null"]}}}

SETTINGS_SCHEMA = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "properties": {
        "raw_days": {"type": "integer", "minimum": 1, "maximum": 3650},
        "hourly_days": {"type": "integer", "minimum": 1, "maximum": 36500},
        "offline_after_s": {"type": "integer", "minimum": 30, "maximum": 31 * 86400},
        "pass_every_s": {"type": "integer", "minimum": 10, "maximum": 86400},
        "thresholds": {
            "type": ["object", "null"],
            # a node's hostname, or "*" for every node
            "propertyNames": {"pattern": r"^(\*|[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)$"},
            "additionalProperties": {
                "type": "object",
                "propertyNames": {"enum": list(METRICS)},
                "additionalProperties": _RANGE,
            },
        },
    },
}


def settings_problems(sensors):
    """What the schema cannot say about a (schema-valid) ``sensors:`` mapping, as 'sensors.path: ...'."""
    out = []
    for node, metrics in ((sensors or {}).get("thresholds") or {}).items():
        for metric, bounds in metrics.items():
            problem = threshold_problem(metric, bounds.get("min"), bounds.get("max"))
            if problem:
                out.append(f"sensors.thresholds.{node}.{metric}: {problem}")
    return out


def sensor_settings(sensors):
    """The effective settings: a validated ``sensors:`` mapping (or None) over DEFAULTS."""
    merged = dict(DEFAULTS)
    merged.update({k: v for k, v in (sensors or {}).items() if v is not None})
    merged["thresholds"] = {node: dict(metrics) for node, metrics in (merged["thresholds"] or {}).items()}
    return merged


def threshold_problem(metric, low, high):
    """None when min/max are a usable threshold band for ``metric``, else what is wrong."""
    if metric not in METRICS:
        return f"unknown metric {metric!r}; known: {', '.join(METRICS)}"
    if low is None and high is None:
        return "give min, max or both"
    m = METRICS[metric]
    for name, value in (("min", low), ("max", high)):
        if value is not None and not m.low <= value <= m.high:
            return f"{name} {value:g} is outside the plausible range {m.low:g}..{m.high:g} {m.unit}".rstrip()
    if low is not None and high is not None and low > high:
        return f"min {low:g} is above max {high:g}"
    return None


def threshold_for(thresholds, node, metric):
    """{min, max, source} for ``node``'s ``metric`` from a cluster.yaml thresholds mapping (the node's own
    entry, else ``*``), or None."""
    for key in (node, "*"):
        bounds = (thresholds.get(key) or {}).get(metric)
        if bounds:
            return {"min": bounds.get("min"), "max": bounds.get("max"), "source": "cluster.yaml"}
    return None


def alert_state(value, threshold):
    """'low', 'high' or 'ok' for ``value`` against ``threshold`` ({min, max}); None without a threshold or
    a value."""
    if threshold is None or value is None:
        return None
    if threshold.get("min") is not None and value < threshold["min"]:
        return "low"
    if threshold.get("max") is not None and value > threshold["max"]:
        return "high"
    return "ok"


def metric_value_problem(metric, value):
    """None when ``value`` is plausible for ``metric``, else the message (the value and the range)."""
    m = METRICS[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "must be a number"
    if m.integer and value != int(value):
        return f"{value!r} must be a whole number"
    if not m.low <= value <= m.high:
        return f"{value:g} is outside {m.low:g}..{m.high:g}"
    return None


def metrics_schema():
    """The OpenAPI 3.0 schema of a reading's ``metrics`` object (``Metrics`` in registry/openapi.json)."""
    props = {}
    for m in METRICS.values():
        props[m.name] = {"type": "integer" if m.integer else "number", "minimum": m.low, "maximum": m.high,
                         "description": f"{m.label}{f' in {m.unit}' if m.unit else ''}",
                         "x-problem": f"must be a {'whole ' if m.integer else ''}number from {m.low:g} to "
                                      f"{m.high:g}"}
        if isinstance(props[m.name]["maximum"], float) and props[m.name]["maximum"].is_integer():
            props[m.name]["maximum"] = int(props[m.name]["maximum"])
    return {"type": "object", "additionalProperties": False, "properties": props,
            "description": "Metric values of one reading; every metric is optional (a node without the "
                           "sensor sends only what it has)."}
