"""How verify (and bench) reach the manager and the nodes: a thin seam, nothing else.

A connector runs an argument list on a named host and returns ``Output(host, rc, stdout, stderr)``;
it never raises for a failing or unreachable host (rc 255 and the reason in stderr, as ssh does).

* ``LocalConnector``: this machine (verify running on the manager, as the registry's REST jobs do);
* ``SshConnector``: OpenSSH with the options of ``pibake.ssh`` (so ~/.ssh/config, agents and ProxyJump
  work), hosts addressed by the IP the registry recorded, many hosts in parallel;
* ``Connectors``: picks local or ssh per host.

The check logic (``pibake.verify``) is pure over the outputs, so it is tested on recorded outputs.
"""

import logging
import shlex
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pibake.errors import CommandError
from pibake.run import run
from pibake.ssh import SshOptions

LOG = logging.getLogger(__name__)

UNREACHABLE = 255


@dataclass
class Output:
    host: str
    rc: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self):
        return self.rc == 0

    def reason(self):
        lines = [ln for ln in (self.stderr or "").strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit code {self.rc}"


def _run(argv, host, input, timeout, env=None):
    """``argv``'s Output through pibake.run (the one subprocess seam); a missing program or a timeout is an
    Output too (127, 124), as a connector reports a host and does not raise."""
    try:
        proc = run(argv, timeout=timeout, check=False, input=input, env=env)
    except CommandError as exc:
        if exc.returncode == 127:
            return Output(host, 127, "", f"{argv[0]}: command not found")
        return Output(host, 124, "", f"no answer within {timeout:g} s")
    return Output(host, proc.returncode, proc.stdout, proc.stderr)


def is_local_address(ip):
    """True when ``ip`` is an address of this machine (binding to it succeeds)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
        return True
    except OSError:
        return False


class LocalConnector:
    kind = "local"

    def run(self, host, argv, *, input=None, timeout=60):
        return _run(argv, host, input, timeout)


class SshConnector:
    """``ssh`` with ``pibake.ssh.SshOptions`` (batch mode, a connect timeout, new host keys accepted and
    remembered, ssh's own messages only for errors), hosts addressed by ``addresses``."""

    kind = "ssh"

    def __init__(self, *, user=None, identity=None, known_hosts=None, connect_timeout=5, addresses=None):
        self.ssh = SshOptions(user=user, identity=identity, known_hosts=known_hosts, connect_timeout=connect_timeout,
                              host_key_check="accept-new", log_level="ERROR")
        self.connect_timeout = connect_timeout
        self.addresses = dict(addresses or {})

    def argv(self, host, argv):
        return self.ssh.argv(self.addresses.get(host, host), shlex.join([str(a) for a in argv]))

    def run(self, host, argv, *, input=None, timeout=60):
        out = _run(self.argv(host, argv), host, input, timeout + self.connect_timeout)
        if out.rc == UNREACHABLE and not out.stdout:
            LOG.info("ssh %s: %s", host, out.reason())
        return out


class Connectors:
    """Routes each host to a connector: ``local`` for the names in ``local_hosts``, else ``remote``."""

    def __init__(self, remote, local_hosts=(), local=None):
        self.remote = remote
        self.local = local or LocalConnector()
        self.local_hosts = set(local_hosts)

    def for_host(self, host):
        return self.local if host in self.local_hosts else self.remote

    def describe(self, host):
        return self.for_host(host).kind

    def run(self, host, argv, *, input=None, timeout=60):
        return self.for_host(host).run(host, argv, input=input, timeout=timeout)

    def run_many(self, hosts, argv, *, input=None, timeout=60, fanout=32):
        """{host: Output} of ``argv`` run on every host in parallel (``argv`` may be a function of the host;
        ``input`` too)."""
        hosts = list(hosts)
        if not hosts:
            return {}

        def one(host):
            a = argv(host) if callable(argv) else argv
            i = input(host) if callable(input) else input
            return self.run(host, a, input=i, timeout=timeout)
        with ThreadPoolExecutor(max_workers=min(fanout, len(hosts))) as pool:
            return dict(zip(hosts, pool.map(one, hosts)))
