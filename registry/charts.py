"""History charts for the sensors page, drawn here as inline SVG: the manager may have no internet (no CDN), and
the page works without JavaScript. Only presentation attributes and CSS classes (the page's CSP allows no inline
styles). Pure: a series (``pibake.sensors.Sensors.series``) in, SVG text out.

The chart shows the mean per bucket as a line, the min..max of each bucket as a shaded band, the threshold band
(when set) as a green stripe with dashed edges, a time axis with 4-6 ticks and a value axis with 4-6 ticks.
"""

import datetime as dt
import math

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 10, 26


def nice_ticks(low, high, count=5):
    """Round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if high <= low:
        high = low + 1
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def time_ticks(since, until, most=8):
    """Tick times on whole UTC hours/days: the smallest step that gives at most ``most`` ticks."""
    for step in (600, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400, 14 * 86400):
        if (until - since) / step <= most:
            break
    first = math.ceil(since / step) * step
    return [first + i * step for i in range(int((until - first) // step) + 1) if first + i * step < until]


def _time_label(t, span):
    when = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return when.strftime("%H:%M" if span <= 2 * 86400 else "%d %b")


def _gaps(points, step):
    """Split points where readings are missing (a node out of range draws no line across the gap): a gap is
    more than three times the usual spacing of the points (a node reporting every 10 min has 5 empty 2-min
    buckets between readings, which is not a gap)."""
    deltas = sorted(b["time"] - a["time"] for a, b in zip(points, points[1:]))
    usual = max(step, deltas[len(deltas) // 2] if deltas else step)
    runs, run = [], []
    for p in points:
        if run and p["time"] - run[-1]["time"] > 3 * usual:
            runs.append(run)
            run = []
        run.append(p)
    if run:
        runs.append(run)
    return runs


def render(series, *, title):
    """SVG markup for ``series`` ({since, until, step, unit, threshold, points}), with an accessible title."""
    since, until, unit = series["since"], series["until"], series["unit"]
    points, threshold = series["points"], series.get("threshold") or {}
    values = [v for p in points for v in (p["min"], p["max"])]
    values += [v for v in (threshold.get("min"), threshold.get("max")) if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 1.0
    ticks = nice_ticks(low - pad, high + pad)
    y0, y1 = ticks[0], ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t):
        return LEFT + (t - since) / (until - since) * plot_w

    def y(v):
        return TOP + (1 - (v - y0) / (y1 - y0)) * plot_h

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#ffffff" '
           'stroke="#c9ced6"/>']
    if threshold.get("min") is not None or threshold.get("max") is not None:
        top = y(min(threshold["max"], y1)) if threshold.get("max") is not None else TOP
        bottom = y(max(threshold["min"], y0)) if threshold.get("min") is not None else TOP + plot_h
        out.append(f'<rect class="threshold-band" x="{LEFT}" y="{top:.1f}" width="{plot_w}" '
                   f'height="{max(0.0, bottom - top):.1f}" fill="#2e7d32" fill-opacity="0.10"/>')
        for edge in ("min", "max"):
            if threshold.get(edge) is not None and y0 <= threshold[edge] <= y1:
                out.append(f'<line class="threshold-{edge}" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(threshold[edge]):.1f}" '
                           f'y2="{y(threshold[edge]):.1f}" stroke="#2e7d32" stroke-dasharray="5 4"/>')
    for v in ticks:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eef0f4"/>'
                   f'<text class="ytick" x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#4a5363">{v:g}</text>')
    span = until - since
    for t in time_ticks(since, until):
        if since < t:
            out.append(f'<text class="xtick" x="{x(t):.1f}" y="{HEIGHT - 8}" text-anchor="middle" font-size="11" '
                       f'fill="#4a5363">{_time_label(t, span)}</text>')
    out.append(f'<text x="8" y="{TOP + 10}" font-size="11" fill="#4a5363">{escape(unit)}</text>')
    step = series["step"]
    for run in _gaps(points, step):
        mid = [(x(p["time"] + step / 2), p) for p in run]
        if len(run) > 1:
            upper = " ".join(f"{px:.1f},{y(p['max']):.1f}" for px, p in mid)
            lower = " ".join(f"{px:.1f},{y(p['min']):.1f}" for px, p in reversed(mid))
            out.append(f'<polygon class="minmax" points="{upper} {lower}" fill="#7a1f3d" fill-opacity="0.15"/>')
            line = " ".join(f"{px:.1f},{y(p['mean']):.1f}" for px, p in mid)
            out.append(f'<polyline class="mean" points="{line}" fill="none" stroke="#7a1f3d" stroke-width="1.6"/>')
        else:
            px, p = mid[0]
            out.append(f'<circle class="mean" cx="{px:.1f}" cy="{y(p["mean"]):.1f}" r="2.5" fill="#7a1f3d"/>')
    if not points:
        out.append(f'<text class="nodata" x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" '
                   'font-size="13" fill="#4a5363">no readings in this range</text>')
    out.append("</svg>")
    return Markup("".join(out))
