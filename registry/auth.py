"""Authentication for the REST API (flask-httpauth).

* join token: ``Authorization: Bearer <join token>``, only for enrolment; checked against
  ``secrets/join-token.json`` (constant-time compare, expiry honoured);
* node: HTTP Basic ``<hostname>:<node credential>``; the store keeps only a hash of the credential;
* admin: HTTP Basic ``admin:<secrets/admin-password>``.

Refusals are JSON ``{"error": ...}`` with 401 (missing/wrong credentials) or 403 (right credentials,
not allowed). Nothing here logs or returns a presented secret.
"""

import hmac
import logging

from flask import current_app, g, jsonify, request
from flask_httpauth import HTTPBasicAuth, HTTPTokenAuth

from pibake.errors import SecretsError
from pibake.secrets import ADMIN_USER, admin_password, check_join_token

LOG = logging.getLogger(__name__)

JOIN_REJECTED = ("join token rejected: wrong or expired; get the current one with `pibake token show` "
                 "or a new one with `pibake token rotate`")
BASIC_REJECTED = ("credentials rejected: send HTTP Basic admin:<admin password> or "
                  "<hostname>:<node credential> (a removed node must enrol again)")

join_auth = HTTPTokenAuth(scheme="Bearer", realm="pibake-enrol")
basic_auth = HTTPBasicAuth(realm="pibake-registry")


def registry():
    return current_app.extensions["pibake_registry"]


def admin_matches(cluster_dir, password):
    try:
        expected = admin_password(cluster_dir)
    except SecretsError:
        LOG.error("the admin password file is missing; admin login is impossible")
        return False
    return isinstance(password, str) and hmac.compare_digest(password.encode(), expected.encode())


@join_auth.verify_token
def _verify_join_token(token):
    if not token:
        return None
    try:
        ok = check_join_token(registry().cluster_dir, token, now=current_app.config.get("PIBAKE_NOW"))
    except SecretsError:
        LOG.error("the join token file is missing or damaged; enrolment is impossible until "
                  "`pibake token rotate`")
        return None
    if not ok:
        LOG.warning("enrolment refused from %s: wrong or expired join token", request.remote_addr)
        return None
    return {"kind": "join"}


@join_auth.error_handler
def _join_error(status):
    if status == 401:
        return jsonify(error=JOIN_REJECTED), 401
    return jsonify(error="not allowed with the join token"), status


@basic_auth.verify_password
def _verify_basic(username, password):
    if not username or not password:
        return None
    reg = registry()
    if username == ADMIN_USER:
        if admin_matches(reg.cluster_dir, password):
            return {"kind": "admin", "name": ADMIN_USER}
        LOG.warning("admin authentication failed from %s", request.remote_addr)
        return None
    node = reg.store.check_credential(username, password)
    if node is None:
        LOG.warning("node authentication failed for %s from %s", username[:64], request.remote_addr)
        return None
    g.node = node
    return {"kind": "node", "name": node["hostname"], "status": node["status"]}


@basic_auth.get_user_roles
def _roles(user):
    return [user["kind"]]


@basic_auth.error_handler
def _basic_error(status):
    if status == 401:
        return jsonify(error=BASIC_REJECTED), 401
    return jsonify(error="these credentials are not allowed to do this"), status
