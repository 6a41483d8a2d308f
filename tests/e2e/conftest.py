"""The lab cluster for the end-to-end tests: real munge, slurmctld, slurmd, the registry under gunicorn+TLS
and the first-boot agent on Debian's python3, each in its own lab host (pibake.lab.hosts).

Layout (subnet 10.77.<o>.0/24, <o> from this process id; names ``pe<pid>-*``):

    mgr  .10   munged, `pibake registry serve --bind <ip>:8443` (which writes slurm.conf, runs slurmctld)
    w1.. .11+  the agent (/usr/bin/python3 firstboot/agent.py --config /etc/pibake/agent.json)
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_plugin import lab_missing, new_cluster

FAMILY = "pe"
AGENT = Path(__file__).resolve().parents[2] / "firstboot" / "agent.py"
DEBIAN_PYTHON = "/usr/bin/python3"


def skip_reason():
    reason = lab_missing("ip", "nsenter", "unshare", "munged", "slurmctld", "slurmd", "sinfo", "srun", "scontrol")
    if reason:
        return reason + (" (apt-get install munge slurmctld slurmd slurm-client iproute2)"
                         if reason.startswith("not installed") else "")
    if not os.path.exists(DEBIAN_PYTHON):
        return "Debian's /usr/bin/python3 (the agent's interpreter on a node) is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    for item in items:
        if str(item.fspath).endswith("tests/e2e/test_enrol.py"):
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def wait_for(what, predicate, timeout=60, step=0.2):
    """Poll ``predicate`` until it returns a truthy value; fail naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class LabCluster:
    """The manager host with munge + registry (+ slurmctld once a worker enrolled), and worker factory."""

    def __init__(self, tmp, octet):
        from pibake.lab import LabNetwork, cleanup_stale, run_prefix

        cleanup_stale(FAMILY)
        self.tmp = Path(tmp)
        self.octet = octet
        self.prefix = run_prefix(FAMILY)
        self.net = LabNetwork.create(self.prefix, f"10.77.{octet}.0/24")
        self.hosts = {}
        self.manager_ip = self.ip(10)
        self.cluster_dir = self.tmp / "cluster"
        new_cluster(self.cluster_dir, manager="mgr", manager_ip=self.manager_ip,
                    network=f"10.77.{octet}.0/24", name="e2e")
        self.sdir = self.cluster_dir / "secrets"
        self.registry_log = self.tmp / "registry.log"
        self.registry = None
        self.mgr = self.add_host("mgr", 10)

    def ip(self, last):
        return f"10.77.{self.octet}.{last}"

    def add_host(self, name, last):
        from pibake.lab import LabHost

        host = LabHost.create(name, self.ip(last), network=self.net, base_dir=self.tmp / "hosts")
        self.hosts[name] = host
        return host

    # ---------------------------------------------------------------- manager
    def start_manager(self):
        key = self.mgr.path("/etc/munge/munge.key")
        key.write_bytes((self.sdir / "munge.key").read_bytes())
        self.mgr.run(["chown", "munge:munge", "/etc/munge/munge.key"])
        self.mgr.run(["chmod", "0400", "/etc/munge/munge.key"])
        self.mgr.run(["service", "munge", "start"])
        self.start_registry()

    def start_registry(self):
        log = open(self.registry_log, "ab")
        self.registry = self.mgr.popen(
            [sys.executable, "-m", "pibake", "--cluster", str(self.cluster_dir), "registry", "serve",
             "--bind", f"{self.manager_ip}:8443"], stdout=log, stderr=log)
        log.close()
        wait_for("the registry to answer /health over TLS", self._healthy, timeout=60)

    def stop_registry(self):
        """SIGTERM the registry (gunicorn master) and wait for it: the manager is 'not booted yet'."""
        self.registry.terminate()
        self.registry.wait(timeout=30)
        wait_for("the registry port to close", lambda: self.api("GET", "/health", auth=None)[0] == 0, timeout=30)

    def _healthy(self):
        if self.registry.poll() is not None:
            raise AssertionError(f"registry exited with {self.registry.returncode}: {self.registry_log.read_text()}")
        return self.api("GET", "/health", auth=None)[0] == 200

    def api(self, method, path, auth="admin", body=None):
        """(status, JSON) of a registry request made from inside the manager host, verified with the CA."""
        code = (
            "import json, sys, requests\n"
            "method, url, ca, user, pw, body = json.loads(sys.stdin.read())\n"
            "try:\n"
            "    r = requests.request(method, url, verify=ca, timeout=30, auth=(user, pw) if user else None,\n"
            "                         json=body)\n"
            "    out = [r.status_code, r.json() if r.content else None]\n"
            "except requests.exceptions.ConnectionError:\n"
            "    out = [0, None]\n"
            "print(json.dumps(out))\n"
        )
        creds = ("admin", (self.sdir / "admin-password").read_text().strip()) if auth == "admin" else (None, None)
        args = [method, f"https://{self.manager_ip}:8443/api/v1{path}", str(self.sdir / "ca.crt"), *creds, body]
        out = self.mgr.run([sys.executable, "-c", code], input=json.dumps(args), timeout=60).stdout
        status, data = json.loads(out)
        return status, data

    def slurm_states(self):
        proc = self.mgr.run(["sinfo", "-N", "-h", "-o", "%N %T"], check=False, timeout=30)
        if proc.returncode != 0:
            return {}
        return dict(line.split() for line in proc.stdout.splitlines() if line.strip())

    def wait_idle(self, names, timeout=90):
        def all_idle():
            states = self.slurm_states()
            return states if all(states.get(n) == "idle" for n in names) else None
        return wait_for(f"{', '.join(names)} idle in sinfo", all_idle, timeout=timeout, step=0.5)

    # ---------------------------------------------------------------- workers
    def token(self):
        from pibake.secrets import load_join_token

        return load_join_token(self.cluster_dir).token

    def add_worker(self, name, last, token=None, ca_crt=None, **extra):
        """A worker host with the files a seed would have put there: agent config (0600), CA, user-data."""
        host = self.add_host(name, last)
        token = self.token() if token is None else token
        host.path("/etc/pibake").chmod(0o700)
        ca = host.path("/etc/pibake/ca.crt")
        ca.write_bytes(Path(ca_crt or self.sdir / "ca.crt").read_bytes())
        config = {
            "registry_url": "https://mgr:8443", "join_token": token, "ca_cert": "/etc/pibake/ca.crt",
            "hostname": name, "role": "worker", "manager": "mgr", "manager_ip": self.manager_ip,
            "credential_file": "/etc/pibake/node-credential", "boot_dir": str(host.path("/boot/firmware")),
            # only this host's boot partition: the lab shares the machine's /var/lib/cloud and /run is per host
            "scrub_paths": [str(host.path("/boot/firmware/user-data"))],
            "deadline_s": 150, "backoff_base_s": 0.5, "backoff_max_s": 5,
        }
        config.update(extra)
        cfg = host.path("/etc/pibake/agent.json")
        cfg.write_text(json.dumps(config, indent=2))
        cfg.chmod(0o600)
        host.path("/boot/firmware/user-data").write_text(
            "#cloud-config\nwrite_files:\n  - path: /etc/pibake/agent.json\n    permissions: '0600'\n"
            f"    content: |\n      {json.dumps(config)}\nruncmd:\n  - [echo, booted]\n")
        return host

    def agent_argv(self, *extra):
        return [DEBIAN_PYTHON, "-I", str(AGENT), "--config", "/etc/pibake/agent.json", "--json", *extra]

    def run_agent(self, host, *extra, timeout=180):
        """Run the agent on ``host``: (exit code, result JSON, stderr)."""
        proc = host.run(self.agent_argv(*extra), check=False, timeout=timeout)
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            result = None
        return proc.returncode, result, proc.stderr

    def diagnostics(self):
        parts = [f"--- registry log\n{self.registry_log.read_text(errors='replace')[-6000:]}"
                 if self.registry_log.exists() else ""]
        for name, host in self.hosts.items():
            for log in ("/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log", "/var/log/munge/munged.log"):
                try:
                    text = host.path(log).read_text(errors="replace")[-3000:]
                except (OSError, Exception):  # noqa: BLE001  diagnostics only
                    continue
                parts.append(f"--- {name}:{log}\n{text}")
        return "\n".join(parts)

    def destroy(self):
        from pibake.lab import cleanup_leftovers

        if self.registry and self.registry.poll() is None:
            self.registry.terminate()
            try:
                self.registry.wait(timeout=15)
            except Exception:  # noqa: BLE001
                self.registry.kill()
        for host in self.hosts.values():
            host.destroy()
        self.net.destroy()
        cleanup_leftovers(self.prefix)


@pytest.fixture(scope="module")
def lab_cluster(tmp_path_factory, request):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("e2e")
    tmp.chmod(0o755)  # munged and slurm insist on searchable parents
    cluster = LabCluster(tmp, 20 + os.getpid() % 40)
    try:
        cluster.start_manager()
        yield cluster
    except BaseException:
        print(cluster.diagnostics(), file=sys.stderr)
        raise
    finally:
        if getattr(request.session, "testsfailed", 0):
            print(cluster.diagnostics(), file=sys.stderr)
        cluster.destroy()
