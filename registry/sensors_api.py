"""REST endpoints for sensor readings (``/api/v1/readings``, ``/api/v1/sensors...``), a blueprint of its own
next to ``api.bp`` (same prefix, same JSON errors, contract in ``openapi.json``). The handlers call
``pibake.sensors.Sensors`` (through ``pibake.api``), one instance per app."""

from flask import Blueprint, current_app, jsonify, request
from pibake.registry.api import http_error_response, json_body, registry_error_response
from pibake.registry.auth import basic_auth, registry
from pibake.registry.schema import problems
from werkzeug.exceptions import HTTPException

from pibake.errors import RegistryError

bp = Blueprint("sensors_api", __name__, url_prefix="/api/v1")
bp.register_error_handler(RegistryError, registry_error_response)
bp.register_error_handler(HTTPException, http_error_response)

READINGS_MAX_BODY = 8 * 1024 * 1024  # 500 readings with a Wi-Fi scan each; the app's limit is 256 KiB


def sensors():
    """The app's ``pibake.api.Sensors`` (made on first use: the readings DB is opened only when needed)."""
    found = current_app.extensions.get("pibake_sensors")
    if found is None:
        from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

        found = current_app.extensions.setdefault("pibake_sensors", api.Sensors(registry().cluster_dir))
    return found


@bp.before_request
def _larger_body_for_readings():
    if request.endpoint == "sensors_api.post_readings":
        request.max_content_length = READINGS_MAX_BODY


@bp.post("/readings")
@basic_auth.login_required(role="node")
def post_readings():
    """A node's own readings, always stored under the authenticated hostname (the body names no node)."""
    user = basic_auth.current_user()
    if user["status"] == "pending":
        raise RegistryError(403, f"{user['name']} is pending approval; an admin must accept it "
                                 f"(`pibake registry accept {user['name']}`)")
    return jsonify(sensors().ingest(user["name"], json_body()))


@bp.get("/sensors")
@basic_auth.login_required(role="admin")
def list_sensors():
    return jsonify(sensors().list())


@bp.get("/sensors/<node>")
@basic_auth.login_required(role="admin")
def get_sensor(node):
    return jsonify(sensors().show(node))


def _query_step():
    raw = request.args.get("step")
    if raw in (None, ""):
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 31622400:
        raise RegistryError(400, f"step: {raw[:20]!r} must be whole seconds from 1 to 31622400")
    return int(raw)


@bp.get("/sensors/<node>/readings")
@basic_auth.login_required(role="admin")
def sensor_readings(node):
    from pibake.api import parse_sensor_time as parse_time  # layer: the REST API reuses pibake.api, which imports the registry

    metric = request.args.get("metric")
    if not metric:
        raise RegistryError(400, "metric: is required (e.g. ?metric=temperature_c)")
    until = parse_time(request.args.get("until"), "until", None)
    since = parse_time(request.args.get("since"), "since", None)
    return jsonify(sensors().series(node, metric, since, until, _query_step()))


@bp.post("/sensors/<node>/place")
@basic_auth.login_required(role="admin")
def mark_place(node):
    body = json_body()
    found = problems("PlaceRequest", body)
    if found:
        raise RegistryError(400, "; ".join(found), found)
    return jsonify(sensors().mark(node, body["place"]))


@bp.put("/sensors/<node>/thresholds/<metric>")
@basic_auth.login_required(role="admin")
def set_threshold(node, metric):
    body = json_body()
    found = problems("ThresholdRequest", body)
    if found:
        raise RegistryError(400, "; ".join(found), found)
    return jsonify(sensors().set_threshold(node, metric, body.get("min"), body.get("max")))


@bp.delete("/sensors/<node>/thresholds/<metric>")
@basic_auth.login_required(role="admin")
def delete_threshold(node, metric):
    return jsonify(sensors().set_threshold(node, metric, None, None))
