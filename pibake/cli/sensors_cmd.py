"""``pibake sensors ...``: sensor readings kept by the registry on the manager, a thin shell over
``pibake.api.Sensors`` (run it on the manager, in the cluster directory the registry serves)."""

import csv
import datetime as dt
import io
import json
import sys
import time

import click

from pibake import api
from pibake.api import PibakeError
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state

SHORT = {"temperature_c": "TEMP", "humidity_pct": "HUM", "pressure_hpa": "PRESS", "wifi_signal_dbm": "WIFI",
         "soc_temperature_c": "SOC"}


def _sensors(state):
    return api.Sensors(state.cluster_dir)


def _time(value):
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value, now):
    if value is None:
        return "never"
    seconds = max(0, now - value)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _value(entry):
    if entry is None:
        return "-"
    value = entry["value"]
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} {entry['unit']}".rstrip()


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        click.echo("  ".join(str(col).ljust(w) for col, w in zip(row, widths)).rstrip(), err=True)


def _time_option(name, help_text):
    def parse(_ctx, _param, value):
        return api.parse_sensor_time(value, name.lstrip("-"), None)
    return click.option(name, default=None, metavar="TIME", callback=parse, help=help_text)


@cli.group("sensors", short_help="Sensor readings: list, show, export, mark, threshold")
def sensors_group():
    """Sensor readings the registry keeps on the manager (temperature, humidity, pressure, Wi-Fi, SoC
    temperature, throttling) from sensor nodes and every other Pi. Run on the manager. See docs/sensors.md."""


@sensors_group.command("list")
@json_option
@pass_state
def list_cmd(state, as_json):
    """Every sensor with its latest values, place, last seen, offline flag and alerts."""
    items = _sensors(state).list()
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo("no sensor readings yet (sensor nodes send them once enrolled; see docs/sensors.md)", err=True)
        return
    now = time.time()
    rows = [(s["node"], s["place"] or "-", "offline" if s["offline"] else "online", _ago(s["last_seen"], now),
             *(_value(s["values"].get(m)) for m in SHORT), ",".join(s["alerting"]) or "-") for s in items]
    _table(rows, ("NODE", "PLACE", "STATE", "LAST SEEN", *SHORT.values(), "ALERTS"))


@sensors_group.command("show")
@click.argument("node")
@json_option
@pass_state
def show_cmd(state, node, as_json):
    """One sensor: latest values with their thresholds and alert states, the latest Wi-Fi scan."""
    item = _sensors(state).show(node)
    if as_json:
        emit_json(item)
        return
    now = time.time()
    click.echo(f"{item['node']}: {'OFFLINE' if item['offline'] else 'online'}, last seen "
               f"{_ago(item['last_seen'], now)}, place {item['place'] or '-'}", err=True)

    rows = []
    for metric in api.SENSOR_METRICS:
        threshold = item["thresholds"].get(metric)
        alert = item["alerts"].get(metric)
        if metric not in item["values"] and not threshold:
            continue
        band = "-" if not threshold else (f"{'' if threshold['min'] is None else format(threshold['min'], 'g')}.."
                                          f"{'' if threshold['max'] is None else format(threshold['max'], 'g')} "
                                          f"({threshold['source']})")
        since = f" since {_time(alert['since'])}" if alert and alert["state"] != "ok" else ""
        rows.append((metric, _value(item["values"].get(metric)), band, (alert["state"] if alert else "-") + since))
    if rows:
        _table(rows, ("METRIC", "VALUE", "THRESHOLD", "ALERT"))
    if item["networks"]:
        click.echo(f"Wi-Fi networks seen at {_time(item['networks'][0]['time'])}:", err=True)
        _table([(n["ssid"] or "(hidden)", n["bssid"], "-" if n["signal_dbm"] is None else f"{n['signal_dbm']:g} dBm",
                 n["channel"] or "-", n["security"] or "-") for n in item["networks"]],
               ("SSID", "BSSID", "SIGNAL", "CHANNEL", "SECURITY"))


@sensors_group.command("export")
@click.argument("node")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True,
              help="CSV (one column per metric) or a JSON list.")
@_time_option("--since", "Oldest reading: Unix seconds or relative (-7d, -24h). Default: all kept.")
@_time_option("--until", "Newest reading (exclusive). Default: now.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write to this file instead of stdout.")
@pass_state
def export_cmd(state, node, fmt, since, until, output):
    """Export the raw readings of NODE (kept for sensors.raw_days; older ones exist only as hourly
    aggregates), oldest first."""
    rows = _sensors(state).export(node, since, until)
    if fmt == "json":
        text = json.dumps(rows, indent=2) + "\n"
    else:
        columns = list(api.SENSOR_METRICS)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["seq", "time", "utc", "place", *columns])
        for r in rows:
            writer.writerow([r["seq"], r["time"], _time(r["time"]), r["place"] or "",
                             *("" if r[c] is None else r[c] for c in columns)])
        text = buffer.getvalue()
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
        click.echo(f"{len(rows)} reading(s) of {node} written to {output}", err=True)
    else:
        sys.stdout.write(text)


@sensors_group.command("mark")
@click.argument("node")
@click.argument("place", required=False)
@click.option("--clear", is_flag=True, help="The node has no place from now on.")
@json_option
@pass_state
def mark_cmd(state, node, place, clear, as_json):
    """Set where NODE is from now on (e.g. `pibake sensors mark red-zero kitchen`): its readings that carry
    no place of their own are labelled with it (the Wi-Fi survey groups by place)."""
    if clear == bool(place):
        raise PibakeError("give a PLACE, or --clear (not both)")
    result = _sensors(state).mark(node, None if clear else place)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{node}: place {result['place'] or 'cleared'} from {_time(result['since'])} UTC", err=True)


@sensors_group.command("threshold")
@click.argument("node")
@click.argument("metric", required=False)
@click.option("--min", "low", type=float, default=None, help="Alert below this value.")
@click.option("--max", "high", type=float, default=None, help="Alert above this value.")
@click.option("--clear", is_flag=True, help="Remove NODE's own threshold for METRIC (cluster.yaml's applies).")
@json_option
@pass_state
def threshold_cmd(state, node, metric, low, high, clear, as_json):
    """Show NODE's thresholds, or set METRIC's band with --min/--max (overrides sensors.thresholds in
    cluster.yaml for this node), or --clear it."""
    sensors = _sensors(state)
    if metric is None:
        if low is not None or high is not None or clear:
            raise PibakeError("name the METRIC to set or clear, e.g. `pibake sensors threshold red-zero "
                              "temperature_c --max 28`")
        thresholds = sensors.show(node)["thresholds"]
        if as_json:
            emit_json(thresholds)
        elif not thresholds:
            click.echo(f"{node}: no thresholds", err=True)
        else:
            _table([(m, "-" if t["min"] is None else f"{t['min']:g}", "-" if t["max"] is None else f"{t['max']:g}",
                     t["source"]) for m, t in thresholds.items()], ("METRIC", "MIN", "MAX", "FROM"))
        return
    if clear == (low is not None or high is not None):
        raise PibakeError("give --min and/or --max, or --clear")
    result = sensors.set_threshold(node, metric, low, high)
    if as_json:
        emit_json(result)
    elif result is None:
        click.echo(f"{node} {metric}: no threshold", err=True)
    else:
        click.echo(f"{node} {metric}: {'-' if result['min'] is None else format(result['min'], 'g')}.."
                   f"{'-' if result['max'] is None else format(result['max'], 'g')} ({result['source']})", err=True)
