"""The registry's SQLite habits, in one place for its two databases (registry.db: nodes; readings.db: sensors).

* one connection per thread and process, kept open: closing the last connection of a WAL database
  checkpoints it, which would cost every request several fsyncs; never used across fork();
* ``synchronous = FULL``: a 2xx answer means the row is on disk (an agent then drops its own copy);
* transactions opened explicitly (``isolation_level=None``), ``BEGIN IMMEDIATE`` for writers;
* schema migrations numbered by ``PRAGMA user_version``, run statement by statement in one transaction
  (``executescript()`` would COMMIT mid-way), safe when several processes start at once.
"""

import contextlib
import logging
import os
import sqlite3

LOG = logging.getLogger(__name__)
BUSY_TIMEOUT_MS = 30000


def thread_connection(local, path, *, foreign_keys=False):
    """The calling thread's connection to ``path``, kept in ``local`` (a ``threading.local``)."""
    if getattr(local, "pid", None) != os.getpid():  # never use a connection across fork()
        local.conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                     check_same_thread=True)
        local.conn.row_factory = sqlite3.Row
        local.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        local.conn.execute("PRAGMA synchronous = FULL")
        if foreign_keys:
            local.conn.execute("PRAGMA foreign_keys = ON")
        local.pid = os.getpid()
    return local.conn


@contextlib.contextmanager
def transaction(conn, immediate=False):
    """``BEGIN [IMMEDIATE]`` … ``COMMIT``, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(path, migrations, *, label, before=None, after_step=None):
    """Bring the database at ``path`` to ``len(migrations)`` (each a string of ``;``-separated statements).

    ``before(conn)`` runs first inside the transaction, ``after_step(conn, version)`` after each migration.
    A database newer than this pibake is refused. A new file is made 0600 (it holds hashes and history)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    target = len(migrations)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            LOG.warning("%s DB %s is not in WAL mode (%s)", label, path, mode)
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > target:
            conn.execute("ROLLBACK")
            raise RuntimeError(f"{path} has schema version {version}, newer than this pibake ({target})")
        if before:
            before(conn)
        for number in range(version, target):
            for statement in migrations[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            if after_step:
                after_step(conn, number + 1)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute("COMMIT")
    finally:
        conn.close()
    if fresh:
        path.chmod(0o600)
