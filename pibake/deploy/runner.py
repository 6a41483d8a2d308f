"""The one place deploy's steps meet ssh: ``pibake.connect``'s ssh connector on a ClusterShell task (OpenSSH
underneath, at most ``parallel`` sessions at once) that starts each host's next command as soon as its
previous one ends, and records every host's result (step, status, timings, changes, error) as it goes. What
to run comes from ``steps.py``."""

import logging
import time

from ClusterShell.Task import task_self

from pibake.connect import Session, SshConnector
from pibake.deploy import steps
from pibake.deploy.results import final_status

LOG = logging.getLogger(__name__)


class Runner:
    """Runs hosts' steps over ssh; ``progress`` gets a host's result dict whenever its step or status changes."""

    def __init__(self, inputs, *, parallel, ssh, progress=None):
        """``ssh``: a ``pibake.ssh.SshOptions``, the one description of how to reach the hosts."""
        self.inputs = inputs
        self.progress = progress
        self.connector = SshConnector(options=ssh)
        self.task = task_self()
        self.connector.prepare(self.task, parallel)

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
        self.connector.start(self.task, host.result.host, steps.remote(command.shell, self.inputs.user),
                             handler=Session(host, host.result.host, self.closed), timeout=command.timeout,
                             stdin=command.stdin)

    def closed(self, session, timedout):
        host = session.key
        try:
            self._advance(host, session, timedout)
        except Exception as exc:  # noqa: BLE001  a bug must not hang the other hosts
            LOG.exception("deploy: %s: internal error", host.result.host)
            self.fail(host, f"internal error: {exc}")

    def _advance(self, host, session, timedout):
        step = host.step
        host.result.timings[step] = host.result.timings.get(step, 0.0) + time.monotonic() - host.step_started
        outcome = steps.Outcome(rc=session.rc, out=session.text("stdout"), err=session.text("stderr"),
                                timedout=timedout)
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
