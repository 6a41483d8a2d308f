"""REST blueprint ``/api/v1`` (contract: docs and ``openapi.json`` next to this module)."""

import logging

from flask import Blueprint, Response, current_app, jsonify, request
from pibake.registry.auth import basic_auth, join_auth, registry
from pibake.registry.schema import openapi_document
from werkzeug.exceptions import HTTPException

from pibake.errors import (
    ApplyError,
    ConfigError,
    PibakeError,
    RegistryError,
    SecretsError,
    SwitchError,
)
from pibake.secrets import munge_key_b64

LOG = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def json_body():
    body = request.get_json(silent=True)
    if body is None:
        raise RegistryError(400, "the request body must be JSON (Content-Type: application/json)")
    return body


def _current_node_name():
    user = basic_auth.current_user()
    return user["name"] if user and user["kind"] == "node" else None


@bp.errorhandler(RegistryError)
def registry_error_response(err):
    body = {"error": err.message}
    if err.problems:
        body["problems"] = err.problems
    return jsonify(body), err.status


@bp.errorhandler(ApplyError)
def _apply_error(err):
    LOG.error("slurm.conf not applied: %s", err)
    return jsonify(error=f"the node is recorded but slurm.conf could not be put in force ({err}); "
                         "retry later"), 503


def http_error_response(err):
    """An HTTPException as the API's JSON error, keeping the headers it carries (405: ``Allow``, RFC 9110)."""
    response = jsonify(error=f"{err.name}: {err.description}")
    response.status_code = err.code
    for name, value in err.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


bp.register_error_handler(HTTPException, http_error_response)


@bp.get("/health")
def health():
    return jsonify(registry().health())


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())


@bp.post("/enrol")
@join_auth.login_required
def enrol():
    body, created = registry().enrol(json_body(), peer_ip=request.remote_addr)
    return jsonify(body), 201 if created else 200


@bp.get("/munge-key")
@basic_auth.login_required(role="node")
def munge_key():
    user = basic_auth.current_user()
    if user["status"] == "pending":
        raise RegistryError(403, f"{user['name']} is pending approval; an admin must accept it "
                                 f"(`pibake registry accept {user['name']}`)")
    reg = registry()
    reg.store.touch(user["name"])
    # mqtt: whether the agent should ask for a broker password (POST /mqtt-credential); without MQTT it
    # saves that request (one TLS request per node per deploy)
    return jsonify(munge_key_b64=munge_key_b64(reg.cluster_dir), mqtt=reg.cluster_config().mqtt.enabled)


@bp.get("/slurm.conf")
@basic_auth.login_required(role=["node", "admin"])
def slurm_conf():
    reg = registry()
    if _current_node_name():
        reg.store.touch(_current_node_name())
    return Response(reg.slurm_conf(), mimetype="text/plain")


@bp.post("/nodes/<hostname>/status")
@basic_auth.login_required(role="node")
def node_status(hostname):
    if _current_node_name() != hostname:
        raise RegistryError(403, "a node may report only its own status")
    node = registry().report_status(hostname, json_body())
    return jsonify(node)


@bp.get("/nodes")
@basic_auth.login_required(role="admin")
def list_nodes():
    return jsonify(registry().nodes())


@bp.get("/nodes/<hostname>")
@basic_auth.login_required(role="admin")
def get_node(hostname):
    return jsonify(registry().node(hostname))


@bp.delete("/nodes/<hostname>")
@basic_auth.login_required(role="admin")
def delete_node(hostname):
    return jsonify(registry().remove(hostname))


@bp.post("/nodes/<hostname>/accept")
@basic_auth.login_required(role="admin")
def accept_node(hostname):
    return jsonify(registry().accept(hostname))


# ---------------------------------------------------------------------- background jobs (deploy, verify)

def _jobs():
    return current_app.extensions["pibake_jobs"]


def _start_job(kind):
    job = _jobs().submit(kind, json_body())
    response = jsonify(job)
    response.status_code = 202
    response.headers["Location"] = f"{bp.url_prefix}/jobs/{job['id']}"
    return response


@bp.post("/deploy")
@basic_auth.login_required(role="admin")
def start_deploy():
    """Start `pibake deploy` on the hosts of the body ({hosts, options}); 202 with the job."""
    return _start_job("deploy")


@bp.post("/verify")
@basic_auth.login_required(role="admin")
def start_verify():
    """Start `pibake verify [--bench]` ({bench, options}); 202 with the job."""
    return _start_job("verify")


@bp.get("/jobs")
@basic_auth.login_required(role="admin")
def list_jobs():
    return jsonify(_jobs().list())


@bp.get("/jobs/<job_id>")
@basic_auth.login_required(role="admin")
def get_job(job_id):
    return jsonify(_jobs().get(job_id))


# ---------------------------------------------------------------------- switches (smart plugs)

def _switch_call(function, *args, **kwargs):
    """Run a pibake.api switch function; its user errors become JSON errors with a fitting status."""
    from pibake.api import SwitchDriverMissing  # layer: the REST API reuses pibake.api, which imports the registry

    try:
        return function(*args, **kwargs)
    except SwitchDriverMissing as err:  # not the plug: this manager lacks the driver's library
        raise RegistryError(500, str(err)) from None
    except SwitchError as err:  # the plug: unreachable, refused credentials, timed out, garbage
        raise RegistryError(502, str(err)) from None
    except ConfigError as err:
        raise RegistryError(404 if "no switch named" in str(err) else 500, str(err)) from None
    except (SecretsError, PibakeError) as err:
        raise RegistryError(500, str(err)) from None


def _switch_item(name):
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    item = next((s for s in _switch_call(api.list_switches, registry().cluster_dir) if s["name"] == name), None)
    if item is None:
        raise RegistryError(404, f"no switch named {name[:64]!r} in cluster.yaml")
    return item


@bp.get("/switches")
@basic_auth.login_required(role="admin")
def list_switches():
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    return jsonify(_switch_call(api.list_switches, registry().cluster_dir))


@bp.get("/switches/log")
@basic_auth.login_required(role="admin")
def switch_log():
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    return jsonify(api.switch_log(registry().cluster_dir))


@bp.get("/rules")
@basic_auth.login_required(role="admin")
def list_rules():
    """The rules with the rules loop's last round (GET only: the loop, not a request, switches)."""
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    cluster_dir = registry().cluster_dir
    try:
        rules = api.rules_status(cluster_dir)
    except PibakeError as err:  # cluster.yaml does not validate: a server-side problem, not a missing item
        raise RegistryError(500, str(err)) from None
    return jsonify({"rules": rules, "last_round": api.rules_last_round(cluster_dir)})


@bp.get("/switches/<name>")
@basic_auth.login_required(role="admin")
def switch_status(name):
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    _switch_item(name)
    return jsonify(_switch_call(api.switch_status, registry().cluster_dir, name))


@bp.post("/switches/<name>/<action>")
@basic_auth.login_required(role="admin")
def switch_action(name, action):
    """on, off, toggle, cycle; the state read back. Cycling a node's plug is a recovery: POST /recover."""
    from pibake import api  # layer: the REST API reuses pibake.api, which imports the registry

    if action not in ("on", "off", "toggle", "cycle"):
        raise RegistryError(404, f"no switch action {action[:32]!r} (on, off, toggle, cycle)")
    item = _switch_item(name)
    if action == "cycle":
        if item["node"]:
            raise RegistryError(409, f"switch {name} powers node {item['node']}: recover it with POST "
                                     f"{bp.url_prefix}/recover {{\"node\": \"{item['node']}\"}}, which checks "
                                     "that it is down first")
        return jsonify(_switch_call(api.cycle_switch, registry().cluster_dir, name, by="rest"))
    return jsonify(_switch_call(api.switch_command, registry().cluster_dir, name, action, by="rest"))


@bp.post("/recover")
@basic_auth.login_required(role="admin")
def start_recover():
    """Start `pibake recover NODE` ({node, off_s, wait_s, force}); 202 with the job."""
    return _start_job("recover")
