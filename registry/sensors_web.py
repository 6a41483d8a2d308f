"""The sensors pages of the registry's web interface (same login, CSRF token and TLS as the nodes page):
``/sensors`` lists every sensor with its latest values, ``/sensors/<node>`` shows one with history charts
(24 h / 7 d / 30 d, threshold band), Wi-Fi strength, the networks around, the Wi-Fi survey, and forms to set
its place and thresholds. Charts are inline SVG drawn by ``charts.py``: no JavaScript, no CDN."""

import datetime as dt
import time

from flask import (
    Blueprint,
    abort,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from pibake.registry import charts
from pibake.registry.sensors_api import sensors
from pibake.registry.web import check_csrf, login_required

from pibake.errors import RegistryError
from pibake.sensors_model import METRICS

bp = Blueprint("sensors_web", __name__, template_folder="templates")

RANGES = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
SUMMARY_METRICS = ("temperature_c", "humidity_pct", "pressure_hpa", "wifi_signal_dbm", "soc_temperature_c")


def _sensors():
    return sensors()


def _utc(value):
    if value is None:
        return "never"
    return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _number(entry):
    if entry is None:
        return "—"
    value = entry["value"] if isinstance(entry, dict) else entry
    return f"{value:g}" if isinstance(value, float) else str(value)


@bp.app_template_filter("utc")
def _utc_filter(value):
    return _utc(value)


@bp.app_template_filter("num")
def _num_filter(value):
    return _number(value)


@bp.get("/sensors")
@login_required
def sensors_list():
    return render_template("sensors.html", sensors=_sensors().list(), metrics=METRICS, columns=SUMMARY_METRICS)


@bp.get("/sensors/<node>")
@login_required
def sensor_page(node):
    sensors = _sensors()
    span_name = request.args.get("range", "24h")
    if span_name not in RANGES:
        abort(404)
    try:
        item = sensors.show(node)
    except RegistryError:
        abort(404)
    now = time.time()
    charts_out = []
    for metric in METRICS:
        series = sensors.series(node, metric, now - RANGES[span_name], now, None, now=now)
        if not series["points"] and metric not in item["values"]:
            continue  # a metric this node does not measure
        label = f"{METRICS[metric].label} ({METRICS[metric].unit})" if METRICS[metric].unit else METRICS[metric].label
        charts_out.append({"metric": metric, "label": label, "series": series,
                           "svg": charts.render(series, title=f"{label}, last {span_name}")})
    return render_template("sensor.html", item=item, metrics=METRICS, charts=charts_out, span=span_name,
                           ranges=list(RANGES), csrf=session.get("csrf", ""))


def _band(threshold):
    low, high = (("" if threshold[k] is None else _number(threshold[k])) for k in ("min", "max"))
    return f"{low}..{high} ({threshold['source']})"


def _back(node):
    return redirect(url_for("sensors_web.sensor_page", node=node))


@bp.post("/sensors/<node>/place")
@login_required
def mark_place(node):
    if not check_csrf():
        flash("The form expired; please try again.", "error")
        return _back(node)
    try:
        result = _sensors().mark(node, request.form.get("place", "").strip() or None)
        flash(f"{node}: place {result['place'] or 'cleared'} from now on.", "ok")
    except RegistryError as err:
        flash(err.message, "error")
    return _back(node)


@bp.post("/sensors/<node>/threshold")
@login_required
def set_threshold(node):
    if not check_csrf():
        flash("The form expired; please try again.", "error")
        return _back(node)
    metric = request.form.get("metric", "")
    try:
        bounds = []
        for name in ("min", "max"):
            text = request.form.get(name, "").strip()
            try:
                bounds.append(float(text) if text else None)
            except ValueError:
                raise RegistryError(400, f"{name}: {text[:20]!r} is not a number") from None
        result = _sensors().set_threshold(node, metric, *bounds)
        flash(f"{node} {metric}: " + ("no threshold" if result is None else
                                      _band(result)), "ok")
    except RegistryError as err:
        flash(err.message, "error")
    return _back(node)
