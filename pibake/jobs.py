"""Background jobs for the registry's REST API: ``POST /api/v1/deploy`` and ``POST /api/v1/verify``.

    runner = JobRunner(cluster_dir)                   # one per registry process
    job = runner.submit("verify", {"bench": False})   # {id, kind, state: queued, ...}
    runner.get(job["id"])                             # {..., state: done, result: <the CLI's --json>}

A job runs the same function the CLI runs (``pibake.verify.verify``, ``pibake.deploy.deploy``) in a small
bounded pool of daemon threads; its ``result`` is exactly what ``pibake verify --json`` / ``pibake deploy
--json`` print. Jobs are rows of a ``jobs`` table in the registry's SQLite file (``registry.db``, next to the
nodes), so every gunicorn worker answers ``GET /jobs/<id>`` and a restart shows an unfinished job as
``failed`` ("interrupted") instead of losing it: each row names the process running it, and a job whose
process is gone is marked failed by the next process that opens the table.

States: ``queued`` -> ``running`` -> ``done`` | ``failed``. ``progress`` is 0..1 with a ``message``.

How a job of the registry (``MANAGER_FUNCTIONS``) logs in to the nodes: with the cluster's manager ssh identity (``secrets/manager-ssh.key`` in the
registry's cluster directory, from the manager's seed; every node's seed authorizes it for the cluster user,
from the manager's IP only) as the cluster user, unless the request names its own: a verify job's ``identity``
or ``user``, a deploy job's ``user`` or an ``ssh_options`` entry that names an identity, a user or a config file
(``manager_identity_options``). A JobRunner made on another machine (``FUNCTIONS``) uses that machine's own
ssh login: the nodes accept the manager's key only from the manager's address.
"""

import datetime as dt
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from pibake import verify as verification  # verify() looked up per call (a test replaces it)
from pibake.cluster import load_cluster
from pibake.deploy import deploy, parse_hosts
from pibake.errors import JobError, PibakeError
from pibake.registry import schema
from pibake.secrets import manager_ssh_key_path
from pibake.switches.recover import recover_node

LOG = logging.getLogger(__name__)

DB_FILE = "registry.db"
STATES = ("queued", "running", "done", "failed")
KINDS = ("verify", "deploy", "recover")
DEFAULT_WORKERS = 2
DEFAULT_MAX_PENDING = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    progress    REAL NOT NULL DEFAULT 0,
    message     TEXT NOT NULL DEFAULT '',
    params      TEXT NOT NULL DEFAULT '{}',
    result      TEXT,
    error       TEXT,
    created     TEXT NOT NULL,
    started     TEXT,
    finished    TEXT,
    owner       TEXT NOT NULL
)
"""


def _now():
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


def _process_start(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_id(pid=None):
    """This process as a string that a later process can check: boot id, pid, start time."""
    pid = pid or os.getpid()
    return f"{_boot_id()}:{pid}:{_process_start(pid)}"


def owner_alive(owner):
    try:
        boot, pid, start = owner.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    return boot == _boot_id() and _process_start(pid) == start


# ------------------------------------------------------------------ what a job runs

# ssh arguments a REST caller may pass to deploy: files and host key handling, never commands.
SSH_OPTION_KEYS = ("userknownhostsfile", "stricthostkeychecking", "identityfile", "identitiesonly", "user", "port",
                   "connecttimeout", "batchmode", "loglevel", "globalknownhostsfile")
# in the registry's openapi.json
REQUEST_SCHEMAS = {"verify": "VerifyRequest", "deploy": "DeployRequest", "recover": "RecoverRequest"}


def validate(kind, body):
    """The parameters of a job from a request body: checked against the request schema the registry
    publishes, then what a schema cannot say (the host list expands; ssh options come in allowed pairs).
    JobError(400) naming what to fix."""
    if kind not in KINDS:
        raise JobError(404, f"no job kind {kind!r}; known: {', '.join(KINDS)}")
    problems = schema.problems(REQUEST_SCHEMAS[kind], body)
    if problems:
        raise JobError(400, "; ".join(problems))
    options = dict(body.get("options") or {})
    if kind == "recover":
        return {"node": body["node"], "off_s": body.get("off_s"), "wait_s": body.get("wait_s", 600),
                "force": body.get("force", False)}
    if kind == "verify":
        return {"bench": body.get("bench", False), "options": options}
    hosts = [body["hosts"]] if isinstance(body["hosts"], str) else body["hosts"]

    try:
        parse_hosts(hosts)
    except PibakeError as err:
        raise JobError(400, f"hosts: {err}") from None
    _check_ssh_options(options.get("ssh_options", []))
    return {"hosts": hosts, "options": options}


def _check_ssh_options(args):
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-i", "-F", "-o", "-l", "-p") and i + 1 < len(args):
            value = args[i + 1]
            key = value.split("=", 1)[0].strip().lower()
            if arg == "-o" and key not in SSH_OPTION_KEYS:
                raise JobError(400, f"options.ssh_options: -o {value.split('=', 1)[0]} is not allowed through "
                                    f"the REST API; allowed: {', '.join(SSH_OPTION_KEYS)}")
            if arg == "-o" and key.endswith("knownhostsfile"):
                _check_known_hosts(value.split("=", 1)[-1].strip(), f"options.ssh_options: -o {key}")
            i += 2
            continue
        raise JobError(400, f"options.ssh_options: {arg!r} is not allowed; use pairs -i FILE, -F FILE, -o KEY=VALUE, "
                            "-l USER, -p PORT")


def _check_known_hosts(path, where):
    """ssh appends new host keys to a known_hosts file: through the API only to a file named like one."""
    if not os.path.basename(path).endswith("known_hosts"):
        raise JobError(400, f"{where}: {os.path.basename(path)[:64]!r} is not a known_hosts file (ssh appends "
                            "host keys to it; its name must end in known_hosts)")


def _manager_key(cluster_dir):
    """The manager's ssh identity in this cluster directory, or None (a cluster made before it existed)."""
    path = manager_ssh_key_path(cluster_dir)
    return path if path.is_file() else None


def _names_own_login(ssh_options):
    """True when deploy's ``ssh_options`` choose an identity, a login user or a config file themselves."""
    args = list(ssh_options)
    for i, arg in enumerate(args):
        if arg in ("-i", "-l", "-F") or arg.startswith(("-i", "-l", "-F")):
            return True
        if arg.startswith("-o"):
            value = arg[2:] or (args[i + 1] if i + 1 < len(args) else "")
            if value.split("=", 1)[0].strip().lower() in ("identityfile", "user"):
                return True
    return False


def manager_identity_options(kind, cluster_dir, options, cluster_user):
    """``options`` of a job, with the manager's identity and the cluster user filled in where the request left
    the login open (pure but for looking at whether the key file exists)."""
    key = _manager_key(cluster_dir)
    options = dict(options)
    if key is None:
        return options
    if kind == "verify":
        if "identity" not in options and "user" not in options:
            options["identity"] = str(key)
        return options
    if "user" not in options and not _names_own_login(options.get("ssh_options", ())):
        options["user"] = cluster_user
        options["ssh_options"] = [*options.get("ssh_options", ()), "-i", str(key), "-o", "IdentitiesOnly=yes"]
    return options


def _cluster_user(cluster_dir):
    return load_cluster(cluster_dir).user


def run_verify(cluster_dir, params, progress, *, as_manager=False):
    options = dict(params["options"])
    if as_manager:
        options = manager_identity_options("verify", cluster_dir, options, None)
    return verification.verify(cluster_dir, bench=params["bench"], progress=progress, **options).to_json()


def run_deploy(cluster_dir, params, progress, *, as_manager=False):
    hosts = params["hosts"]
    total = len(parse_hosts(hosts))  # patterns such as red[01-32] count as the hosts they name
    done = set()

    def host_progress(result):
        if result.get("status") in ("changed", "unchanged", "failed"):
            done.add(result.get("host"))
        progress(len(done) / max(total, 1), f"{result.get('host')}: {result.get('step')} "
                                                 f"({result.get('status')})")
    options = dict(params["options"])
    if as_manager:
        options = manager_identity_options("deploy", cluster_dir, options, _cluster_user(cluster_dir))
    if "ssh_options" in options:
        options["ssh_options"] = tuple(options["ssh_options"])
    return deploy(cluster_dir, hosts if len(hosts) > 1 else hosts[0], progress=host_progress, **options).to_dict()


def run_recover(cluster_dir, params, progress):
    return recover_node(cluster_dir, params["node"], off_s=params.get("off_s"), wait_s=params.get("wait_s", 600),
                        force=params["force"], by="rest", progress=lambda message: progress(0.5, message))


FUNCTIONS = {"verify": run_verify, "deploy": run_deploy, "recover": run_recover}
# The registry's jobs run on the manager: they log in to the nodes with the manager's ssh identity, which the
# nodes accept only from the manager's address. A JobRunner made elsewhere (a person's machine) keeps the
# person's own ssh login.
MANAGER_FUNCTIONS = {"verify": functools.partial(run_verify, as_manager=True),
                     "deploy": functools.partial(run_deploy, as_manager=True), "recover": run_recover}


# ------------------------------------------------------------------ the runner

class JobRunner:
    """Jobs of one cluster: persisted in ``<cluster>/registry.db``, run by up to ``workers`` threads."""

    def __init__(self, cluster_dir, *, workers=DEFAULT_WORKERS, max_pending=DEFAULT_MAX_PENDING, functions=None):
        self.cluster_dir = Path(cluster_dir)
        self.path = self.cluster_dir / DB_FILE
        self.workers = workers
        self.max_pending = max_pending
        self.functions = dict(FUNCTIONS if functions is None else functions)
        self._lock = threading.Lock()
        self._pid = None
        self._after_fork()
        self._local = threading.local()
        with self._db() as db:
            db.execute(SCHEMA)
        self.recover()

    def _after_fork(self):
        """gunicorn builds the app in its master and forks the workers: each process owns its own jobs,
        queue and threads."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.owner = owner_id()
            self._queue = queue.Queue()
            self._threads = []

    def _db(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 30000")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def recover(self):
        """Mark queued/running jobs of processes that are gone as failed (interrupted). Returns their ids."""
        with self._db() as db:
            rows = db.execute("SELECT id, owner FROM jobs WHERE state IN ('queued', 'running')").fetchall()
            lost = [r["id"] for r in rows if r["owner"] != self.owner and not owner_alive(r["owner"])]
            for job_id in lost:
                db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                           (_now(), "interrupted: the registry stopped or restarted while the job was queued or "
                                    "running; start it again", job_id))
        if lost:
            LOG.warning("%d job(s) of a stopped registry process marked failed (interrupted)", len(lost))
        return lost

    def submit(self, kind, body):
        """Validate ``body`` and queue a job; returns the job. JobError(400/404/429) when refused."""
        params = validate(kind, body)
        self._after_fork()
        if kind not in self.functions:
            raise JobError(404, f"no job kind {kind!r}")
        job_id = uuid.uuid4().hex[:16]
        with self._lock:
            with self._db() as db:
                pending = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND owner = ?",
                                     (self.owner,)).fetchone()[0]
                if pending >= self.max_pending:
                    raise JobError(429, f"{pending} jobs are queued or running; wait for one to finish "
                                        "(GET /api/v1/jobs/<id>) and try again")
                db.execute("INSERT INTO jobs (id, kind, state, message, params, created, owner) "
                           "VALUES (?, ?, 'queued', 'queued', ?, ?, ?)",
                           (job_id, kind, json.dumps(params), _now(), self.owner))
            self._queue.put(job_id)
            if len(self._threads) < self.workers:
                t = threading.Thread(target=self._work, name=f"pibake-job-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        LOG.info("job %s (%s) queued", job_id, kind)
        return self.get(job_id)

    def get(self, job_id):
        self._after_fork()
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (str(job_id)[:64],)).fetchone()
        if row is None:
            raise JobError(404, f"no job {str(job_id)[:64]}")
        if row["state"] in ("queued", "running") and row["owner"] != self.owner and not owner_alive(row["owner"]):
            self.recover()  # its process died (a gunicorn worker restarted): say so now
            row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return _public(row)

    def list(self, limit=50):
        rows = self._db().execute("SELECT * FROM jobs ORDER BY created DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        return [_public(r, with_result=False) for r in rows]

    def wait(self, job_id, timeout=600):
        """Block until the job is done or failed (tests and the CLI-side waiter); returns it."""
        end = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["state"] in ("done", "failed") or time.monotonic() > end:
                return job
            time.sleep(0.1)

    def _update(self, job_id, **fields):
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def _work(self):
        while True:
            job_id = self._queue.get()
            try:
                self._run(job_id)
            except Exception:  # noqa: BLE001  never let a worker thread die
                LOG.exception("job %s: internal error", job_id)
            finally:
                self._queue.task_done()

    def _run(self, job_id):
        row = self._db().execute("SELECT kind, params FROM jobs WHERE id = ?", (job_id,)).fetchone()
        kind, params = row["kind"], json.loads(row["params"])
        self._update(job_id, state="running", started=_now(), message="started")
        LOG.info("job %s (%s) running", job_id, kind)

        def progress(fraction, message):
            self._update(job_id, progress=round(max(0.0, min(float(fraction), 1.0)), 3), message=str(message)[:500])
        try:
            result = self.functions[kind](self.cluster_dir, params, progress)
        except PibakeError as err:
            self._update(job_id, state="failed", finished=_now(), error=str(err), message="failed")
            LOG.warning("job %s (%s) failed: %s", job_id, kind, err)
            return
        except Exception:  # noqa: BLE001  a bug: say so without details
            LOG.exception("job %s (%s): internal error", job_id, kind)
            self._update(job_id, state="failed", finished=_now(), message="failed",
                         error="internal error; see the registry's log")
            return
        self._update(job_id, state="done", finished=_now(), progress=1.0, message="done",
                     result=json.dumps(result, sort_keys=True, default=str))
        LOG.info("job %s (%s) done", job_id, kind)


def _public(row, with_result=True):
    job = {"id": row["id"], "kind": row["kind"], "state": row["state"],
           "progress": {"fraction": row["progress"], "message": row["message"]},
           "created": row["created"], "started": row["started"], "finished": row["finished"],
           "error": row["error"]}
    if with_result:
        job["result"] = json.loads(row["result"]) if row["result"] else None
    return job
