"""The one place deploy's steps meet ssh: ``pibake.connect``'s ssh connector on a ClusterShell task (OpenSSH
underneath, at most ``parallel`` sessions at once). Each host gets one ssh session, ``remote/session.py``: it
prints the host's facts (the connect step), then the runner sends each next step down the same session as soon
as the previous one's result line arrives, and records every host's result (step, status, timings, changes,
error) as it goes. A host's session ends when the host waits (idle, the registry's /health), is ready, or
failed. What to run comes from ``steps.py``."""

import logging
import time

from ClusterShell.Event import EventHandler
from ClusterShell.Task import task_self

from pibake.connect import SshConnector
from pibake.deploy import steps
from pibake.deploy.facts import END, RESULT, parse_step_result, session_command, step_request
from pibake.deploy.results import final_status

LOG = logging.getLogger(__name__)

STEP_GRACE_S = 30  # the session kills a step at its timeout and says so; deploy gives up this much later


class HostSession(EventHandler):
    """A host's ssh session: ClusterShell's events for it, and the step it is running (None between steps)."""

    def __init__(self, host, runner):
        super().__init__()
        self.host = host
        self.runner = runner
        self.worker = None
        self.step = None  # the running steps.Command
        self.out = []  # stdout lines of the running step (the facts, or anything not a result line)
        self.err = []
        self.rc = None
        self.killed = False  # its step outran the deadline: deploy aborted the session
        self.timer = None
        self.open = True  # False once deploy closed its stdin (the session then ends)
        self.started = False  # ssh runs (a session may first wait for a fan-out slot)

    def begin(self, command):
        """Run ``command`` in this session."""
        if command.facts is None:
            self.worker.write(step_request(command.shell, command.stdin, command.timeout))
        self.step = command
        self.out = []
        if self.started:  # else the deadline counts from ssh's start (ev_start)
            self._arm()

    def close(self):
        """End the session: the program on the host exits once its stdin ends. A step still running there (the
        host failed meanwhile) no longer counts."""
        self._disarm()
        self.step = None
        if self.open:
            self.open = False
            self.worker.set_write_eof()

    def _arm(self):
        self._disarm()
        deadline = self.step.timeout + STEP_GRACE_S + self.runner.connector.connect_timeout
        self.timer = self.runner.task.timer(deadline, self, autoclose=True)

    def _disarm(self):
        if self.timer is not None:
            self.timer.invalidate()
            self.timer = None

    def _finish(self, outcome):
        self._disarm()
        self.step = None
        self.out = []
        self.runner.step_finished(self, outcome)

    def ev_start(self, worker):
        self.started = True
        if self.step is not None:
            self._arm()

    def ev_read(self, worker, node, sname, msg):
        line = msg.decode("utf-8", "replace")
        if sname == "stderr":
            self.err.append(line)
        elif line == END:
            if self.step is not None and self.step.facts is not None:
                self._finish(steps.Outcome(0, _text(self.out + [line]), _text(self.err)))
            else:
                self.out = []  # a later session's: no facts before it
        elif line.startswith(RESULT) and self.step is not None and self.step.facts is None:
            try:
                rc, out, err, timedout = parse_step_result(line)
            except ValueError:
                self.out.append(line)
                return
            self._finish(steps.Outcome(rc, out, err, timedout))
        else:
            self.out.append(line)

    def ev_hup(self, worker, node, rc):
        self.rc = rc

    def ev_timer(self, timer):
        if self.step is not None and timer is self.timer:
            LOG.info("deploy: %s: %s did not answer within its deadline; closing its ssh session",
                     self.host.result.host, self.step.step)
            self.killed = True
            self.worker.abort()

    def ev_close(self, worker, timedout):
        # ``timedout`` is ClusterShell's own timeout, which a session has none of: its deadline is ``killed``
        self.open = False
        self.runner.session_ended(self)
        if self.step is not None:  # the session ended in the middle of a step: the step's outcome is how
            self._finish(steps.Outcome(None if self.killed else self.rc, _text(self.out), _text(self.err),
                                       self.killed))


def _text(lines):
    """Lines as one text, each ending in a newline (as the program printed them)."""
    return "".join(f"{ln}\n" for ln in lines)


class Runner:
    """Runs hosts' steps over ssh; ``progress`` gets a host's result dict whenever its step or status changes."""

    def __init__(self, inputs, *, parallel, ssh, progress=None):
        """``ssh``: a ``pibake.ssh.SshOptions``, the one description of how to reach the hosts."""
        self.inputs = inputs
        self.progress = progress
        self.connector = SshConnector(options=ssh)
        self.task = task_self()
        self.connector.prepare(self.task, parallel)
        self.sessions = {}  # host name -> its open HostSession

    def run(self, hosts, step="connect"):
        """Take ``hosts`` from ``step`` on until none has a step left to run (workers then wait in ``idle``,
        the manager for its registry's /health or in ``ready``)."""
        for host in hosts:
            host.started = host.started or time.monotonic()
            self._guarded(host, self._start, host, step)
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
        self._close(host)

    def step_finished(self, session, outcome):
        """A step's outcome arrived (its result line, the facts, or the session's end)."""
        self._guarded(session.host, self._advance, session.host, outcome)

    def session_ended(self, session):
        if self.sessions.get(session.host.result.host) is session:
            del self.sessions[session.host.result.host]

    def _guarded(self, host, fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001  a bug must not hang the other hosts
            LOG.exception("deploy: %s: internal error", host.result.host)
            self.fail(host, f"internal error: {exc}")

    def _start(self, host, step):
        command = steps.next_command(host, step, self.inputs)
        steps.started(host, command)
        host.step_started = time.monotonic()
        self.note(host, step=command.step, status="running")
        name = host.result.host
        session = self.sessions.get(name)
        if session is None:  # the facts come first in a host's first session; a later one (the agent again) has none
            session = self.sessions[name] = HostSession(host, self)
            shell = steps.remote(session_command(command.facts), self.inputs.user)
            session.worker = self.connector.start(self.task, name, shell, handler=session, timeout=None,
                                                  keep_stdin_open=True)
        elif command.facts is not None:
            raise RuntimeError("the facts are read only at the start of a session")
        session.begin(command)

    def _close(self, host):
        session = self.sessions.pop(host.result.host, None)
        if session is not None:
            session.close()

    def _advance(self, host, outcome):
        step = host.step
        host.result.timings[step] = host.result.timings.get(step, 0.0) + time.monotonic() - host.step_started
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
            return
        self._close(host)
