"""How pibake runs commands on the manager and the nodes: one connector, used by deploy, verify, bench and
recover. ClusterShell does the fan-out (its event engine, at most ``fanout`` sessions at once); OpenSSH
does the transport, with the options of ``pibake.ssh``.

* ``SshConnector``: ``ssh`` to a host, addressed by the IP the registry recorded when it has one;
* ``LocalConnector``: this machine (verify running on the manager, as the registry's REST jobs do);
* ``Connectors``: picks local or ssh per host and runs many commands at once (``run_each``).

Both connectors ``start`` a command as a ClusterShell worker on a task; deploy's runner drives its own
per-host state machine on such a task, everything else waits for the whole batch with ``run_each``. A
finished command is an ``Output(host, rc, stdout, stderr)``: a connector never raises for a failing or
unreachable host (rc 255 and the reason in stderr, as ssh does; 124 when it did not answer in time).

The check logic (``pibake.verify``) is pure over the outputs, so it is tested on recorded outputs.
"""

import logging
import shlex
import socket
import time
from dataclasses import dataclass

from ClusterShell.Event import EventHandler

from pibake import connect_workers
from pibake.ssh import SshOptions

LOG = logging.getLogger(__name__)

UNREACHABLE = 255
TIMED_OUT = 124


@dataclass
class Output:
    """How one command ended; ``started``/``ended``: wall-clock times around it (verify's clock check)."""

    host: str
    rc: int
    stdout: str = ""
    stderr: str = ""
    started: float | None = None
    ended: float | None = None

    @property
    def ok(self):
        return self.rc == 0

    def reason(self):
        lines = [ln for ln in (self.stderr or "").strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit code {self.rc}"


@dataclass(frozen=True)
class Job:
    """One command for ``Connectors.run_each``: ``argv`` on ``host``, ``input`` on its stdin."""

    host: str
    argv: list
    input: str | bytes | None = None


def is_local_address(ip):
    """True when ``ip`` is an address of this machine (binding to it succeeds)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
        return True
    except OSError:
        return False


def command_line(argv):
    """``argv`` as one shell command line (what ssh sends, what the local worker's shell runs)."""
    return argv if isinstance(argv, str) else shlex.join([str(a) for a in argv])


def _stdin_bytes(data):
    return data.encode() if isinstance(data, str) else data


class LocalConnector:
    """Commands on this machine, as a ClusterShell local worker (``/bin/sh -c``)."""

    kind = "local"
    connect_timeout = 0

    def prepare(self, task, fanout):
        task.set_info("fanout", max(1, int(fanout)))

    def start(self, task, host, command, *, handler, timeout, stdin=None):
        """Start ``command`` (a shell command line, run by ``/bin/sh -c``); the worker's events go to
        ``handler`` (a Session)."""
        return connect_workers.start(task, host, ["/bin/sh", "-c", command], command, handler=handler,
                                     timeout=timeout, stdin=_stdin_bytes(stdin))

    def run(self, host, argv, *, input=None, timeout=60):
        return Connectors(self, local_hosts=[host], local=self).run(host, argv, input=input, timeout=timeout)


class SshConnector:
    """``ssh`` with ``pibake.ssh.SshOptions`` (batch mode, a connect timeout, new host keys accepted and
    remembered, ssh's own messages only for errors), hosts addressed by ``addresses``. ``options``: a whole
    ``SshOptions`` instead (deploy's, with its multiplexed connections)."""

    kind = "ssh"

    def __init__(self, *, user=None, identity=None, known_hosts=None, connect_timeout=5, addresses=None,
                 options=None):
        self.ssh = options or SshOptions(user=user, identity=identity, known_hosts=known_hosts,
                                         connect_timeout=connect_timeout, host_key_check="accept-new",
                                         log_level="ERROR")
        self.connect_timeout = self.ssh.connect_timeout
        self.addresses = dict(addresses or {})
        self._head = self.ssh.head()  # ssh and its options: built once, not per session

    def address(self, host):
        return self.addresses.get(host, host)

    def argv(self, host, argv):
        """The ssh command line that runs ``argv`` on ``host`` (what the ClusterShell worker starts)."""
        return self.ssh.argv(self.address(host), command_line(argv))

    def prepare(self, task, fanout):
        """Make ``task``'s ssh workers start ``argv``'s ssh, at most ``fanout`` at once."""
        task.set_info("fanout", max(1, int(fanout)))
        for key, value in self.ssh.clustershell_info().items():
            task.set_info(key, value)

    def start(self, task, host, command, *, handler, timeout, stdin=None, keep_stdin_open=False):
        """Start ``command`` (a shell command line) on ``host``; its events go to ``handler``. ``timeout``
        counts from ssh's start, so the connect timeout is added to it (None: no timeout). With
        ``keep_stdin_open`` the caller writes to the returned worker's stdin and closes it."""
        address = self.address(host)
        return connect_workers.start(task, host, [*self._head, address, "--", command], command, handler=handler,
                                     timeout=None if timeout is None else timeout + self.connect_timeout,
                                     stdin=_stdin_bytes(stdin), remote_nodes=address, keep_stdin_open=keep_stdin_open)

    def run(self, host, argv, *, input=None, timeout=60):
        return Connectors(self).run(host, argv, input=input, timeout=timeout)


class Session(EventHandler):
    """One running command's ClusterShell event handler: collects what it says, notes when it started, and
    calls ``closed(session, timedout)`` at its end (``output()`` then turns it into an Output). ``key`` is
    the caller's name for the command."""

    def __init__(self, key, host, closed):
        super().__init__()
        self.key = key
        self.host = host
        self.closed = closed
        self.out = []
        self.err = []
        self.rc = None
        self.started = time.time()

    def ev_start(self, worker):
        self.started = time.time()

    def ev_read(self, worker, node, sname, msg):
        (self.err if sname == "stderr" else self.out).append(msg)

    def ev_hup(self, worker, node, rc):
        self.rc = rc

    def ev_close(self, worker, timedout):
        self.closed(self, timedout)

    def text(self, stream):
        lines = self.err if stream == "stderr" else self.out
        return "".join(line.decode("utf-8", "replace") + "\n" for line in lines)

    def output(self, timedout, timeout):
        ended = time.time()
        if timedout:
            return Output(self.host, TIMED_OUT, self.text("stdout"), f"no answer within {timeout:g} s",
                          self.started, ended)
        rc = UNREACHABLE if self.rc is None else self.rc
        return Output(self.host, rc, self.text("stdout"), self.text("stderr"), self.started, ended)


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
        return self.run_each({host: Job(host, argv, input)}, timeout=timeout)[host]

    def run_many(self, hosts, argv, *, input=None, timeout=60, fanout=32):
        """{host: Output} of ``argv`` run on every host at once (``argv`` and ``input`` may be functions of
        the host)."""
        jobs = {h: Job(h, argv(h) if callable(argv) else argv, input(h) if callable(input) else input)
                for h in hosts}
        return self.run_each(jobs, timeout=timeout, fanout=fanout)

    def run_each(self, jobs, *, timeout=60, fanout=32):
        """{key: Output} for ``jobs`` ({key: Job}), at most ``fanout`` running at once; several jobs may
        go to one host. Waits until every job has ended."""
        if not jobs:
            return {}
        from ClusterShell.Task import task_self  # start-up: the task engine (~20-50 ms) loads only when commands run

        task = task_self()
        outputs = {}

        def closed(session, timedout):
            outputs[session.key] = session.output(timedout, timeout)
        for connector in {self.for_host(job.host) for job in jobs.values()}:
            connector.prepare(task, fanout)
        for key, job in jobs.items():
            self.for_host(job.host).start(task, job.host, command_line(job.argv), handler=Session(key, job.host, closed),
                                          timeout=timeout, stdin=job.input)
        task.resume()
        for output in outputs.values():
            if output.rc == UNREACHABLE and not output.stdout:
                LOG.info("ssh %s: %s", output.host, output.reason())
        return outputs
