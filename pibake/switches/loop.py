"""The manager's two switch loops, ``auto`` (the automatic recovery policy) and ``rules`` (sensor -> switch
rules): one round every ``interval`` seconds, for as long as the process lives.

On the manager they run as the systemd units ``pibake-switch-auto.service`` and ``pibake-switch-rules.service``
(templates/pibake-switch.service.j2, installed and started by the manager's seed and by `pibake deploy`): the
journal keeps their output, systemd restarts them when they die. A loop holds
``<cluster>/switches/<name>.loop.lock`` for its whole life, so a second copy (a person running `pibake switch
rules` by hand on the manager, a re-deploy without systemd) says who already runs instead of deciding twice.
A round that fails with a user error (cluster.yaml edited into an invalid state, a secrets file with loose
permissions) is reported and the loop goes on: the next round reads cluster.yaml again.

SIGTERM (`systemctl stop`, a restart by deploy) lets the round in progress finish and ends the loop before
the next: killed in the middle of a recovery, a node's plug could stay off. The units give a recovery
time to finish (TimeoutStopSec).
"""

import fcntl
import logging
import os
import signal
import threading
from pathlib import Path

from pibake.errors import LoopBusy, PibakeError

LOG = logging.getLogger(__name__)

LOOPS = {"auto": "pibake-switch-auto.service", "rules": "pibake-switch-rules.service"}
SEE = {"auto": "its actions: `pibake switch log`", "rules": "its last decisions: `pibake switch rules --list`"}


def _lock_path(cluster_dir, name):
    return Path(cluster_dir) / "switches" / f"{name}.loop.lock"


def hold_loop_lock(cluster_dir, name):
    """Take the loop's lock for the life of the process; returns the open file descriptor (keep it open).

    Raises LoopBusy naming the holder's pid when another process has it."""
    path = _lock_path(cluster_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise LoopBusy(f"the {name} loop already runs on {cluster_dir} (pid {holder}; on the manager it is "
                       f"{LOOPS[name]}); {SEE[name]}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _stop_on_sigterm(stop):
    """SIGTERM sets ``stop`` instead of killing the process mid-round (main thread only: signal handlers
    cannot be set elsewhere); returns the previous handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())


def run_loop(cluster_dir, name, one_round, *, interval, once=False, on_report=None, on_error=None, rounds=None,
             stop=None):
    """Run ``one_round()`` under the loop's lock: once (returns its report), or every ``interval`` seconds
    until SIGTERM or ``stop`` (a threading.Event) is set, or after ``rounds`` rounds. ``on_report(report)``
    after each round; ``on_error(err)`` for a round's PibakeError, which ends a ``once`` run and not a loop."""
    fd = hold_loop_lock(cluster_dir, name)
    stop = stop or threading.Event()
    previous = None if once else _stop_on_sigterm(stop)
    try:
        done = 0
        while True:
            try:
                report = one_round()
            except PibakeError as err:
                if once:
                    raise
                if on_error:
                    on_error(err)
                else:
                    LOG.error("%s round failed: %s", name, err)
            else:
                if on_report:
                    on_report(report)
                if once:
                    return report
            done += 1
            if (rounds is not None and done >= rounds) or stop.wait(interval):
                return None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        os.close(fd)
