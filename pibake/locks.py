"""One way to serialize writers across threads and processes: an exclusive flock on a lock file."""

import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def file_lock(path, *, mode=0o600, thread_lock=None):
    """Hold an exclusive ``flock`` on ``path`` (created with ``mode`` if missing) for the ``with`` block.

    ``thread_lock`` (a ``threading.Lock``) is taken first when given: flock alone does not order the
    threads of one process that open the file separately.
    """
    outer = thread_lock if thread_lock is not None else contextlib.nullcontext()
    with outer:
        fd = os.open(Path(path), os.O_RDWR | os.O_CREAT, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
