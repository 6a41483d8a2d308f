"""The one client of the cluster's registry for everything that runs beside it (deploy, verify, the lab,
the switch rules): HTTPS trusting only the cluster CA (``secrets/ca.crt``; no system CAs, and neither
proxies nor a CA bundle from the environment), the admin credential for the calls that need it, a timeout
on every request, and one error, ``RegistryClientError``, naming the URL, the HTTP status and the
registry's own message.

The first-boot agent keeps its own standard-library client (``firstboot/agent.py``, it must run on a
bare Pi); both speak what ``registry/openapi.json`` publishes, and tests/test_registry_contract.py sends
both clients' requests to the real registry app and checks them against that document."""

import logging
import os

from pibake import __version__
from pibake.errors import RegistryClientError, SecretsError
from pibake.secrets import admin_password, secrets_dir

LOG = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
DEFAULT_TIMEOUT = 10

# ``reason`` of a RegistryClientError when nothing answered at the registry's address (no HTTP status):
# deploy then sets the manager up; any other failure means something answers there.
REFUSED = "connection refused"
TIMED_OUT = "timed out"
UNREACHABLE = "cannot connect"
NOTHING_LISTENS = (REFUSED, TIMED_OUT, UNREACHABLE)
TLS_FAILED = "TLS check against the cluster CA failed (SSLError)"
NOT_JSON = "the answer is not JSON"


class RegistryClient:
    """Requests to one registry: ``base`` its URL (``https://ip:port``), ``ca_file`` the only CA trusted,
    ``password`` the admin password, or ``cluster_dir`` to read it from when first needed (with neither,
    only the calls without ``admin`` work)."""

    def __init__(self, base, ca_file, *, password=None, cluster_dir=None, timeout=DEFAULT_TIMEOUT):
        self.base = base.rstrip("/")
        self.cluster_dir = cluster_dir
        self.api = self.base + API_PREFIX
        self.ca_file = str(ca_file)
        self.password = password
        self.timeout = timeout
        self._session = None

    @classmethod
    def for_cluster(cls, cluster, cluster_dir, *, timeout=DEFAULT_TIMEOUT):
        """The registry of the cluster in ``cluster_dir``; the admin password is read when first needed."""
        base = f"https://{cluster.manager_ip}:{cluster.registry_port}"  # by IP: the certificate names it
        return cls(base, secrets_dir(cluster_dir) / "ca.crt", cluster_dir=cluster_dir, timeout=timeout)

    def _admin(self):
        if self.password is None and self.cluster_dir is not None:
            try:
                self.password = admin_password(self.cluster_dir)  # SecretsError when missing
            except OSError as exc:  # unreadable (permissions): say so, no traceback
                raise SecretsError(f"{secrets_dir(self.cluster_dir) / 'admin-password'}: cannot read the admin "
                                   f"password ({exc.strerror})") from None
        return ("admin", self.password) if self.password is not None else None

    def session(self):
        if self._session is None:
            import requests  # start-up: requests loads only when something talks to the registry

            session = requests.Session()
            # Only the cluster CA and no proxy: with trust_env (the default) REQUESTS_CA_BUNDLE or
            # CURL_CA_BUNDLE in the environment silently replace ``verify``.
            session.trust_env = False
            session.verify = self.ca_file
            session.headers.update({"User-Agent": f"pibake/{__version__}", "Accept": "application/json"})
            self._session = session
        return self._session

    def call(self, method, path, *, admin=False, body=None, ok=(200,), timeout=None):
        """The JSON answer of ``method /api/v1<path>``; RegistryClientError for no answer, a status not in
        ``ok`` or an answer that is not JSON."""
        import requests  # start-up: see session()

        url = self.api + path
        if not os.path.isfile(self.ca_file):  # requests would raise a bare OSError
            raise RegistryClientError(url, f"the cluster CA {self.ca_file} is missing: run `pibake init` (or copy "
                                           "the cluster directory with its secrets/)")
        try:
            r = self.session().request(method, url, json=body, auth=self._admin() if admin else None,
                                       timeout=timeout or self.timeout, allow_redirects=False)
        except requests.exceptions.SSLError:
            raise RegistryClientError(url, TLS_FAILED) from None
        except requests.exceptions.ConnectionError as exc:  # ConnectTimeout is one too
            text = str(exc).lower()
            reason = REFUSED if "refused" in text else TIMED_OUT if "timed out" in text else UNREACHABLE
            raise RegistryClientError(url, reason) from None
        except requests.exceptions.Timeout:
            raise RegistryClientError(url, TIMED_OUT) from None
        if r.status_code not in ok:
            raise RegistryClientError(url, f"HTTP {r.status_code}", status=r.status_code,
                                      server_message=server_message(r))
        try:
            return r.json()
        except ValueError:
            raise RegistryClientError(url, NOT_JSON, status=r.status_code) from None

    def health(self):
        """``GET /health``: {"status": "ok", ...}."""
        return self.call("GET", "/health")

    def nodes(self):
        """``GET /nodes`` (admin): one dict per enrolled node."""
        return self.call("GET", "/nodes", admin=True)

    def close(self):
        if self._session is not None:
            self._session.close()
            self._session = None


def server_message(response):
    """The registry's one-line ``{"error": ...}``, else the start of the body (None when empty)."""
    try:
        data = response.json()
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except ValueError:
        pass
    lines = (response.text or "").strip().splitlines()
    return lines[0][:200] if lines else None
