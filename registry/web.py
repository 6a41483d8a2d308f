"""The registry's web page: server-rendered, works without JavaScript.

The admin logs in with the admin password (``secrets/admin-password``) through a form; the session is a
signed cookie (HttpOnly, SameSite=Strict, Secure: the registry is served over TLS only). Failed logins are
slowed down and limited per client address. State-changing forms carry a per-session CSRF token.
"""

import hmac
import json
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from functools import wraps
from pathlib import Path

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_from_directory,
    session,
    url_for,
)
from pibake.registry.auth import admin_matches, registry
from pibake.registry.logins import LoginThrottle

from pibake.errors import PibakeError, RegistryError

LOG = logging.getLogger(__name__)

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")


def login_required(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        if not session.get("admin"):
            return redirect(url_for("web.login", next=request.path))
        return view(*args, **kwargs)
    return wrapped


def check_csrf():
    token = request.form.get("csrf", "")
    expected = session.get("csrf", "")
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())


@bp.after_request
def _headers(response):
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; style-src 'self'; img-src 'self' data:")
    return response


def _throttle():
    """The app's LoginThrottle (made on first use)."""
    found = current_app.extensions.get("pibake_logins")
    if found is None:
        found = current_app.extensions.setdefault("pibake_logins", LoginThrottle(
            registry().cluster_dir, **current_app.config.get("PIBAKE_LOGIN_LIMITS", {})))
    return found


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Failed logins are answered late and limited per client address (``logins.py``)."""
    error = None
    status = 200
    if request.method == "POST":
        client = request.remote_addr or "-"
        throttle = _throttle()
        wait = throttle.locked_for(client)
        if wait:
            LOG.warning("web login refused from %s: too many failed logins", client)
            minutes = max(1, round(wait / 60))
            response = current_app.make_response((render_template(
                "login.html", error=f"Too many failed logins from your address. Try again in about {minutes} "
                                    f"minute{'s' if minutes != 1 else ''}."), 429))
            response.headers["Retry-After"] = str(wait)
            return response
        if admin_matches(registry().cluster_dir, request.form.get("password", "")):
            throttle.succeeded(client)
            session.clear()
            session["admin"] = True
            session["csrf"] = secrets.token_urlsafe(24)
            LOG.info("admin logged in on the web page from %s", client)
            target = request.args.get("next", "")
            if not target.startswith("/") or target.startswith("//"):
                target = url_for("web.index")
            return redirect(target)
        delay = throttle.failed(client)
        LOG.warning("web login failed from %s; answering in %.2f s", client, delay)
        current_app.config.get("PIBAKE_LOGIN_SLEEP", time.sleep)(delay)
        error = "Wrong password. The admin password is in secrets/admin-password in the cluster directory."
        status = 401
    return render_template("login.html", error=error), status


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("web.login"))


@bp.get("/")
@login_required
def index():
    reg = registry()
    nodes = reg.nodes()
    states = [n["slurm_state"] for n in nodes]
    return render_template(
        "nodes.html", nodes=nodes, cluster=reg.cluster, require_approval=reg.require_approval,
        pending=sum(1 for n in nodes if n["status"] == "pending"),
        slurm_known=any(s is not None for s in states), csrf=session.get("csrf", ""),
        report=latest_report(reg.cluster_dir), switches=switch_rows(reg.cluster_dir),
        switch_log=_switch_log(reg.cluster_dir), rules=_rules(reg.cluster_dir))


REPORT_FILE_RE = re.compile(r"^[a-z0-9_]{1,64}\.png$")


def latest_report(cluster_dir):
    """The report of the latest `pibake verify --report/--bench` (``<cluster>/reports/latest/report.json``)
    with the rows of its summary table, or None."""
    path = Path(cluster_dir) / "reports" / "latest" / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("checks"), list):
        return None
    from pibake.api import bench_summary_rows as summary_rows  # layer: the page reuses pibake.api, which imports the registry
    bench = data.get("bench") or {}
    plots = [p for p in bench.get("plots", []) if isinstance(p, str) and REPORT_FILE_RE.match(p)]
    return {"ok": data.get("ok"), "started": data.get("started"), "checks": data["checks"],
            "bench_rows": summary_rows(bench) if bench else [], "bench_error": bench.get("error"), "plots": plots}


@bp.get("/reports/latest/<name>")
@login_required
def report_file(name):
    if not REPORT_FILE_RE.match(name):
        abort(404)
    return send_from_directory(Path(registry().cluster_dir) / "reports" / "latest", name, mimetype="image/png")


def _admin_post(action, hostname):
    if not check_csrf():
        flash("The form expired; please try again.", "error")
        return redirect(url_for("web.index"))
    try:
        getattr(registry(), action)(hostname)
        flash(f"{'Accepted' if action == 'accept' else 'Removed'} {hostname}.", "ok")
    except RegistryError as err:
        flash(err.message, "error")
    except PibakeError as err:  # slurm.conf could not be applied: the change is recorded, say so
        flash(f"{hostname}: recorded, but slurm.conf could not be put in force: {err}", "error")
    return redirect(url_for("web.index"))


@bp.post("/nodes/<hostname>/accept")
@login_required
def accept(hostname):
    return _admin_post("accept", hostname)


@bp.post("/nodes/<hostname>/remove")
@login_required
def remove(hostname):
    return _admin_post("remove", hostname)


# ---------------------------------------------------------------------- switches (smart plugs)

SWITCH_ACTIONS = ("on", "off", "toggle", "cycle")


def switch_rows(cluster_dir):
    """Every switch of cluster.yaml with its state read now (in parallel; a failing plug shows its error)."""
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    try:
        items = api.list_switches(cluster_dir)
    except PibakeError as err:
        return [{"name": "-", "error": str(err)}]

    def read(item):
        try:
            return {**item, "state": api.switch_status(cluster_dir, item["name"], wait=False)["state"],
                    "error": None}
        except PibakeError as err:
            return {**item, "state": None, "error": str(err)}
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(read, items))


def _rules(cluster_dir):
    """The rules with the rules loop's last round (no device contacted), or the error reading them."""
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    try:
        return {"rules": api.rules_status(cluster_dir), "last_round": api.rules_last_round(cluster_dir),
                "error": None}
    except PibakeError as err:
        return {"rules": [], "last_round": None, "error": str(err)}


def _switch_log(cluster_dir):
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    return list(reversed(api.switch_log(cluster_dir, 10)))


def _needs_confirmation(item, action):
    """Off and cycle always; toggle when the switch powers a node (it may be on)."""
    return action in ("off", "cycle") or (action == "toggle" and item["node"])


@bp.post("/switches/<name>/<action>")
@login_required
def switch_action(name, action):
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    if not check_csrf():
        flash("The form expired; please try again.", "error")
        return redirect(url_for("web.index"))
    item = next((s for s in api.list_switches(registry().cluster_dir) if s["name"] == name), None)
    if item is None or action not in SWITCH_ACTIONS:
        abort(404)
    if _needs_confirmation(item, action) and request.form.get("confirm") != "yes":
        return render_template("confirm_switch.html", item=item, action=action, csrf=session.get("csrf", ""))
    cluster_dir = registry().cluster_dir
    try:
        if action == "cycle" and item["node"]:
            job = _start_recover(item["node"])
            flash(f"Recovering {item['node']} through {name} (job {job['id']}): it is cycled only if ssh and "
                  "Slurm both find it down.", "ok")
        elif action == "cycle":
            result = api.cycle_switch(cluster_dir, name, by="web")
            flash(f"{name}: cycled, {'on' if result['state']['on'] else 'off'} now.", "ok")
        else:
            result = api.switch_command(cluster_dir, name, action, by="web")
            flash(f"{name}: {'on' if result['state']['on'] else 'off'} now.", "ok")
    except PibakeError as err:
        flash(str(err), "error")
    return redirect(url_for("web.index"))


def _start_recover(node):
    return current_app.extensions["pibake_jobs"].submit("recover", {"node": node})
