"""The readings store: sensor readings in ``<cluster_dir>/readings.db`` (SQLite, WAL), apart from
``registry.db`` so that a burst of readings never holds the enrolment store's write lock, and so that its
schema can grow without touching the node store's migrations.

Tables (one row per reading, metrics as columns: ~5x fewer bytes than one row per value):

* ``readings``: raw readings, clustered by (node, time, seq) so that the chart query reads one node's range
  as one contiguous run of the b-tree (with the key (node, seq) and an index on time, each row was one more
  lookup: the 24 h query took ~10x longer; bench/sensors); a unique index (node, seq) makes a resend store
  nothing twice; kept ``raw_days``. The Wi-Fi link (SSID, BSSID, channel...) is stored only when it changes
  (its signal is a metric of every reading): as JSON on every reading it was half of the raw bytes.
* ``networks``: the Wi-Fi scans (one row per access point seen), index (node, time); kept ``raw_days``.
* ``hourly``: per node, metric and hour: n, min, mean, max; kept ``hourly_days``.
* ``pending_hours``: hours that got new raw readings since they were last rolled up (late readings of a
  node that was out of Wi-Fi range for hours re-open old hours; the pass recomputes each such hour from raw).
* ``sensor_nodes``: per node the last seq, the newest reading (for the list), when it was last received,
  and the place set on the manager (``pibake sensors mark``), with its history in ``places`` (a reading
  without a place of its own gets the place set at its time: buffered readings of a node that was carried
  out of range keep the place they were taken at); ``thresholds`` set over the API;
  ``alerts``: per node and metric the alert state and since when.

Every function that depends on the time takes ``now`` (Unix seconds) so tests and bench/sensors can run
a simulated month in minutes.
"""

import bisect
import contextlib
import json
import logging
import threading
import time as _time
from pathlib import Path

from pibake.locks import file_lock
from pibake.registry.sqlitedb import migrate, thread_connection, transaction
from pibake.sensors_model import METRICS, alert_state, threshold_for

LOG = logging.getLogger(__name__)

DB_FILE = "readings.db"
HOUR = 3600
COLUMNS = tuple(METRICS)  # metric columns of ``readings``, in METRICS order
NETWORK_FIELDS = ("ssid", "bssid", "signal_dbm", "signal_pct", "channel", "frequency_mhz", "security")

# Each entry upgrades the schema from version i to i+1. Never edit a released entry: append (a new metric is
# an ALTER TABLE readings ADD COLUMN).
MIGRATIONS = (
    f"""
    CREATE TABLE sensor_nodes (
        id            INTEGER PRIMARY KEY,
        node          TEXT NOT NULL UNIQUE,
        place         TEXT,
        place_since   REAL,
        last_seq      INTEGER,
        last_time     REAL,
        last_received REAL,
        last_reading  TEXT
    );
    CREATE TABLE readings (
        node_id INTEGER NOT NULL,
        seq     INTEGER NOT NULL,
        time    REAL NOT NULL,
        place   TEXT,
        {', '.join(f'{c} {"INTEGER" if METRICS[c].integer else "REAL"}' for c in COLUMNS)},
        wifi    TEXT,
        PRIMARY KEY (node_id, time, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX readings_by_seq ON readings (node_id, seq);
    CREATE TABLE networks (
        node_id       INTEGER NOT NULL,
        time          REAL NOT NULL,
        place         TEXT,
        ssid          TEXT NOT NULL,
        bssid         TEXT NOT NULL,
        signal_dbm    REAL,
        signal_pct    INTEGER,
        channel       INTEGER,
        frequency_mhz INTEGER,
        security      TEXT
    );
    CREATE INDEX networks_by_time ON networks (node_id, time);
    CREATE TABLE hourly (
        node_id INTEGER NOT NULL,
        metric  TEXT NOT NULL,
        hour    INTEGER NOT NULL,
        n       INTEGER NOT NULL,
        min     REAL,
        mean    REAL,
        max     REAL,
        PRIMARY KEY (node_id, metric, hour)
    ) WITHOUT ROWID;
    CREATE TABLE pending_hours (
        node_id INTEGER NOT NULL,
        hour    INTEGER NOT NULL,
        PRIMARY KEY (node_id, hour)
    ) WITHOUT ROWID;
    CREATE TABLE thresholds (
        node   TEXT NOT NULL,
        metric TEXT NOT NULL,
        min    REAL,
        max    REAL,
        set_at REAL NOT NULL,
        PRIMARY KEY (node, metric)
    );
    CREATE TABLE alerts (
        node_id INTEGER NOT NULL,
        metric  TEXT NOT NULL,
        state   TEXT NOT NULL,
        since   REAL NOT NULL,
        value   REAL,
        PRIMARY KEY (node_id, metric)
    );
    CREATE TABLE places (
        node_id INTEGER NOT NULL,
        since   REAL NOT NULL,
        place   TEXT,
        PRIMARY KEY (node_id, since)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
    INSERT INTO meta (key, value) VALUES ('last_pass', 0);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def hour_of(t):
    return int(t // HOUR) * HOUR


class ReadingsStore:
    """Readings of every node in ``<cluster_dir>/readings.db``."""

    def __init__(self, cluster_dir, *, filename=DB_FILE):
        self.path = Path(cluster_dir) / filename
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._local = threading.local()
        self.migrate()

    # ------------------------------------------------------------------ connections
    @contextlib.contextmanager
    def connect(self, write=False):
        """A transaction; writers queue on a thread lock + flock (as the node store does) rather than on
        SQLite's sleeping busy handler."""
        with (file_lock(self.lock_path, thread_lock=self._thread_lock) if write else contextlib.nullcontext()):
            with transaction(thread_connection(self._local, self.path), immediate=write) as conn:
                yield conn

    def migrate(self):
        migrate(self.path, MIGRATIONS, label="readings")

    # ------------------------------------------------------------------ ingest
    @staticmethod
    def _node_id(conn, node, create=False):
        row = conn.execute("SELECT id FROM sensor_nodes WHERE node = ?", (node,)).fetchone()
        if row is None and create:
            return conn.execute("INSERT INTO sensor_nodes (node) VALUES (?) RETURNING id", (node,)).fetchone()[0]
        return row[0] if row else None

    def ingest(self, node, readings, *, now=None, yaml_thresholds=None):
        """Store validated ``readings`` (dicts as POST /api/v1/readings carries them) for ``node`` in one
        transaction. Returns {accepted, duplicates, last_seq}. A reading whose (node, seq) is stored
        already is a duplicate: nothing of it is stored again."""
        now = _time.time() if now is None else now
        insert = (f"INSERT OR IGNORE INTO readings (node_id, seq, time, place, {', '.join(COLUMNS)}, wifi) "
                  f"VALUES ({', '.join('?' * (len(COLUMNS) + 5))})")
        with self.connect(write=True) as conn:
            node_id = self._node_id(conn, node, create=True)
            state = conn.execute("SELECT * FROM sensor_nodes WHERE id = ?", (node_id,)).fetchone()
            accepted, hours, newest, nets = 0, set(), None, []
            history = conn.execute("SELECT since, place FROM places WHERE node_id = ? ORDER BY since",
                                   (node_id,)).fetchall()
            starts = [since for since, _ in history]
            link = json.loads(state["last_reading"]).get("wifi") if state["last_reading"] else None
            for r in sorted(readings, key=lambda r: r["time"]):
                at = bisect.bisect_right(starts, r["time"])
                place = r.get("place") or (history[at - 1][1] if at else None)
                metrics = r.get("metrics") or {}
                wifi = r.get("wifi")
                changed = bool(wifi) and _link(wifi) != _link(link)
                cur = conn.execute(insert, (node_id, r["seq"], r["time"], place,
                                            *(metrics.get(c) for c in COLUMNS),
                                            json.dumps(wifi, sort_keys=True) if changed else None))
                if not cur.rowcount:
                    continue
                link = wifi if wifi else link
                accepted += 1
                hours.add(hour_of(r["time"]))
                for net in r.get("networks") or ():
                    nets.append((node_id, r["time"], place, *(net.get(k) for k in NETWORK_FIELDS)))
                if newest is None or r["time"] >= newest[0]["time"]:
                    newest = (r, place)
            if nets:
                conn.executemany(f"INSERT INTO networks (node_id, time, place, {', '.join(NETWORK_FIELDS)}) "
                                 f"VALUES ({', '.join('?' * (len(NETWORK_FIELDS) + 3))})", nets)
            conn.executemany("INSERT OR IGNORE INTO pending_hours (node_id, hour) VALUES (?, ?)",
                             [(node_id, h) for h in hours])
            last_seq = max([state["last_seq"] or 0] + [r["seq"] for r in readings]) if accepted else state["last_seq"]
            conn.execute("UPDATE sensor_nodes SET last_seq = ?, last_received = ? WHERE id = ?",
                         (last_seq, now, node_id))
            if newest is not None and (state["last_time"] is None or newest[0]["time"] >= state["last_time"]):
                reading, place = newest
                latest = {"seq": reading["seq"], "time": reading["time"], "place": place,
                          "metrics": reading.get("metrics") or {}, "wifi": reading.get("wifi")}
                conn.execute("UPDATE sensor_nodes SET last_time = ?, last_reading = ? WHERE id = ?",
                             (reading["time"], json.dumps(latest, sort_keys=True), node_id))
                self._update_alerts(conn, node, node_id, latest["metrics"], reading["time"], yaml_thresholds or {})
        return {"accepted": accepted, "duplicates": len(readings) - accepted, "last_seq": last_seq}

    def _update_alerts(self, conn, node, node_id, metrics, when, yaml_thresholds):
        """Alert state per metric of the newest reading; ``since`` changes only when the state does."""
        for metric, value in metrics.items():
            state = alert_state(value, self._threshold(conn, node, metric, yaml_thresholds))
            row = conn.execute("SELECT state FROM alerts WHERE node_id = ? AND metric = ?",
                               (node_id, metric)).fetchone()
            if state is None:
                if row is not None:
                    conn.execute("DELETE FROM alerts WHERE node_id = ? AND metric = ?", (node_id, metric))
            elif row is None or row["state"] != state:
                conn.execute("INSERT INTO alerts (node_id, metric, state, since, value) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT(node_id, metric) DO UPDATE SET state = excluded.state, "
                             "since = excluded.since, value = excluded.value", (node_id, metric, state, when, value))
            else:
                conn.execute("UPDATE alerts SET value = ? WHERE node_id = ? AND metric = ?", (value, node_id, metric))

    # ------------------------------------------------------------------ thresholds
    @staticmethod
    def _threshold(conn, node, metric, yaml_thresholds):
        """The threshold in force: one set over the API for this node, else cluster.yaml's (node, then *)."""
        row = conn.execute("SELECT min, max FROM thresholds WHERE node = ? AND metric = ?", (node, metric)).fetchone()
        if row is not None:
            return {"min": row["min"], "max": row["max"], "source": "api"}
        return threshold_for(yaml_thresholds, node, metric)

    def thresholds(self, node, yaml_thresholds=None):
        """{metric: {min, max, source}} in force for ``node``."""
        with self.connect() as conn:
            return {m: t for m in METRICS if (t := self._threshold(conn, node, m, yaml_thresholds or {}))}

    def set_threshold(self, node, metric, low, high, *, now=None, yaml_thresholds=None):
        """Set (or with low and high both None: remove) ``node``'s own threshold for ``metric``, and re-evaluate
        its alert state against the latest value (a changed state starts now)."""
        now = _time.time() if now is None else now
        with self.connect(write=True) as conn:
            if low is None and high is None:
                conn.execute("DELETE FROM thresholds WHERE node = ? AND metric = ?", (node, metric))
            else:
                conn.execute("INSERT INTO thresholds (node, metric, min, max, set_at) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT(node, metric) DO UPDATE SET min = excluded.min, max = excluded.max, "
                             "set_at = excluded.set_at", (node, metric, low, high, now))
            node_id = self._node_id(conn, node)
            if node_id is not None:
                row = conn.execute("SELECT last_reading FROM sensor_nodes WHERE id = ?", (node_id,)).fetchone()
                latest = json.loads(row["last_reading"]) if row["last_reading"] else {"metrics": {}}
                if metric in latest["metrics"]:
                    self._update_alerts(conn, node, node_id, {metric: latest["metrics"][metric]}, now,
                                        yaml_thresholds or {})
            return self._threshold(conn, node, metric, yaml_thresholds or {})

    # ------------------------------------------------------------------ place
    def set_place(self, node, place, *, now=None):
        """The place of ``node`` from now on (None: no place). Readings that carry their own keep theirs."""
        now = _time.time() if now is None else now
        with self.connect(write=True) as conn:
            node_id = self._node_id(conn, node, create=True)
            conn.execute("UPDATE sensor_nodes SET place = ?, place_since = ? WHERE id = ?", (place, now, node_id))
            conn.execute("INSERT OR REPLACE INTO places (node_id, since, place) VALUES (?, ?, ?)",
                         (node_id, now, place))
        return {"node": node, "place": place, "since": now}

    # ------------------------------------------------------------------ reading back
    def has_node(self, node):
        with self.connect() as conn:
            return self._node_id(conn, node) is not None

    def nodes(self):
        """Per node that has sent readings (or got a place): its state row as a dict, with alerts."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM sensor_nodes ORDER BY node").fetchall()
            alerts = conn.execute("SELECT * FROM alerts").fetchall()
        by_node = {}
        for a in alerts:
            by_node.setdefault(a["node_id"], {})[a["metric"]] = {"state": a["state"], "since": a["since"],
                                                                  "value": a["value"]}
        out = []
        for row in rows:
            latest = json.loads(row["last_reading"]) if row["last_reading"] else None
            out.append({"node": row["node"], "place": row["place"], "place_since": row["place_since"],
                        "last_seq": row["last_seq"], "last_received": row["last_received"], "latest": latest,
                        "alerts": by_node.get(row["id"], {})})
        return out

    def series(self, node, metric, since, until, step, *, raw_days, now=None):
        """Points {time, n, min, mean, max} of ``metric`` in [since, until) in buckets of ``step`` seconds,
        from the raw readings when the range is within ``raw_days`` and the step under an hour, else from
        the hourly aggregates (the hours not rolled up yet are computed from raw). Returns (source, points)."""
        now = _time.time() if now is None else now
        if metric not in METRICS:
            raise ValueError(metric)
        with self.connect() as conn:
            node_id = self._node_id(conn, node)
            if node_id is None:
                return "raw", []
            if step < HOUR and since >= now - raw_days * 86400:
                rows = conn.execute(
                    f"SELECT CAST(time / ? AS INTEGER) * ? AS b, count({metric}), min({metric}), avg({metric}), "
                    f"max({metric}) FROM readings WHERE node_id = ? AND time >= ? AND time < ? AND {metric} "
                    "IS NOT NULL GROUP BY b ORDER BY b", (step, step, node_id, since, until)).fetchall()
                return "raw", [_point(*r) for r in rows]
            first = hour_of(since)
            pending = {h for (h,) in conn.execute(
                "SELECT hour FROM pending_hours WHERE node_id = ? AND hour >= ? AND hour < ?",
                (node_id, first, until))}
            hours = {h: (n, lo, mean, hi) for h, n, lo, mean, hi in conn.execute(
                "SELECT hour, n, min, mean, max FROM hourly WHERE node_id = ? AND metric = ? AND hour >= ? "
                "AND hour < ?", (node_id, metric, first, until)) if h not in pending}
            for h in pending:
                row = conn.execute(
                    f"SELECT count({metric}), min({metric}), avg({metric}), max({metric}) FROM readings "
                    f"WHERE node_id = ? AND time >= ? AND time < ? AND {metric} IS NOT NULL",
                    (node_id, h, h + HOUR)).fetchone()
                if row[0]:
                    hours[h] = tuple(row)
        return "hourly", _rebucket(hours, max(HOUR, step - step % HOUR))

    def networks(self, node, *, since=None):
        """The access points of ``node``'s newest scan (since ``since``): list of dicts, strongest first."""
        with self.connect() as conn:
            node_id = self._node_id(conn, node)
            if node_id is None:
                return []
            row = conn.execute("SELECT max(time) FROM networks WHERE node_id = ?", (node_id,)).fetchone()
            if row[0] is None or (since is not None and row[0] < since):
                return []
            rows = conn.execute(f"SELECT time, place, {', '.join(NETWORK_FIELDS)} FROM networks WHERE node_id = ? "
                                "AND time = ? ORDER BY signal_dbm DESC, ssid", (node_id, row[0])).fetchall()
        return [dict(r) for r in rows]

    def survey(self, node=None, *, since=0):
        """Wi-Fi survey: per place and network (bssid) the scans that saw it and their signal (mean, min, max
        dBm), from the scans since ``since``; of one node or of all."""
        where, args = "time >= ?", [since]
        if node is not None:
            with self.connect() as conn:
                node_id = self._node_id(conn, node)
            if node_id is None:
                return []
            where, args = "node_id = ? AND time >= ?", [node_id, since]
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT coalesce(place, '') AS place, ssid, bssid, count(*) AS seen, avg(signal_dbm) AS mean_dbm, "
                f"min(signal_dbm) AS min_dbm, max(signal_dbm) AS max_dbm, max(time) AS last FROM networks "
                f"WHERE {where} GROUP BY place, bssid ORDER BY place, mean_dbm DESC", args).fetchall()
        return [{**dict(r), "place": r["place"] or None,
                 "mean_dbm": round(r["mean_dbm"], 1) if r["mean_dbm"] is not None else None} for r in rows]

    def export(self, node, since, until):
        """Raw readings of ``node`` in [since, until), oldest first, as dicts (seq, time, place, metrics...)."""
        with self.connect() as conn:
            node_id = self._node_id(conn, node)
            if node_id is None:
                return []
            rows = conn.execute(f"SELECT seq, time, place, {', '.join(COLUMNS)} FROM readings WHERE node_id = ? "
                                "AND time >= ? AND time < ? ORDER BY time, seq", (node_id, since, until)).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ downsampling and retention
    def maybe_pass(self, *, every_s, raw_days, hourly_days, now=None):
        """Run ``run_pass`` when the last pass (by any process) is at least ``every_s`` old; claims the turn in
        a write transaction so two gunicorn workers never run it at once. Returns the pass result or None."""
        now = _time.time() if now is None else now
        with self.connect(write=True) as conn:
            last = conn.execute("SELECT value FROM meta WHERE key = 'last_pass'").fetchone()[0]
            if now - last < every_s:
                return None
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_pass'", (now,))
        return self.run_pass(raw_days=raw_days, hourly_days=hourly_days, now=now)

    def run_pass(self, *, raw_days, hourly_days, now=None, chunk=500):
        """Roll every complete pending hour up into ``hourly`` (recomputed from raw), then drop raw readings
        and scans older than ``raw_days`` and hourly rows older than ``hourly_days``. Up to ``chunk`` node-hours
        per write transaction: one fsync for many nodes (one transaction per node made the pass cost more
        than the ingest of 100 nodes; bench/sensors) while an ingest waits at most for one chunk (tens of ms)."""
        now = _time.time() if now is None else now
        current = hour_of(now)
        aggregate = " UNION ALL ".join(
            f"SELECT ?, '{m}', ?, count({m}), min({m}), avg({m}), max({m}) FROM readings WHERE node_id = ? "
            f"AND time >= ? AND time < ? AND {m} IS NOT NULL HAVING count({m}) > 0" for m in COLUMNS)
        raw_cut, hourly_cut = now - raw_days * 86400, now - hourly_days * 86400
        with self.connect() as conn:
            todo = conn.execute("SELECT node_id, hour FROM pending_hours WHERE hour < ? ORDER BY node_id, hour",
                                (current,)).fetchall()
            expired = [node_id for (node_id,) in conn.execute("SELECT id FROM sensor_nodes")
                       if self._oldest(conn, node_id, raw_cut, hourly_cut)]
        for i in range(0, len(todo), chunk):
            with self.connect(write=True) as conn:
                for node_id, h in todo[i:i + chunk]:
                    conn.execute("DELETE FROM hourly WHERE node_id = ? AND hour = ?", (node_id, h))
                    conn.execute("INSERT INTO hourly (node_id, metric, hour, n, min, mean, max) " + aggregate,
                                 [v for _ in COLUMNS for v in (node_id, h, node_id, h, h + HOUR)])
                    conn.execute("DELETE FROM pending_hours WHERE node_id = ? AND hour = ?", (node_id, h))
        deleted = 0
        if expired:
            with self.connect(write=True) as conn:
                for node_id in expired:
                    deleted += conn.execute("DELETE FROM readings WHERE node_id = ? AND time < ?",
                                            (node_id, raw_cut)).rowcount
                    conn.execute("DELETE FROM networks WHERE node_id = ? AND time < ?", (node_id, raw_cut))
                    for m in COLUMNS:
                        conn.execute("DELETE FROM hourly WHERE node_id = ? AND metric = ? AND hour < ?",
                                     (node_id, m, hourly_cut))
        LOG.info("readings pass: %d hour(s) rolled up, %d raw reading(s) past retention removed", len(todo), deleted)
        return {"hours_rolled_up": len(todo), "raw_removed": deleted}

    @staticmethod
    def _oldest(conn, node_id, raw_cut, hourly_cut):
        """Whether ``node_id`` has anything past retention (each check one step into an index)."""
        raw = conn.execute("SELECT time FROM readings WHERE node_id = ? ORDER BY time LIMIT 1", (node_id,)).fetchone()
        net = conn.execute("SELECT time FROM networks WHERE node_id = ? ORDER BY time LIMIT 1", (node_id,)).fetchone()
        if (raw and raw[0] < raw_cut) or (net and net[0] < raw_cut):
            return True
        return any(conn.execute("SELECT 1 FROM hourly WHERE node_id = ? AND metric = ? AND hour < ? LIMIT 1",
                                (node_id, m, hourly_cut)).fetchone() for m in COLUMNS)


def _link(wifi):
    """What identifies a Wi-Fi link, without what varies from reading to reading (signal and bit rate are
    metrics)."""
    return {k: v for k, v in (wifi or {}).items() if k not in ("signal_dbm", "bitrate_mbps")}


def _point(bucket, n, low, mean, high):
    return {"time": bucket, "n": n, "min": low, "mean": round(mean, 4), "max": high}


def _rebucket(hours, step):
    """Hourly (n, min, mean, max) rows merged into buckets of ``step`` seconds (a multiple of an hour)."""
    buckets = {}
    for h in sorted(hours):
        n, low, mean, high = hours[h]
        b = h // step * step
        acc = buckets.get(b)
        if acc is None:
            buckets[b] = [n, low, mean * n, high]
        else:
            acc[0] += n
            acc[1] = min(acc[1], low)
            acc[2] += mean * n
            acc[3] = max(acc[3], high)
    return [_point(b, n, low, total / n, high) for b, (n, low, total, high) in sorted(buckets.items())]
