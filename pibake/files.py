"""Writing a file so that readers see the old content or the new, never half of it, and never with looser
permissions than asked: the one ``atomic_write`` of pibake. And the other side: noticing that a file changed
(``file_stamp``), and a value read from a file kept until it does (``FileDerived``)."""

import os
import threading
from pathlib import Path


def atomic_write(path, data, mode=0o644, *, make_parents=False, owner=None):
    """Write ``data`` (str as UTF-8, or bytes) to ``path``: a new temp file beside it (0600 from its creation,
    named per process and thread), fsync, chown to ``owner`` ((uid, gid), when given), chmod ``mode``, rename
    over ``path``, fsync the folder."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # left by a crashed writer that had this pid and thread id: never reuse it
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if owner is not None:
            os.chown(tmp, *owner)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_stamp(path):
    """What changes when a file is edited or replaced (an atomic_write renames a new file over it):
    (st_mtime_ns, st_size, st_ino). Raises OSError."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


class FileDerived:
    """A value computed from ``path`` by ``compute()``, computed again only when ``file_stamp(path)`` changes
    (thread-safe). When the file cannot be stat'ed, ``compute()`` runs uncached and says why (its own error)."""

    def __init__(self, path, compute):
        self.path = Path(path)
        self.compute = compute
        self._cached = (None, None)  # (file_stamp, value)
        self._lock = threading.Lock()

    def get(self):
        try:
            stamp = file_stamp(self.path)
        except OSError:
            return self.compute()
        with self._lock:
            if self._cached[0] != stamp:
                self._cached = (stamp, self.compute())
            return self._cached[1]
