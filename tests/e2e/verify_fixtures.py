"""Fixtures for the verify/REST end-to-end tests, on top of tests/e2e/conftest.py (issue 3's lab cluster).

``healthy_cluster``: the manager (munge, registry under gunicorn+TLS, slurmctld) and three workers w1-w3 that
enrolled through the first-boot agent and are idle; each worker also runs sshd (as a Pi does) accepting a key
made for the test, so verify reaches the nodes over real ssh from the manager, where the tests run
``pibake verify`` and where the registry runs its REST jobs.

Clock skew (``skew_clock``): lab hosts share the kernel clock, so a host's clock is moved with libfaketime
(Debian package faketime) inside that host only: its munged is restarted under ``LD_PRELOAD=libfaketime
FAKETIME=+600s`` (so every credential it encodes carries a time 10 minutes ahead, and it judges others'
credentials by that clock: munge itself sees the skew) and its sshd sets the same two variables for every
session (``SetEnv``), so every command verify runs there (``date`` included) sees the same clock.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import skip_reason
from tests.fixtures_plugin import make_ssh_key
from tests.test_docs import keys_of  # noqa: F401  (re-exported for the e2e modules)

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
WORKERS = ("w1", "w2", "w3")
SSHD_CONF = "/etc/ssh/sshd_config.d/pibake-lab.conf"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def sshd_config(host, extra=""):
    return (f"ListenAddress {host.ip}\nAuthorizedKeysFile /etc/ssh/lab_authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
            f"PidFile /run/sshd.pid\n{extra}")


def start_sshd(host, public_key, extra=""):
    """sshd in ``host`` with its own host keys, accepting ``public_key`` for root."""
    host.run(["ssh-keygen", "-A"], timeout=60)
    keys = host.path("/etc/ssh/lab_authorized_keys")
    keys.write_text(public_key)
    keys.chmod(0o600)
    host.path(SSHD_CONF).write_text(sshd_config(host, extra))
    host.run(["/usr/sbin/sshd"], timeout=30)


def restart_sshd(host, public_key, extra=""):
    host.run(["sh", "-c", "kill $(cat /run/sshd.pid)"], check=False)
    for _ in range(50):
        if host.run(["test", "-e", "/run/sshd.pid"], check=False).returncode != 0:
            break
        host.run(["sleep", "0.1"])
    start_sshd(host, public_key, extra)


class VerifyLab:
    """The lab cluster plus what verify needs: an ssh key, known_hosts, and helpers to run the CLI."""

    def __init__(self, cluster, tmp):
        self.c = cluster
        self.tmp = Path(tmp)
        self.key = make_ssh_key(self.tmp, "pibake-e2e")
        self.public_key = self.key.with_suffix(".pub").read_text()
        self.known_hosts = self.tmp / "known_hosts"

    @property
    def ssh_options(self):
        return {"user": "root", "identity": str(self.key), "known_hosts": str(self.known_hosts)}

    def cli(self, *args, timeout=400, cwd="/"):
        """``pibake --cluster DIR *args`` run on the manager host: (exit code, stdout, stderr)."""
        proc = self.c.mgr.run([sys.executable, "-m", "pibake", "--cluster", str(self.c.cluster_dir), *args],
                              check=False, timeout=timeout, cwd=cwd)
        return proc.returncode, proc.stdout, proc.stderr

    @property
    def ssh_args(self):
        return ["--user", "root", "-i", str(self.key), "--known-hosts", str(self.known_hosts)]

    def verify(self, *args):
        """``pibake verify --json`` over ssh as root with the test key: (exit code, JSON, stderr)."""
        code, out, err = self.cli("verify", "--json", "--user", "root", "-i", str(self.key), "--known-hosts",
                                  str(self.known_hosts), *args)
        try:
            data = json.loads(out)
        except ValueError:
            raise AssertionError(f"verify printed no JSON (exit {code}): {err}\n{self.c.diagnostics()}") from None
        return code, data, err

    def skew_clock(self, name, offset="+600s"):
        """Move ``name``'s clock (munged and every ssh session) by ``offset`` with libfaketime."""
        host = self.c.hosts[name]
        env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset}
        self._restart_munge(host, env)
        restart_sshd(host, self.public_key, f"SetEnv LD_PRELOAD={LIBFAKETIME} FAKETIME={offset}\n")

    def restore_clock(self, name):
        host = self.c.hosts[name]
        self._restart_munge(host, {})
        restart_sshd(host, self.public_key)

    @staticmethod
    def _restart_munge(host, env):
        host.run(["sh", "-c", "pkill -x munged; for i in $(seq 50); do pgrep -x munged >/dev/null || exit 0; "
                              "sleep 0.1; done; exit 1"], timeout=30)
        host.run(["runuser", "-u", "munge", "--", "env", *[f"{k}={v}" for k, v in env.items()],
                  "/usr/sbin/munged"], timeout=30)


def bring_up_workers(c, names=WORKERS, first=11):
    hosts = [c.add_worker(name, first + i) for i, name in enumerate(names)]
    procs = [h.popen(c.agent_argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in hosts]
    for host, proc in zip(hosts, procs):
        _out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{host.name}: {err}\n{c.diagnostics()}"
    c.wait_idle(list(names))
    return hosts


@pytest.fixture(scope="module")
def verify_lab(lab_cluster, tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if not Path(LIBFAKETIME).exists():
        pytest.skip(f"{LIBFAKETIME} missing (apt-get install faketime)")
    lab = VerifyLab(lab_cluster, tmp_path_factory.mktemp("verify"))
    for host in bring_up_workers(lab_cluster):
        start_sshd(host, lab.public_key)
    return lab


def normalized(report):
    """A verify JSON with what differs between two runs of the same cluster removed: times, durations,
    measured offsets (keys ending in _s) and where the report was written."""
    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()
                    if not k.endswith("_s") and k not in ("started", "finished", "report_dir")}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x
    return walk(report)


DOC_BLOCK_RE = re.compile(r"```sh\n# doc-test: ([a-z0-9-]+)\n(.*?)```(?:\s*```json\n(.*?)```)?", re.S)
EXITS_RE = re.compile(r"\s+#\s*exits (\d+)\s*$")


def doc_blocks(page, parse=True):
    """{name: (script text, [(argv, expected exit code)], json sample or None)} of a page's doc-test blocks
    (``parse=False``: scripts only, for pages whose blocks are shell scripts rather than one command a line)."""
    blocks = {}
    for name, body, sample in DOC_BLOCK_RE.findall((DOCS / page).read_text()):
        commands = []
        for line in body.splitlines() if parse else ():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = EXITS_RE.search(line)
            commands.append((shlex.split(line[:m.start()] if m else line), int(m.group(1)) if m else 0))
        blocks[name] = (body, commands, json.loads(sample) if sample else None)
    return blocks
