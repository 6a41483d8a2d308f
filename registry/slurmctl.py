"""Put a generated slurm.conf in force on the manager.

Slurm 22.05 must restart slurmctld to add or remove nodes; from 23.11 ``scontrol reconfigure`` does it in
place (the version comes from ``slurmctld -V``). After a restart the reconfigure is deferred by
``reconfigure_grace`` and sent once per burst (a slurmd that has not registered yet crashes on it); slurmctld
is started only once munged answers (``munge_wait``); applies are serialized (thread lock + flock) and a burst
of enrolments shares one restart (``coalesce_window``). The start modes and the reasons in detail:
docs/internals.md#putting-slurmconf-in-force-pibakeregistryslurmctl.
"""

import contextlib
import logging
import os
import pwd
import signal
import socket
import threading
import time
from pathlib import Path

from pibake.errors import ApplyError, CommandError, PibakeError
from pibake.files import atomic_write
from pibake.locks import file_lock
from pibake.registry.slurmconf import nodes_section, parse_slurm_version
from pibake.run import run, which

LOG = logging.getLogger(__name__)

MODES = ("auto", "systemd", "service", "direct", "none")
DEFAULT_CONF = "/etc/slurm/slurm.conf"
# slurmd retries a registration that did not reach slurmctld once a second: after this long with slurmctld up,
# every slurmd started during a restart has registered and a reconfigure cannot crash it (see module docstring)
RECONFIGURE_GRACE_S = 1.5
DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"
# how long a slurmctld start waits for munged (the manager's agent starts it right after its own enrolment)
MUNGE_WAIT_S = 30.0
# From this Slurm version on, `scontrol reconfigure` restarts slurmctld in place and so adds/removes nodes
RECONFIGURE_ADDS_NODES = (23, 11, 0)


def conf_settings(conf_text):
    """{key: value} of the plain ``Key=Value`` lines of a slurm.conf (NodeName/PartitionName excluded)."""
    settings = {}
    for line in (conf_text or "").splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" not in line or line.startswith(("NodeName=", "PartitionName=")):
            continue
        key, value = line.split("=", 1)
        settings[key.strip()] = value.strip()
    return settings


_THREAD_LOCK = threading.Lock()
_PENDING_LOCK = threading.Lock()
_PENDING = {}  # conf path -> the thread that sends the deferred reconfigure


class SlurmApplier:
    """Writes slurm.conf at ``conf_path`` and makes slurmctld take it (see module docstring)."""

    def __init__(self, conf_path=DEFAULT_CONF, mode="auto", *, timeout=60, coalesce_window=0.3,
                 reconfigure_grace=RECONFIGURE_GRACE_S, munge_wait=MUNGE_WAIT_S):
        if mode not in MODES:
            raise PibakeError(f"unknown slurm apply mode {mode!r}; choose one of {', '.join(MODES)}")
        self.conf_path = Path(conf_path)
        self.mode = mode
        self.timeout = timeout
        self.coalesce_window = float(coalesce_window)
        self.reconfigure_grace = float(reconfigure_grace)
        self.munge_wait = float(munge_wait)
        self.counters = {}
        self._version = None

    # ------------------------------------------------------------------ helpers
    @property
    def env(self):
        """Environment for Slurm commands: SLURM_CONF points at our file when it is not the default."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def slurm_version(self):
        """The installed slurmctld's version, ``(major, minor, micro)``, from ``slurmctld -V`` (read once);
        None when slurmctld is not installed or says something else."""
        if self._version is None:
            version = None
            if which("slurmctld"):
                try:
                    proc = run(["slurmctld", "-V"], timeout=15, check=False)
                    version = parse_slurm_version(proc.stdout + proc.stderr)
                except CommandError:
                    version = None
            self._version = version or ()
        return self._version or None

    def reconfigure_adds_nodes(self):
        """True when this Slurm takes NodeName changes by ``scontrol reconfigure`` (23.11 on)."""
        version = self.slurm_version()
        return version is not None and version >= RECONFIGURE_ADDS_NODES

    def resolved_mode(self):
        if self.mode != "auto":
            return self.mode
        if Path("/run/systemd/system").is_dir() and which("systemctl"):
            return "systemd"
        return "direct"

    @contextlib.contextmanager
    def locked(self):
        """Serialize applies across threads and processes."""
        lock_path = self.conf_path.with_name(self.conf_path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(lock_path, thread_lock=_THREAD_LOCK):
            yield

    def current_text(self):
        try:
            return self.conf_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ apply
    def apply(self, text, on_applied=None):
        """Make ``text`` (or what the callable ``text()`` returns, under the lock) the slurm.conf in force.

        A callable may return None: nothing to do (``action`` ``coalesced``). ``on_applied()`` runs under
        the lock after success. Returns what was done: a dict with ``action``.

        ``action`` is ``unchanged`` (same text, slurmctld already up or no nodes), ``written`` (mode none),
        ``reconfigured`` or ``restarted``. Raises ApplyError when slurmctld does not take it.
        """
        with self.locked():
            if callable(text):  # generated under the lock, so concurrent callers coalesce
                make, text = text, text()
                if text is None:
                    self._count("coalesced")
                    return {"action": "coalesced", "conf": str(self.conf_path)}
                if self.coalesce_window > 0 and self.mode != "none" and self._needs_restart(text):
                    # a restart (or, from 23.11, a reconfigure, which restarts slurmctld in place) is
                    # coming: let the rest of a burst of enrolments join it
                    time.sleep(self.coalesce_window)
                    text = make()
                    if text is None:  # cannot happen for one caller's change, kept for safety
                        self._count("coalesced")
                        return {"action": "coalesced", "conf": str(self.conf_path)}
            result = self._apply_locked(text)
            self._count(result["action"])
            if on_applied:
                on_applied()
            return result

    def _count(self, action):
        self.counters[action] = self.counters.get(action, 0) + 1

    def _needs_restart(self, text):
        old = self.current_text()
        return bool(nodes_section(text)) and (old is None or nodes_section(old) != nodes_section(text))

    def _apply_locked(self, text):
        old = self.current_text()
        has_nodes = bool(nodes_section(text))
        if self.mode == "none":
            if old != text:
                atomic_write(self.conf_path, text, make_parents=True)
                return {"action": "written", "conf": str(self.conf_path)}
            return {"action": "unchanged", "conf": str(self.conf_path)}
        running = self.slurmctld_up() if has_nodes or old else False
        if old == text and (running or not has_nodes):
            return {"action": "unchanged", "conf": str(self.conf_path)}
        atomic_write(self.conf_path, text, make_parents=True)
        if not has_nodes:
            LOG.info("slurm.conf written with no nodes; slurmctld waits for the first worker")
            if running:
                self._stop()
            return {"action": "written", "conf": str(self.conf_path)}
        self._prepare_dirs(text)
        if running and old is not None and nodes_section(old) == nodes_section(text):
            self._reconfigure()
            LOG.info("slurm.conf changed (settings only): scontrol reconfigure done")
            return {"action": "reconfigured", "conf": str(self.conf_path)}
        if running and old is not None and self.reconfigure_adds_nodes():
            self._reconfigure()
            self._wait_up()
            LOG.info("slurm.conf with %d node line(s) in force (scontrol reconfigure)", len(nodes_section(text)))
            return {"action": "reconfigured", "conf": str(self.conf_path)}
        if not running:
            self._wait_for_munge(text)
        self._restart(running)
        self._wait_up()
        if old is None or not nodes_section(old):
            # the first nodes: no slurmd can hold an older node list, so there is nothing for a reconfigure to
            # push (on 23.11+ it would restart slurmctld once more, and every node shows `unknown` until it
            # registers again)
            LOG.info("slurm.conf with %d node line(s) in force (slurmctld started)", len(nodes_section(text)))
            return {"action": "restarted", "conf": str(self.conf_path)}
        _touch(self._marker("restarted"))
        if self.reconfigure_grace > 0:
            self._schedule_reconfigure()
        else:
            self._reconfigure()
        LOG.info("slurm.conf with %d node line(s) in force (slurmctld restarted)", len(nodes_section(text)))
        return {"action": "restarted", "conf": str(self.conf_path)}

    # ------------------------------------------------------------------ the reconfigure after a restart
    def _marker(self, what):
        return marker_path(self.conf_path, what)

    def _schedule_reconfigure(self):
        key = str(self.conf_path)
        with _PENDING_LOCK:
            thread = _PENDING.get(key)
            if thread is not None and thread.is_alive():
                return  # it waits for the grace after the latest restart (read from the marker file)
            thread = threading.Thread(target=self._deferred_reconfigure, name="pibake-slurm-reconfigure",
                                      daemon=True)
            _PENDING[key] = thread
            thread.start()

    def _deferred_reconfigure(self):
        """Wait until slurmctld has been up ``reconfigure_grace`` s since the latest restart (by any process),
        then ``scontrol reconfigure`` once, unless another process did it since that restart."""
        try:
            while True:
                if not self.conf_path.exists():
                    return  # the conf went away (a test's sandbox, an uninstall): nothing to reconfigure
                wait = _mtime(self._marker("restarted")) + self.reconfigure_grace - time.time()
                if wait > 0:
                    time.sleep(min(wait, self.reconfigure_grace))
                    continue
                with self.locked():
                    restarted = _mtime(self._marker("restarted"))
                    if restarted + self.reconfigure_grace > time.time():
                        continue  # restarted again meanwhile
                    if reconfigure_pending(restarted, _mtime(self._marker("reconfigured"))) and self.slurmctld_up():
                        self._reconfigure()
                        self._count("reconfigured_after_restart")
                        LOG.info("scontrol reconfigure sent %.1f s after the last restart",
                                 time.time() - restarted)
                    _touch(self._marker("reconfigured"))
                    return
        except Exception:  # noqa: BLE001  a background thread: log it, the next restart schedules again
            LOG.exception("deferred scontrol reconfigure failed")

    def flush(self, timeout=None):
        """Wait for a deferred reconfigure of this conf to be sent (tests; callers about to exit)."""
        with _PENDING_LOCK:
            thread = _PENDING.get(str(self.conf_path))
        if thread is not None:
            thread.join(timeout if timeout is not None else self.reconfigure_grace + self.timeout * 2)

    # ------------------------------------------------------------------ slurmctld control
    def slurmctld_up(self):
        """True when ``scontrol ping`` reports the primary controller UP.

        A TCP connect to SlurmctldHost:SlurmctldPort comes first: when nothing listens there (slurmctld
        stopped, or starting: ``_wait_up`` polls every 0.1 s after a restart) the answer is False without
        starting a process (scontrol costs the manager ~10 ms of CPU per run). When something listens,
        ``scontrol ping`` still decides: the callers choose between "unchanged", reconfigure and restart
        from this answer, and only the ping shows that the controller answers RPCs with this cluster's
        munge key (a slurmctld that cannot authenticate is restarted, as before)."""
        text = self.current_text()
        if not which("scontrol") or text is None or not controller_listening(text):
            return False
        try:
            proc = run(["scontrol", "ping"], timeout=15, check=False, env=self.env)
        except CommandError:
            return False
        return proc.returncode == 0 and " is UP" in proc.stdout

    def _pid(self):
        pid_file = conf_settings(self.current_text()).get("SlurmctldPidFile", "/run/slurmctld.pid")
        try:
            pid = int(Path(pid_file).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid > 0 and pid_alive(pid) else None

    def _prepare_dirs(self, text):
        """StateSaveLocation and log dirs must exist and belong to SlurmUser (Debian does not create them)."""
        settings = conf_settings(text)
        user = settings.get("SlurmUser", "slurm")
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise ApplyError(f"SlurmUser {user} does not exist on this machine; install slurmctld") from None
        dirs = [settings.get("StateSaveLocation", "/var/spool/slurmctld")]
        for key in ("SlurmctldLogFile", "SlurmctldPidFile"):
            if settings.get(key):
                dirs.append(str(Path(settings[key]).parent))
        for d in dirs:
            path = Path(d)
            if not path.exists():
                path.mkdir(parents=True, mode=0o755)
                os.chown(path, pw.pw_uid, pw.pw_gid)
        state = Path(settings.get("StateSaveLocation", "/var/spool/slurmctld"))
        if state.stat().st_uid != pw.pw_uid:
            os.chown(state, pw.pw_uid, pw.pw_gid)

    def _wait_for_munge(self, text):
        """Wait until munged answers on the socket slurmctld will use; ApplyError when it does not in time."""
        socket_path = munge_socket(text)
        deadline = time.monotonic() + self.munge_wait
        while not munge_listening(socket_path):
            if time.monotonic() >= deadline:
                self._count("munge_not_ready")
                raise ApplyError(f"munge is not running on the manager (nothing answers on {socket_path}); "
                                 "slurmctld cannot start without it. The manager's agent starts munge once "
                                 "it has the munge key: retry in a moment, or check `systemctl status munge`")
            time.sleep(0.2)

    def _restart(self, running):
        mode = self.resolved_mode()
        LOG.info("restarting slurmctld (%s)", mode)
        try:
            if mode == "systemd":
                run(["systemctl", "restart", "slurmctld"], timeout=self.timeout)
            elif mode == "service":
                run(["service", "slurmctld", "restart"], timeout=self.timeout)
            else:
                if running or self._pid():
                    self._stop()
                run(["slurmctld", "-f", str(self.conf_path)], timeout=self.timeout, env=self.env)
        except CommandError as exc:
            raise ApplyError(f"could not restart slurmctld ({mode}): {exc}") from None

    def _stop(self):
        mode = self.resolved_mode()
        if mode == "systemd":
            run(["systemctl", "stop", "slurmctld"], timeout=self.timeout, check=False)
            return
        if mode == "service":
            run(["service", "slurmctld", "stop"], timeout=self.timeout, check=False)
            return
        pid = self._pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.02)
        raise ApplyError(f"slurmctld (pid {pid}) did not stop within {self.timeout} s")

    def _wait_up(self):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.slurmctld_up():
                return
            time.sleep(0.1)
        log = conf_settings(self.current_text()).get("SlurmctldLogFile", "its log")
        raise ApplyError(f"slurmctld did not come up within {self.timeout} s with the new slurm.conf; see {log}")

    def _reconfigure(self):
        try:
            run(["scontrol", "reconfigure"], timeout=self.timeout, env=self.env)
        except CommandError as exc:
            raise ApplyError(f"scontrol reconfigure failed: {exc}") from None


def marker_path(conf_path, what):
    """The file whose mtime records the latest ``what`` ("restarted", "reconfigured") of ``conf_path``: the
    deferred reconfigure is shared by every process of the registry, and read by ``pibake lab``'s wait."""
    conf = Path(conf_path)
    return conf.with_name(f"{conf.name}.{what}")


def reconfigure_pending(restarted_mtime, reconfigured_mtime):
    """True while a restart's deferred ``scontrol reconfigure`` has not been sent (pure: the two markers'
    mtimes, 0 for a missing one). Until it is sent, nodes that are idle will show ``unknown`` once more."""
    return reconfigured_mtime < restarted_mtime


def _touch(path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8"):
        pass
    os.utime(path)


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def munge_socket(conf_text):
    """The munged socket slurm.conf's ``AuthInfo=socket=PATH`` names, else Debian's default."""
    for part in conf_settings(conf_text).get("AuthInfo", "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "socket" and value:
            return value
    return DEFAULT_MUNGE_SOCKET


def munge_listening(path):
    """True when something accepts connections on the unix socket ``path`` (munged, once it is ready)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def pid_alive(pid):
    """True while /proc/<pid> exists and is not a zombie (an exited daemon nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state not in (["Z"], ["X"])


def slurm_states(conf_path=DEFAULT_CONF, *, timeout=5):
    """{node name: state} from ``sinfo -N -h -o '%N %T'``, or None when Slurm is absent or not answering."""
    conf_path = Path(conf_path)
    if not which("sinfo") or not conf_path.exists():
        return None
    if not controller_listening(conf_path.read_text(encoding="utf-8", errors="replace")):
        return None  # sinfo would spend seconds retrying a controller that is not there
    env = dict(os.environ)
    env["SLURM_CONF"] = str(conf_path)
    try:
        proc = run(["sinfo", "-N", "-h", "-o", "%N %T"], timeout=timeout, check=False, env=env)
    except CommandError:
        return None
    if proc.returncode != 0:
        return None
    return parse_sinfo(proc.stdout)


def controller_listening(conf_text, timeout=0.5):
    """True when something accepts TCP connections at SlurmctldHost's address and SlurmctldPort."""
    settings = conf_settings(conf_text)
    host = settings.get("SlurmctldHost", "")
    addr = host.split("(", 1)[1].rstrip(")") if "(" in host else host
    port = int(settings.get("SlurmctldPort", "6817").split("-")[0])
    if not addr:
        return False
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def parse_sinfo(text):
    """Parse ``sinfo -N -h -o '%N %T'`` output. A node in several partitions appears once."""
    states = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states.setdefault(parts[0], parts[1])
    return states
