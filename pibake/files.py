"""Writing a file so that readers see the old content or the new, never half of it, and never with looser
permissions than asked: the one ``atomic_write`` of pibake."""

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
