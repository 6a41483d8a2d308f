"""The burn manifest: what was written to which card, as JSON Lines in the cluster directory.

``<cluster>/manifest.jsonl`` gets one line per event, never rewritten: a burn appends a
``started`` record before it touches the target and a ``complete`` (or ``failed``) record
when it is done. Each line is appended with a single ``write`` on an ``O_APPEND`` file
descriptor under an exclusive ``flock`` (parallel burns in threads or processes never
interleave) and then fsynced, so a crash leaves at most the burn's own record missing.

Readers fold the records of one burn (same ``burn_id``) into one entry. A burn whose
process died after ``started`` (killed, power cut, card pulled) has no final record and is
reported as ``incomplete``; one still running on this machine is ``running``.

    burn_id = manifest.start(cluster_dir, hostname="red01", ip="10.1.1.11", role="worker", ...)
    manifest.finish(cluster_dir, burn_id, "complete", written_sha256=...)
    manifest.entries(cluster_dir)              # one dict per burn, oldest first
    manifest.latest_by_hostname(cluster_dir)   # {hostname: latest entry}, for verify
"""

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

from pibake import __version__

LOG = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.jsonl"
STATUSES = ("started", "complete", "failed", "incomplete", "running")
FINAL = ("complete", "failed")
_THREAD_LOCK = threading.Lock()


def manifest_path(cluster_dir):
    return Path(cluster_dir) / MANIFEST_FILE


def _now():
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _process_start(pid):
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def append(cluster_dir, record):
    """Append one record (a JSON-able dict) as one line. Atomic with respect to other appenders."""
    path = manifest_path(cluster_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str, separators=(",", ":")) + "\n").encode("utf-8")
    with _THREAD_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            written = os.write(fd, line)
            if written != len(line):  # a full disk: never leave a torn line without saying so
                raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the flock
    LOG.debug("manifest %s: %s %s", path, record.get("status"), record.get("burn_id"))


def start(cluster_dir, **fields):
    """Append a ``started`` record for a new burn; return its ``burn_id``.

    Typical fields: hostname, ip, role, instance_id, image {name, sha256}, target, target_kind
    ("device"/"file"), card {serial, model, size, disk_id}.
    """
    burn_id = fields.pop("burn_id", None) or uuid.uuid4().hex[:16]
    pid = os.getpid()
    record = dict(fields)
    record.update({
        "burn_id": burn_id,
        "status": "started",
        "time": _now(),
        "started": _now(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "boot_id": _boot_id(),
        "machine": socket.gethostname(),
        "pibake_version": __version__,
    })
    append(cluster_dir, record)
    return burn_id


def finish(cluster_dir, burn_id, status, *, reason=None, **fields):
    """Append the final record of a burn: ``complete`` or ``failed`` (with a one-line ``reason``)."""
    if status not in FINAL:
        raise ValueError(f"final status must be one of {FINAL}, not {status!r}")
    record = dict(fields)
    record.update({"burn_id": burn_id, "status": status, "time": _now(), "finished": _now()})
    if reason is not None:
        record["reason"] = str(reason)
    append(cluster_dir, record)


def records(cluster_dir):
    """Every raw record, in file order. A torn or unreadable line is skipped with a warning."""
    path = manifest_path(cluster_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            LOG.warning("%s line %d is not a JSON record (torn write?); skipped", path, number)
            continue
        if isinstance(record, dict) and record.get("burn_id"):
            out.append(record)
    return out


def _still_running(entry):
    """True when the process that started this burn is alive on this machine (same boot, same process)."""
    pid = entry.get("pid")
    if not pid or entry.get("machine") != socket.gethostname() or entry.get("boot_id") != _boot_id():
        return False
    start_ticks = _process_start(pid)
    return start_ticks is not None and start_ticks == entry.get("pid_start")


def fold(raw_records):
    """Fold raw records into one entry per burn (pure apart from the liveness check of unfinished burns)."""
    by_id = {}
    for record in raw_records:
        entry = by_id.setdefault(record["burn_id"], {})
        status = record.get("status")
        merged = {k: v for k, v in record.items() if k != "time"}
        entry.update(merged)
        entry.setdefault("events", []).append({"status": status, "time": record.get("time")})
    result = []
    for entry in by_id.values():
        if entry.get("status") == "started":
            if _still_running(entry):
                entry["status"] = "running"
            else:
                entry["status"] = "incomplete"
                entry.setdefault("reason", "the burn never finished (process killed, card pulled or power lost)")
        result.append(entry)
    return result


def entries(cluster_dir):
    """One dict per burn, oldest first, with ``status`` complete, failed, incomplete or running."""
    return fold(records(cluster_dir))


def latest_by_hostname(cluster_dir):
    """{hostname: the latest burn entry for it}: what ``pibake verify`` compares with enrolled nodes."""
    latest = {}
    for entry in entries(cluster_dir):
        host = entry.get("hostname")
        if host:
            latest[host] = entry  # file order is time order
    return latest
