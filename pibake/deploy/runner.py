"""The one place deploy's steps meet ssh: a ClusterShell task (OpenSSH underneath, at most ``parallel``
sessions at once) that starts each host's next command as soon as its previous one ends, and records every
host's result (step, status, timings, changes, error) as it goes. What to run comes from ``steps.py``."""

import logging
import time

from ClusterShell.Event import EventHandler
from ClusterShell.Task import task_self

from pibake.deploy import steps
from pibake.deploy.results import final_status

LOG = logging.getLogger(__name__)


class _Session:
    """The output of one host's running command."""

    def __init__(self, host):
        self.host = host
        self.out = []
        self.err = []
        self.rc = None


class _Events(EventHandler):
    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def ev_read(self, worker, node, sname, msg):
        session = self.runner.sessions[worker]
        (session.err if sname == "stderr" else session.out).append(msg)

    def ev_hup(self, worker, node, rc):
        self.runner.sessions[worker].rc = rc

    def ev_close(self, worker, timedout):
        self.runner.closed(self.runner.sessions.pop(worker), timedout)


class Runner:
    """Runs hosts' steps over ssh; ``progress`` gets a host's result dict whenever its step or status changes."""

    def __init__(self, inputs, *, parallel, ssh, progress=None):
        """``ssh``: a ``pibake.ssh.SshOptions``, the one description of how to reach the hosts."""
        self.inputs = inputs
        self.progress = progress
        self.task = task_self()
        self.task.set_info("fanout", max(1, int(parallel)))
        for key, value in ssh.clustershell_info().items():
            self.task.set_info(key, value)
        self.task.set_default("stderr", True)
        self.sessions = {}
        self.events = _Events(self)

    def run(self, hosts, step="connect"):
        """Take ``hosts`` from ``step`` on until none has an ssh session left (workers then wait in ``idle``,
        the manager for its registry's /health or in ``ready``)."""
        for host in hosts:
            host.started = host.started or time.monotonic()
            self._start(host, step)
        self.task.resume()

    def note(self, host, step=None, status=None):
        """Record a host's step/status and tell ``progress``."""
        r = host.result
        if step:
            r.step = step
        if status:
            r.status = status
        r.duration_s = time.monotonic() - host.started
        if self.progress:
            try:
                self.progress(r.to_dict())
            except Exception:  # noqa: BLE001  a broken progress callback must not stop the deploy
                LOG.exception("deploy: progress callback failed")

    def fail(self, host, error):
        host.result.error = error
        LOG.info("deploy: %s failed at %s: %s", host.result.host, host.result.step, error)
        self.note(host, status="failed")

    def _start(self, host, step):
        command = steps.next_command(host, step, self.inputs)
        steps.started(host, command)
        host.step_started = time.monotonic()
        self.note(host, step=command.step, status="running")
        worker = self.task.shell(steps.remote(command.shell, self.inputs.user), nodes=host.result.host,
                                 handler=self.events, timeout=command.timeout, stdin=command.stdin is not None,
                                 stderr=True)
        self.sessions[worker] = _Session(host)
        if command.stdin is not None:
            worker.write(command.stdin)
            worker.set_write_eof()

    def closed(self, session, timedout):
        host = session.host
        try:
            self._advance(host, session, timedout)
        except Exception as exc:  # noqa: BLE001  a bug must not hang the other hosts
            LOG.exception("deploy: %s: internal error", host.result.host)
            self.fail(host, f"internal error: {exc}")

    def _advance(self, host, session, timedout):
        step = host.step
        host.result.timings[step] = host.result.timings.get(step, 0.0) + time.monotonic() - host.step_started
        outcome = steps.Outcome(rc=session.rc, out=b"\n".join(session.out).decode("utf-8", "replace"),
                                err=b"\n".join(session.err).decode("utf-8", "replace"), timedout=timedout)
        try:
            following = steps.step_done(host, outcome, self.inputs)
        except steps.StepFailed as exc:
            self.fail(host, str(exc))
            return
        if following == steps.READY:
            self.note(host, step=steps.READY, status=final_status(host.result))
        elif following == steps.WAIT_IDLE:
            host.result.step = steps.WAIT_IDLE
            host.step_started = time.monotonic()
            self.note(host, step=steps.WAIT_IDLE, status="running")
        elif following == steps.WAIT_HEALTH:
            host.step_started = time.monotonic()  # deploy now waits for /health (timed as "registry")
        else:
            self._start(host, following)
