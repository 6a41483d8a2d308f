"""The registry's SQLite store: one file ``registry.db`` in the cluster directory, WAL mode.

The schema is versioned with ``PRAGMA user_version`` and a ``migrations`` table (what ran, when).
Each call opens its own short-lived connection (cheap with SQLite) so threads and gunicorn worker
processes never share one. Enrolment runs in a ``BEGIN IMMEDIATE`` transaction: two concurrent
enrolments of one hostname serialize, and the hostname primary key makes duplicates impossible.
Enrolments that arrive while another commits are written together in the next transaction (group
commit: one write-lock turn and one fsync for the batch; each returns only once its row is committed).
Only a hash of each node credential is stored.
"""

import contextlib
import threading
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
from pathlib import Path

from pibake.errors import ConflictError
from pibake.locks import file_lock
from pibake.registry.sqlitedb import migrate, thread_connection, transaction

LOG = logging.getLogger(__name__)

DB_FILE = "registry.db"

# Each entry upgrades the schema from version i to i+1. Never edit a released entry: append.
MIGRATIONS = (
    """
    CREATE TABLE nodes (
        hostname        TEXT PRIMARY KEY,
        mac             TEXT NOT NULL,
        ip              TEXT NOT NULL,
        ips             TEXT NOT NULL DEFAULT '[]',
        role            TEXT NOT NULL,
        model           TEXT NOT NULL DEFAULT '',
        cpus            INTEGER NOT NULL,
        memory_mb       INTEGER NOT NULL,
        slurmd_c_raw    TEXT NOT NULL,
        slurmd_c        TEXT NOT NULL,
        os_release      TEXT NOT NULL DEFAULT '{}',
        agent_version   TEXT NOT NULL DEFAULT '',
        status          TEXT NOT NULL CHECK (status IN ('pending', 'enrolled', 'ready', 'error')),
        message         TEXT NOT NULL DEFAULT '',
        credential_hash TEXT NOT NULL,
        enrol_count     INTEGER NOT NULL DEFAULT 1,
        enrolled_at     TEXT NOT NULL,
        last_seen       TEXT NOT NULL
    );
    """,
    # 2: change counter of the node set, and per slurm.conf path the counter its file was generated at,
    #    so concurrent enrolments coalesce into one slurm.conf apply.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('node_set_seq', 0);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

PUBLIC_FIELDS = ("hostname", "ip", "ips", "mac", "role", "model", "cpus", "memory_mb", "slurmd_c",
                 "os_release", "agent_version", "status", "message", "enrol_count", "enrolled_at",
                 "last_seen")


def utcnow():
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def new_credential():
    """A fresh per-node credential (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_credential(credential):
    """sha256 of the credential. The credential is 256 random bits, not a password a person chose, so a
    slow KDF adds nothing against guessing and would cost every node request tens of milliseconds."""
    return "sha256$" + hashlib.sha256(credential.encode()).hexdigest()


def credential_matches(credential, stored_hash):
    if not isinstance(credential, str) or not stored_hash:
        return False
    return hmac.compare_digest(hash_credential(credential), stored_hash)


def _row_to_node(row):
    node = dict(row)
    for key in ("ips", "slurmd_c", "os_release"):
        node[key] = json.loads(node[key])
    node.pop("credential_hash", None)
    node.pop("slurmd_c_raw", None)
    return node


class _Pending:
    """One enrolment waiting for a group commit: its statement, then its row (None: MAC conflict)."""

    __slots__ = ("sql", "params", "row", "error", "done")

    def __init__(self, sql, params):
        self.sql, self.params = sql, params
        self.row = self.error = None
        self.done = False


class Store:
    """Nodes in ``<cluster_dir>/registry.db``."""

    def __init__(self, cluster_dir, *, filename=DB_FILE):
        self.path = Path(cluster_dir) / filename
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._local = threading.local()
        self._facts_cache = {}  # hostname -> (slurmd_c JSON text, parsed facts), see slurm_rows()
        self._commit_cond = threading.Condition()  # group commit of enrolments, see _group_commit()
        self._commit_queue = []
        self._commit_leading = False
        self.migrate()

    @contextlib.contextmanager
    def _write_lock(self):
        """Writers queue on a thread lock and an flock instead of SQLite's busy handler, whose sleeps
        (up to 100 ms a try) make the slowest enrolments under load wait for seconds."""
        with file_lock(self.lock_path, thread_lock=self._thread_lock):
            yield

    @contextlib.contextmanager
    def connect(self, immediate=False):
        if immediate:
            with self._write_lock(), self._connect(True) as conn:
                yield conn
        else:
            with self._connect(False) as conn:
                yield conn

    def _connect(self, immediate):
        return transaction(thread_connection(self._local, self.path, foreign_keys=True), immediate)

    # ------------------------------------------------------------------ schema
    def migrate(self):
        """Create or upgrade the schema to SCHEMA_VERSION. Safe to call from many processes at once."""
        migrate(self.path, MIGRATIONS, label="registry",
                before=lambda conn: conn.execute(
                    "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"),
                after_step=lambda conn, version: conn.execute("INSERT INTO migrations VALUES (?, ?)",
                                                              (version, utcnow())))

    def schema_version(self):
        with self.connect() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------------ nodes
    def enrol(self, record, *, require_approval=False):
        """Insert or update a node from a validated enrolment ``record``.

        Returns ``(node, credential, created)``. The credential is new on every enrolment (the old one
        stops working). Raises ConflictError when the hostname is enrolled with another MAC.
        A pending node stays pending on re-enrolment; an accepted one is ``enrolled`` again.
        """
        credential = new_credential()
        now = utcnow()
        values = {
            "hostname": record["hostname"], "mac": record["mac"], "ip": record["ip"],
            "ips": json.dumps(record["ips"]), "role": record["role"], "model": record.get("model", ""),
            "cpus": record["cpus"], "memory_mb": record["memory_mb"], "slurmd_c_raw": record["slurmd_c_raw"],
            "slurmd_c": json.dumps(record["slurmd_c"], sort_keys=True),
            "os_release": json.dumps(record.get("os_release") or {}, sort_keys=True),
            "agent_version": record.get("agent_version") or "",
            "credential_hash": hash_credential(credential), "last_seen": now,
        }
        insert = dict(values, status="pending" if require_approval else "enrolled", message="", enrolled_at=now,
                      enrol_count=1)
        # One statement inserts or updates (same MAC) and returns the row; with another MAC the update's
        # WHERE is false and nothing comes back.
        updates = ", ".join(f"{k} = excluded.{k}" for k in values if k != "hostname")
        sql = (f"INSERT INTO nodes ({', '.join(insert)}) VALUES ({', '.join('?' * len(insert))}) "
               f"ON CONFLICT(hostname) DO UPDATE SET {updates}, message = '', "
               "status = CASE WHEN nodes.status = 'pending' THEN 'pending' ELSE 'enrolled' END, "
               "enrol_count = nodes.enrol_count + 1 WHERE nodes.mac = excluded.mac RETURNING *")
        item = _Pending(sql, tuple(insert.values()))
        self._group_commit(item)
        if item.error is not None:
            raise item.error
        if item.row is None:
            raise ConflictError(record["hostname"])
        return _row_to_node(item.row), credential, item.row["enrol_count"] == 1

    def _group_commit(self, item):
        """Write ``item`` together with the enrolments other threads of this process queued meanwhile:
        one thread leads, writes the whole queue in one transaction (one write-lock turn, one fsync) and
        wakes the others. Every item is committed (or failed) before its thread returns. One transaction
        per enrolment made the write lock the bottleneck under load: every statement releases and retakes
        the GIL, and a holder that waits for it holds every other writer up (bench/registry)."""
        cond = self._commit_cond
        with cond:
            self._commit_queue.append(item)
            while not item.done and self._commit_leading:
                cond.wait()
            if item.done:
                return
            self._commit_leading = True
            batch, self._commit_queue = self._commit_queue, []
        try:
            self._write_batch(batch)
        except BaseException as exc:  # the transaction was rolled back: nothing of the batch is stored
            for other in batch:
                other.error = exc
            raise
        finally:
            with cond:
                for other in batch:
                    other.done = True
                self._commit_leading = False
                cond.notify_all()

    def _write_batch(self, batch):
        with self.connect(immediate=True) as conn:
            changed = False
            for item in batch:
                rows = conn.execute(item.sql, item.params).fetchall()
                item.row = rows[0] if rows else None
                changed = changed or bool(rows)
            if changed:
                self._bump(conn)

    def get(self, hostname):
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM nodes WHERE hostname = ?", (hostname,)).fetchone()
        return _row_to_node(row) if row else None

    def list(self):
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM nodes ORDER BY hostname").fetchall()
        return [_row_to_node(r) for r in rows]

    def slurm_rows(self):
        """What slurm.conf needs of accepted workers, lean (called on every slurm.conf apply).

        The parsed ``slurmd -C`` facts are kept per hostname with the JSON text they came from, so an
        apply parses only the nodes that are new or changed since the last one (parsing all of them was
        ~2.5 ms of every apply at 1000 nodes). Each call returns fresh dicts: callers may change them.
        """
        with self.connect() as conn:
            rows = conn.execute("SELECT hostname, ip, model, slurmd_c FROM nodes WHERE role = 'worker' "
                                "AND status != 'pending' ORDER BY hostname").fetchall()
        cache, fresh, out = self._facts_cache, {}, []
        for hostname, ip, model, text in rows:
            hit = cache.get(hostname)
            facts = hit[1] if hit is not None and hit[0] == text else json.loads(text)
            fresh[hostname] = (text, facts)
            out.append({"hostname": hostname, "ip": ip, "model": model, "facts": dict(facts)})
        self._facts_cache = fresh  # one assignment: concurrent callers each leave a complete cache
        return out

    def count(self):
        with self.connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]

    def delete(self, hostname):
        """True when the node existed."""
        with self.connect(immediate=True) as conn:
            deleted = conn.execute("DELETE FROM nodes WHERE hostname = ?", (hostname,)).rowcount > 0
            if deleted:
                self._bump(conn)
            return deleted

    def accept(self, hostname):
        """Pending -> enrolled. Returns the node, or None when unknown. Accepting a non-pending node is a no-op."""
        with self.connect(immediate=True) as conn:
            if conn.execute("UPDATE nodes SET status = 'enrolled' WHERE hostname = ? AND status = 'pending'",
                            (hostname,)).rowcount:
                self._bump(conn)
            row = conn.execute("SELECT * FROM nodes WHERE hostname = ?", (hostname,)).fetchone()
        return _row_to_node(row) if row else None

    def set_status(self, hostname, status, message=""):
        with self.connect(immediate=True) as conn:
            conn.execute("UPDATE nodes SET status = ?, message = ?, last_seen = ? WHERE hostname = ?",
                         (status, message, utcnow(), hostname))
            row = conn.execute("SELECT * FROM nodes WHERE hostname = ?", (hostname,)).fetchone()
        return _row_to_node(row) if row else None

    def check_credential(self, hostname, credential):
        """The node (and last_seen refreshed) when ``credential`` is this node's, else None."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM nodes WHERE hostname = ?", (hostname,)).fetchone()
        if row is None or not credential_matches(credential, row["credential_hash"]):
            return None
        return _row_to_node(row)

    # ------------------------------------------------------------------ change counter
    @staticmethod
    def _bump(conn):
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'node_set_seq'")

    def node_set_seq(self):
        """Counter raised by every enrolment, acceptance and removal (in the same transaction)."""
        with self.connect() as conn:
            return conn.execute("SELECT value FROM meta WHERE key = 'node_set_seq'").fetchone()[0]

    def applied_seq(self, conf_path):
        """The node_set_seq at which the slurm.conf now in force at ``conf_path`` was generated (-1: never)."""
        with self.connect() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"applied_seq:{conf_path}",)).fetchone()
        return row[0] if row else -1

    def set_applied_seq(self, conf_path, seq):
        with self.connect(immediate=True) as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                         "value = max(value, excluded.value)", (f"applied_seq:{conf_path}", seq))

    def touch(self, hostname):
        with self.connect(immediate=True) as conn:
            conn.execute("UPDATE nodes SET last_seen = ? WHERE hostname = ?", (utcnow(), hostname))
