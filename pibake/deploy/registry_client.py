"""The manager's registry as deploy sees it from the machine it runs on: /health, and the nodes' Slurm states."""

from pibake.errors import DeployError
from pibake.secrets import secrets_dir

REGISTRY_DOWN = ("connection refused", "timed out", "cannot connect")


def registry_down(why):
    """True when ``RegistryClient.health()``'s answer means nothing listens at the registry's address (pure):
    then deploy sets the manager up. A TLS failure or an HTTP error means something runs there that is not
    this cluster's healthy registry: deploy does not touch it."""
    return why in REGISTRY_DOWN


class RegistryClient:
    """The manager's registry as seen from the machine running deploy (by IP: the cert names it)."""

    def __init__(self, cluster, cluster_dir, timeout=10):
        self.base = f"https://{cluster.manager_ip}:{cluster.registry_port}/api/v1"
        self.ca = str(secrets_dir(cluster_dir) / "ca.crt")
        self.admin_file = secrets_dir(cluster_dir) / "admin-password"
        self.timeout = timeout

    def health(self):
        """None when healthy, else one line saying why not."""
        import requests  # start-up: requests loads only when a deploy talks to the registry

        try:
            r = requests.get(f"{self.base}/health", verify=self.ca, timeout=self.timeout)
        except requests.exceptions.SSLError as exc:
            return f"TLS check against the cluster CA failed ({type(exc).__name__})"
        except requests.exceptions.ConnectionError as exc:
            text = str(exc)
            reason = "connection refused" if "refused" in text.lower() else (
                "timed out" if "timed out" in text.lower() else "cannot connect")
            return reason
        except requests.exceptions.Timeout:
            return "timed out"
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        return None

    def slurm_states(self):
        """{hostname: slurm_state} from ``GET /nodes`` (admin)."""
        import requests  # start-up: requests loads only when a deploy talks to the registry

        try:
            password = self.admin_file.read_text().strip()
        except OSError as exc:
            raise DeployError(f"{self.admin_file}: cannot read the admin password ({exc.strerror})") from None
        try:
            r = requests.get(f"{self.base}/nodes", verify=self.ca, timeout=self.timeout, auth=("admin", password))
        except requests.exceptions.RequestException:
            return None
        if r.status_code == 401:
            raise DeployError("the registry refused the admin password of this cluster directory "
                              "(secrets/admin-password): is it the same cluster?")
        if r.status_code != 200:
            return None
        return {n.get("hostname"): n.get("slurm_state") for n in r.json()}
