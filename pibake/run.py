"""The one subprocess seam: argument lists only, never a shell, errors that say what failed."""

import logging
import shutil
import subprocess

from pibake.errors import CommandError

LOG = logging.getLogger(__name__)


def which(name):
    """Path of an executable, or None (also looks in /usr/sbin and /sbin, where root tools live)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def run(argv, *, timeout=60, check=True, input=None, env=None, cwd=None, capture=True):
    """Run ``argv`` and return the ``subprocess.CompletedProcess`` (text mode).

    Raises ``CommandError`` (a ``PibakeError``) when the program is missing, times out
    or, with ``check``, exits non-zero. The error carries argv, exit code and stderr.
    """
    argv = [str(a) for a in argv]
    LOG.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=capture,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, str(exc), message=f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, message=f"{argv[0]} did not finish within {timeout} s") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr, proc.stdout)
    return proc
