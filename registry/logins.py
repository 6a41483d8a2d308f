"""Failed web logins, per client address, in ``<cluster_dir>/web-logins.db`` (SQLite, shared by every gunicorn
worker, so a guesser cannot spread attempts over workers).

Each failed login is answered only after a delay that doubles with the client's recent failures (0.25 s,
0.5 s, 1 s ... at most 4 s); after ``max_failures`` within ``window_s`` the client is refused (429) without
its password being checked, until the oldest of those failures is ``window_s`` old. A successful login
clears the client's failures. Addresses are the TCP peer's (gunicorn trusts no forwarding header here).
"""

import contextlib
import sqlite3
import time
from pathlib import Path

DB_FILE = "web-logins.db"
MAX_FAILURES = 5
WINDOW_S = 900
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 4.0


def failure_delay(failures):
    """Seconds to wait before answering the ``failures``-th failed login (1-based) of a client."""
    return min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** max(0, failures - 1))


class LoginThrottle:
    def __init__(self, cluster_dir, *, max_failures=MAX_FAILURES, window_s=WINDOW_S):
        self.path = Path(cluster_dir) / DB_FILE
        self.max_failures, self.window_s = max_failures, window_s
        fresh = not self.path.exists()
        with self._connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS failures (client TEXT NOT NULL, time REAL NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS failures_by_client ON failures (client, time)")
        if fresh:
            self.path.chmod(0o600)

    @contextlib.contextmanager
    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _recent(self, conn, client, now):
        conn.execute("DELETE FROM failures WHERE time < ?", (now - self.window_s,))
        return conn.execute("SELECT count(*), min(time) FROM failures WHERE client = ?", (client,)).fetchone()

    def locked_for(self, client, now=None):
        """Seconds until ``client`` may try again (0: it may try now)."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            count, oldest = self._recent(conn, client, now)
        return max(1, int(oldest + self.window_s - now) + 1) if count >= self.max_failures else 0

    def failed(self, client, now=None):
        """Record a failure; returns how long to delay the answer."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            conn.execute("INSERT INTO failures (client, time) VALUES (?, ?)", (client, now))
            count, _ = self._recent(conn, client, now)
        return failure_delay(count)

    def succeeded(self, client):
        with self._connect() as conn:
            conn.execute("DELETE FROM failures WHERE client = ?", (client,))
